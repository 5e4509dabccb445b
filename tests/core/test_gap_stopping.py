"""The ``stop="gap"`` rule of ``lanczos``: estimates within their stated error, fewer HVPs, on exact Hessians.

The scenario the rule is for: a warm start from the top eigenvector of a nearby matrix (a mini-batch Hessian
that moved). Each case is a dense random symmetric matrix with a seeded spectrum (its eigenvalues known by
construction and checked with ``torch.linalg.eigvalsh``); the warm start is the top eigenvector of a perturbed
copy. The stated error of a converged estimate is ``tol·|θ|`` (relative) to h0, for both rules.
"""

from __future__ import annotations

import pytest
import torch

from lyapunov_callbacks.core.hessian import HessianOperator

from lyapunov_callbacks import MatrixOperator, lanczos
from lyapunov_callbacks.core.eigen import top_hessian_eigenvalues


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


@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_the_monitors_two_vector_start_meets_the_stated_error(tol):
    """The monitor's start: the top Ritz vector of span(y0, y1), the moved matrix's top two eigenvectors."""
    extra = 0
    for seed, move, gap in CASES:
        A, _ = moving_case(seed, move=move, gap=gap)
        gen = torch.Generator().manual_seed(1000 + seed)
        E = torch.randn(A.shape, generator=gen, dtype=torch.float64)
        E = (E + E.T) / torch.linalg.matrix_norm(E + E.T, ord=2)
        V = torch.linalg.eigh(A + move * E).eigenvectors
        h0 = float(torch.linalg.eigvalsh(A)[-1])
        results = {}
        for name, init, start in (("y0", V[:, -1], "first"), ("span", V[:, [-1, -2]], "rayleigh_ritz")):
            res = lanczos(MatrixOperator(A), k=1, tol=tol, max_iter=60, init=init, stop="gap", start=start)
            theta = float(res.eigenvalues[0])
            case = f"seed={seed} move={move} gap={gap} tol={tol} start={name}: θ={theta}, h0={h0}"
            assert res.converged and theta <= h0 + 1e-12, case
            results[name] = (res.num_hvps, h0 - theta)
        # The two-vector start meets the stated error ...
        assert results["span"][1] <= tol * h0, (seed, move, gap, results)
        extra += results["span"][0] - results["y0"][0]
    # ... and where the top eigenvector barely moved (these cases) it costs at most its one extra product: measured
    # 78 (tol 1e-2) and 32 (tol 1e-3) more over the 100 cases than a start from y0 alone (the fixed start
    # y0 + 0.3·y1 it replaced: 85 and 134).
    assert 0 < extra <= len(CASES)


def _swap_problem(n: int = 12):
    """``(Q, before, after)``: eigenvalues on the basis Q with the top two swapped between before and after."""
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    spectrum = torch.linspace(0.1, 0.5, n, dtype=torch.float64)
    before = spectrum.clone()
    before[0], before[1] = 1.0, 0.9  # eigenvector Q[:, 0] on top
    after = spectrum.clone()
    after[0], after[1] = 0.9, 1.0  # the two swapped: Q[:, 1] on top
    return Q, before, after


def test_a_two_vector_start_finds_h0_after_h0_and_h1_swap():
    """Warm start after the top two eigenvalues swapped: from the old top eigenvector alone the Krylov space is
    invariant and the solve stops on the new h1; the tracker's two-vector start finds h0."""
    from lyapunov_callbacks.core.tracker import EigenTracker

    Q, before, after = _swap_problem()
    n = Q.shape[0]

    class Quadratic(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def loss_fn(model, eigs):
        A = (Q * eigs) @ Q.T
        return 0.5 * model.theta @ A @ model.theta

    model = Quadratic()

    def estimate(tracker, eigs):
        with HessianOperator(model, loss_fn, eigs) as op:
            return tracker.estimate(op)

    found = {}
    for two in (False, True):
        tracker = EigenTracker(k=1, tol=1e-2, seed=0, two_vector_start=two)
        first = estimate(tracker, before)
        assert abs(float(first.eigenvalues[0]) - 1.0) < 1e-2
        found[two] = float(estimate(tracker, after).eigenvalues[0])
        restored = EigenTracker(k=1, tol=1e-2, seed=0, two_vector_start=two)
        restored.load_state_dict(tracker.state_dict())
        if two:
            assert tracker.start_basis.shape == (n, 2) and torch.equal(restored.start_basis, tracker.start_basis)
            assert torch.equal(tracker.start_vectors(), tracker.start_basis)
        else:
            assert tracker.start_basis is None and restored.start_basis is None
    assert abs(found[False] - 0.9) < 1e-4  # the old top direction: stopped on h1 (10 % low)
    assert abs(found[True] - 1.0) < 1e-3  # the two-vector start: h0


def test_the_span_start_keeps_a_direction_a_fixed_combination_cancels():
    """y0, y1 orthonormal with the top eigenvector along −0.3·y0 + y1: the fixed start y0 + 0.3·y1 is orthogonal
    to it (the signs of Ritz vectors are arbitrary, so this is one sign flip away from the sum), and its Krylov
    space never reaches h0; the top Ritz vector of the span is the top eigenvector itself."""
    Q, _, after = _swap_problem()
    A = (Q * after) @ Q.T  # h0 = 1 along Q[:, 1], h1 = 0.9 along Q[:, 0]
    c = 0.3 / (1 + 0.3**2) ** 0.5
    s = 1 / (1 + 0.3**2) ** 0.5
    y0 = -c * Q[:, 1] + s * Q[:, 0]  # orthonormal, with (y0 + 0.3·y1)ᵀQ[:, 1] = −c + 0.3·s = 0
    y1 = s * Q[:, 1] + c * Q[:, 0]
    fixed = y0 + 0.3 * y1
    assert abs(float(fixed @ Q[:, 1])) < 1e-12
    res = lanczos(MatrixOperator(A), k=1, tol=1e-2, max_iter=5, init=fixed / fixed.norm(), stop="gap")
    assert float(res.eigenvalues[0]) < 0.91  # h1: the fixed start missed h0
    res = lanczos(MatrixOperator(A), k=1, tol=1e-2, max_iter=5, init=torch.stack([y0, y1], 1), stop="gap",
                  start="rayleigh_ritz")
    assert abs(float(res.eigenvalues[0]) - 1.0) < 1e-10 and res.num_hvps == 2  # z = Q[:, 1]: exact at once


def test_rayleigh_ritz_start_is_checked():
    A = MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="start"):
        lanczos(A, start="span")
    with pytest.raises(ValueError, match="k=1"):
        lanczos(A, k=2, init=torch.eye(4, 2, dtype=torch.float64), start="rayleigh_ritz")
    with pytest.raises(ValueError, match="start"):
        top_hessian_eigenvalues(torch.nn.Linear(3, 1), lambda m, b: m(b).pow(2).mean(), torch.randn(4, 3),
                                method="power", start="rayleigh_ritz")


