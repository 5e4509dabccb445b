"""The ``stop="gap"`` rule of ``lanczos``: estimates within their stated error, fewer HVPs, on exact Hessians.

The scenario the rule is for: a warm start from the top eigenvector of a nearby matrix (a mini-batch Hessian
that moved). Each case is a dense random symmetric matrix with a seeded spectrum (its eigenvalues known by
construction and checked with ``torch.linalg.eigvalsh``); the warm start is the top eigenvector of a perturbed
copy. The stated error of a converged estimate is ``tol·|θ|`` (relative) to h0, for both rules.
"""

from __future__ import annotations

import pytest
import torch

from lyapunov_callbacks import MatrixOperator, lanczos
from lyapunov_callbacks.eigen import top_hessian_eigenvalues


def moving_case(seed: int, n: int = 60, move: float = 0.05, gap: float = 0.2):
    """``(A, init)``: A = Q diag(λ) Qᵀ with h0 - h1 = gap·h0, init = top eigenvector of A + move·‖A‖·E."""
    gen = torch.Generator().manual_seed(seed)
    eigs = torch.rand(n, generator=gen, dtype=torch.float64) * 0.6
    eigs[0] = 1.0
    eigs[1] = 1.0 - gap
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = (Q * eigs) @ Q.T
    A = (A + A.T) / 2
    E = torch.randn(n, n, generator=gen, dtype=torch.float64)
    E = (E + E.T) / torch.linalg.matrix_norm(E + E.T, ord=2)
    init = torch.linalg.eigh(A + move * E).eigenvectors[:, -1]
    return A, init


CASES = [(seed, move, gap) for seed in range(25) for move, gap in ((0.02, 0.3), (0.1, 0.2), (0.3, 0.1), (0.05, 0.02))]


@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_gap_rule_meets_its_stated_error_and_saves_products(tol):
    saved = 0
    for seed, move, gap in CASES:
        A, init = moving_case(seed, move=move, gap=gap)
        h0 = float(torch.linalg.eigvalsh(A)[-1])
        results = {stop: lanczos(MatrixOperator(A), k=1, tol=tol, max_iter=60, init=init, stop=stop)
                   for stop in ("residual", "gap")}
        for stop, res in results.items():
            theta = float(res.eigenvalues[0])
            case = f"seed={seed} move={move} gap={gap} tol={tol} stop={stop}: θ={theta}, h0={h0}"
            assert res.converged, case
            # The Rayleigh-Ritz value never exceeds h0; the stated error bound holds.
            assert theta <= h0 + 1e-12, case
            assert h0 - theta <= tol * abs(theta), case
        # The gap rule's extra stop never costs products.
        assert results["gap"].num_hvps <= results["residual"].num_hvps
        saved += results["residual"].num_hvps - results["gap"].num_hvps
    assert saved >= len(CASES) // 4  # measured: 39 (tol 1e-2) products saved over the 100 cases


def test_gap_rule_needs_lanczos():
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="stop='gap'.*lanczos"):
        top_hessian_eigenvalues(model, lambda m, b: m(b).pow(2).mean(), torch.randn(4, 3), method="power", stop="gap")
    with pytest.raises(ValueError, match="stop"):
        lanczos(MatrixOperator(torch.eye(3, dtype=torch.float64)), stop="gapp")