def test_eigen_tracker_rejects_a_bad_two_vector_start_or_gap_safety():
    from lyapunov_callbacks.core.tracker import EigenTracker

    for bad in (0.3, 1, "yes", None):
        with pytest.raises(ValueError, match="two_vector_start"):
            EigenTracker(two_vector_start=bad)
    for bad in (0.5, float("inf"), None):  # checked at construction, not at the first estimate
        with pytest.raises(ValueError, match="gap_safety"):
            EigenTracker(gap_safety=bad)


def test_lanczos_returns_the_top_ritz_pairs_on_request():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    A = (Q * torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.1], dtype=torch.float64)) @ Q.T
    # Six products span the whole space: the Ritz pairs are the exact eigenpairs.
    res = lanczos(MatrixOperator(A), k=1, tol=1e-14, max_iter=6, ritz_vectors=3)
    assert torch.allclose(res.ritz_values, torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64), atol=1e-10)
    assert res.ritz_vectors.shape == (6, 3)
    assert torch.allclose(res.ritz_vectors[:, 0], res.eigenvectors[:, 0])
    for i in range(3):  # each column the eigenvector of its value (up to sign)
        assert abs(float(res.ritz_vectors[:, i] @ Q[:, i])) > 1 - 1e-8
    plain = lanczos(MatrixOperator(A), k=1, tol=1e-14, max_iter=6)
    assert plain.ritz_vectors is None and torch.equal(plain.eigenvalues, res.eigenvalues)
    # Stopped early, fewer dimensions than asked for: what the Krylov space has, still orthonormal.
    early = lanczos(MatrixOperator(A), k=1, tol=1e-14, max_iter=2, ritz_vectors=4)
    assert early.ritz_vectors.shape == (6, 2)
    assert torch.allclose(early.ritz_vectors.T @ early.ritz_vectors, torch.eye(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(("kwargs", "name"), [({"gap_safety": 0.5}, "gap_safety"), ({"gap_safety": float("nan")}, "gap_safety"),
                                               ({"ritz_vectors": -1}, "ritz_vectors"), ({"ritz_vectors": 1.5}, "ritz_vectors")])
def test_lanczos_rejects_bad_gap_safety_and_ritz_vectors(kwargs, name):
    A, init = moving_case(0)
    with pytest.raises(ValueError, match=name):
        lanczos(MatrixOperator(A), k=1, init=init, **kwargs)


def test_rayleigh_ritz_start_handles_dependent_columns_and_leaves_init_alone():
    """Dependent or surplus columns are replaced or left out; the caller's init is not written."""
    A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    e0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    init = torch.stack([e0, 2 * e0, e0, e0], 1)  # rank one, and more columns than dim
    kept = init.clone()
    res = lanczos(MatrixOperator(A), k=1, tol=1e-10, init=init, start="rayleigh_ritz")
    assert res.converged and abs(float(res.eigenvalues[0]) - 3.0) < 1e-12
    assert torch.equal(init, kept)
    five = MatrixOperator(torch.eye(1, dtype=torch.float64) * 5)
    one = lanczos(five, k=1, init=torch.ones(1, 2, dtype=torch.float64), start="rayleigh_ritz")
    assert abs(float(one.eigenvalues[0]) - 5.0) < 1e-12
