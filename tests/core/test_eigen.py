"""Eigen-solvers (Lanczos, power, Lyapunov) against exact spectra of dense matrices and of small networks' Hessians."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lyapunov_callbacks import (
    EigenResult,
    HessianOperator,
    MatrixOperator,
    lanczos,
    lyapunov_iteration,
    power_iteration,
    top_hessian_eigenvalues,
)

# ----------------------------------------------------------------------------- references


def tanh_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def cnn_bn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()


CRITERIA = {"ce": F.cross_entropy, "mse": F.mse_loss}


def make_problem(kind, loss, n=16, seed=6):
    model = tanh_mlp() if kind == "mlp" else cnn_bn()
    model.train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g) if kind == "mlp" else torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    if loss == "mse":
        y = F.one_hot(y, 3).double()
    crit = CRITERIA[loss]

    def loss_fn(m, b):
        return crit(m(b[0]), b[1])

    loss_fn.crit = crit  # the reference below applies the criterion to a functional forward
    return model, loss_fn, (x.double(), y)


def exact_top(model, loss_fn, batch, k):
    """Top-k eigenvalues (descending) of the dense Hessian from torch.autograd.functional.hessian."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes, numels = [n for n, _ in named], [p.shape for _, p in named], [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = dict(model.named_buffers())
    x, y = batch

    def f(theta):
        d = {n: c.view(s) for n, c, s in zip(names, theta.split(numels), shapes)}
        d.update({n: b.clone() for n, b in buffers.items()})
        return loss_fn.crit(torch.func.functional_call(model, d, (x,)), y)

    H = torch.autograd.functional.hessian(f, flat, vectorize=True)
    return torch.linalg.eigvalsh(H).flip(0)[:k]


def spectrum_matrix(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T


class CountingMatrix(MatrixOperator):
    """Counts the actual products independently of the solver's bookkeeping."""

    def __init__(self, A):
        super().__init__(A)
        self.columns = 0

    def matvec(self, v):
        self.columns += 1
        return super().matvec(v)

    def matmat(self, V):
        self.columns += V.shape[1]
        return super().matmat(V)


EIGS = [10.0, 8.0, 7.0] + torch.linspace(-2.0, 5.0, 37).tolist()
SOLVERS = {"lanczos": lanczos, "power": power_iteration, "lyapunov": lyapunov_iteration}


# ----------------------------------------------------------------------------- dense matrices


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("k", [1, 3])
def test_solvers_on_known_spectrum(name, k):
    A = spectrum_matrix(EIGS)
    op = CountingMatrix(A)
    res = SOLVERS[name](op, k=k, tol=1e-8, max_iter=2000)
    assert isinstance(res, EigenResult) and res.converged
    assert res.eigenvalues.shape == (k,) and res.eigenvectors.shape == (40, k)
    assert torch.allclose(res.eigenvalues, torch.tensor(EIGS[:k], dtype=torch.float64), rtol=1e-8, atol=0)
    V = res.eigenvectors
    assert torch.allclose(V.T @ V, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert (A @ V - V * res.eigenvalues).norm() <= 1e-6 * 10
    assert res.num_hvps == op.columns == op.num_hvps


def test_cost_ordering_lanczos_beats_power_beats_lyapunov():
    A = spectrum_matrix(EIGS)
    cost = {name: SOLVERS[name](MatrixOperator(A), k=1, tol=1e-6, max_iter=2000).num_hvps for name in SOLVERS}
    assert cost["lanczos"] < cost["power"] <= cost["lyapunov"], cost


def test_lyapunov_returns_the_growth_rate_formula():
    A = spectrum_matrix(EIGS)
    alpha, steps = 0.05, 7
    res = lyapunov_iteration(MatrixOperator(A), k=1, alpha=alpha, tol=1e-15, max_iter=steps, seed=3)
    assert res.num_hvps == steps and not res.converged
    # Replay the recurrence by hand from the same seeded start.
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(40, 1, generator=g, dtype=torch.float64)[:, 0]
    delta = delta / delta.norm()
    for _ in range(steps):
        nxt = delta + alpha * (A @ delta)
        lam = math.log(float(nxt.norm() / delta.norm()))
        delta = nxt / nxt.norm()
    # The growth rate of the last step is the Lyapunov exponent; the eigenvalue is the Rayleigh quotient of the
    # returned tangent vector (the one the last product was taken of), which at convergence the growth formula
    # (e^λ - 1)/α also gives.
    assert math.isclose(float(res.lyapunov_exponents[0]), lam, rel_tol=1e-12)
    v = res.eigenvectors[:, 0]
    assert math.isclose(float(res.eigenvalues[0]), float(v @ A @ v), rel_tol=1e-12)
    # And with enough steps it converges to h0 at rate (1 + a h1) / (1 + a h0).
    conv = lyapunov_iteration(MatrixOperator(A), k=1, alpha=alpha, tol=1e-6, max_iter=3000)
    assert conv.converged and abs(float(conv.eigenvalues[0]) - 10.0) < 1e-6
    assert math.expm1(float(conv.lyapunov_exponents[0])) / alpha == pytest.approx(10.0, rel=1e-5)


def test_lanczos_exact_termination_and_degenerate_spectrum():
    op = MatrixOperator(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)))
    res = lanczos(op, k=3, max_iter=50)
    assert res.converged and res.num_hvps == 3  # dim < max_iter: breakdown after dim steps
    assert torch.allclose(res.eigenvalues, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), atol=1e-12)
    # A single Krylov space sees only one copy of a repeated eigenvalue: the restart finds the other.
    op = MatrixOperator(torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0, 0.5], dtype=torch.float64)))
    res = lanczos(op, k=3, max_iter=50)
    assert res.converged
    assert torch.allclose(res.eigenvalues, torch.tensor([3.0, 3.0, 1.0], dtype=torch.float64), atol=1e-12)


def test_lanczos_from_an_exact_eigenvector_stops_after_one_hvp():
    A = spectrum_matrix(EIGS)
    top = torch.linalg.eigh(A).eigenvectors[:, -1]
    res = lanczos(MatrixOperator(A), k=1, max_iter=20, init=top)  # dim 40 > max_iter: no restart
    assert res.converged and res.num_hvps == 1
    assert abs(float(res.eigenvalues[0]) - 10.0) < 1e-12


def test_budget_exhaustion_reports_not_converged():
    A = spectrum_matrix(EIGS)
    for name, fn in SOLVERS.items():
        res = fn(MatrixOperator(A), k=1, tol=1e-12, max_iter=3)
        assert not res.converged and res.num_hvps == 3, name


def test_seeded_start_is_deterministic_and_leaves_global_rng_alone():
    A = spectrum_matrix(EIGS)
    rng = torch.get_rng_state()
    r1 = lanczos(MatrixOperator(A), k=2, max_iter=6, seed=11)
    r2 = lanczos(MatrixOperator(A), k=2, max_iter=6, seed=11)
    r3 = lanczos(MatrixOperator(A), k=2, max_iter=6, seed=12)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues) and not torch.equal(r1.eigenvalues, r3.eigenvalues)
    assert torch.equal(torch.get_rng_state(), rng)


def test_warm_start_block_for_top_k():
    A = spectrum_matrix(EIGS)
    cold = lanczos(MatrixOperator(A), k=3, tol=1e-8)
    E = torch.randn(40, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A2 = A + 1e-3 * (E + E.T)
    exact = torch.linalg.eigvalsh(A2).flip(0)[:3]
    for fn in (lanczos, power_iteration, lyapunov_iteration):
        warm = fn(MatrixOperator(A2), k=3, tol=1e-6, init=cold.eigenvectors, max_iter=2000)
        fresh = fn(MatrixOperator(A2), k=3, tol=1e-6, max_iter=2000)
        assert torch.allclose(warm.eigenvalues, exact, rtol=1e-6), fn.__name__
        assert warm.num_hvps < fresh.num_hvps, (fn.__name__, warm.num_hvps, fresh.num_hvps)


# ----------------------------------------------------------------------------- network Hessians


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_methods_match_exact_hessian_spectrum(kind, loss):
    model, loss_fn, batch = make_problem(kind, loss)
    exact = exact_top(model, loss_fn, batch, 3)
    assert exact[0] > 0
    rel = {}
    for method, k in (("lanczos", 1), ("lanczos", 3), ("power", 1), ("lyapunov", 1)):
        res = top_hessian_eigenvalues(model, loss_fn, batch, k=k, method=method, max_iter=400)
        # The top two eigenvalues of the CNN/CE Hessian are 0.3% apart: power and Lyapunov get h0
        # long before their eigenvector residual meets tol, so only Lanczos must converge.
        assert res.converged or method != "lanczos", (method, k)
        rel[(method, k)] = float(((res.eigenvalues - exact[:k]).abs() / exact[:k]).max())
        with HessianOperator(model, loss_fn, batch) as op:  # the solver's count is the operator's count
            direct = {"lanczos": lanczos, "power": power_iteration, "lyapunov": lyapunov_iteration}[method]
            again = direct(op, k=k, max_iter=400)
            assert again.num_hvps == op.num_hvps == res.num_hvps
    assert rel[("lanczos", 1)] < 1e-3 and rel[("lanczos", 3)] < 1e-3, rel
    assert rel[("power", 1)] < 1e-3, rel
    assert rel[("lyapunov", 1)] < 1e-2, rel


def test_finite_difference_backend_drives_lanczos_to_h0():
    model, loss_fn, batch = make_problem("mlp", "ce")
    exact = exact_top(model, loss_fn, batch, 1)
    res = top_hessian_eigenvalues(model, loss_fn, batch, hvp="finite_difference", tol=1e-3)
    assert abs(float(res.eigenvalues[0] / exact[0]) - 1) < 1e-3


def test_warm_start_after_small_parameter_move_takes_few_hvps():
    model, loss_fn, batch = make_problem("cnn", "ce")
    first = top_hessian_eigenvalues(model, loss_fn, batch, k=1)
    moved = copy.deepcopy(model)
    opt = torch.optim.SGD(moved.parameters(), lr=0.05)
    opt.zero_grad()
    loss_fn(moved, batch).backward()
    opt.step()
    exact = exact_top(moved, loss_fn, batch, 1)[0]
    warm = top_hessian_eigenvalues(moved, loss_fn, batch, k=1, tol=1e-2, init=first.eigenvectors)
    cold = top_hessian_eigenvalues(moved, loss_fn, batch, k=1, tol=1e-2)
    assert warm.converged and warm.num_hvps <= 5, warm.num_hvps
    assert abs(float(warm.eigenvalues[0] / exact) - 1) < 1e-2
    assert cold.num_hvps > warm.num_hvps


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "arnoldi"}, "method"),
        ({"hvp": "jvp"}, "hvp"),
        ({"k": 0}, "k="),
        ({"k": 10_000}, "k="),
        ({"tol": 0.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"k": 3, "max_iter": 2}, "max_iter"),
        ({"alpha": 0.1}, "alpha"),
        ({"method": "lyapunov", "alpha": -1.0}, "alpha"),
        ({"init": torch.zeros(5)}, "init"),
    ],
)
def test_top_hessian_eigenvalues_validates_arguments(kwargs, match):
    model, loss_fn, batch = make_problem("mlp", "ce")
    with pytest.raises(ValueError, match=match):
        top_hessian_eigenvalues(model, loss_fn, batch, **kwargs)


def test_solver_validation_on_operator():
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="k=5"):
        lanczos(op, k=5)
    with pytest.raises(ValueError, match="init"):
        power_iteration(op, init=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="matvec"):
        lanczos(object())
    with pytest.raises(ValueError, match="A must be"):
        MatrixOperator(torch.zeros(2, 3))


# ----------------------------------------------------------------------------- per-estimate cost


def test_lanczos_keeps_full_orthogonality_over_long_runs():
    # 60 steps on a matrix whose top eigenvalue converges early: without full re-orthogonalisation the
    # basis loses orthogonality and "ghost" copies of 10.0 appear among the top Ritz values.
    A = spectrum_matrix(EIGS + torch.linspace(-1.0, 1.0, 60).tolist(), seed=3)  # dim 100
    exact = torch.linalg.eigvalsh(A).flip(0)[:4]
    res = lanczos(MatrixOperator(A), k=4, tol=1e-14, max_iter=60)
    assert res.converged and res.num_hvps > 40  # a long run: many vectors to keep orthogonal
    torch.testing.assert_close(res.eigenvalues[:3], exact[:3], rtol=1e-12, atol=0)  # 10, 8, 7: no ghost 10
    V = res.eigenvectors
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_warm_start_one_hvp_when_residual_is_within_tol_and_error_within_residual_bound():
    A = spectrum_matrix(EIGS)
    top = torch.linalg.eigh(A).eigenvectors[:, -1]
    g = torch.Generator().manual_seed(5)
    v = top + 1e-3 * torch.randn(40, generator=g, dtype=torch.float64)
    op = MatrixOperator(A)
    res = lanczos(op, k=1, tol=1e-2, init=v)
    unit = v / v.norm()
    theta = float(unit @ A @ unit)
    residual = float((A @ unit - theta * unit).norm())
    assert residual <= 1e-2 * abs(theta)  # so one HVP is enough ...
    assert res.num_hvps == op.num_hvps == 1 and res.converged
    assert float(res.eigenvalues[0]) == pytest.approx(theta, rel=1e-12)
    # ... and the Ritz value is within the residual of the eigenvalue, in fact within residual²/gap
    # (Kato-Temple; gap = 10 - 8 to the next eigenvalue): 2.3e-4 here for a residual of 4.4e-2.
    assert abs(theta - 10.0) <= residual**2 / 2.0 < residual


def test_warm_start_draws_no_random_vectors_and_rank_deficient_init_is_completed(monkeypatch):
    import lyapunov_callbacks.core.eigen as eigen

    drawn = []
    real = eigen._randn

    def counting(op, cols, gen):
        drawn.append(cols)
        return real(op, cols, gen)

    monkeypatch.setattr(eigen, "_randn", counting)
    A = spectrum_matrix(EIGS)
    top = torch.linalg.eigh(A).eigenvectors[:, -1]
    lanczos(MatrixOperator(A), k=1, init=top)
    power_iteration(MatrixOperator(A), k=1, init=top)
    lyapunov_iteration(MatrixOperator(A), k=1, init=top)
    assert drawn == []  # a warm start of one vector costs no O(dim) random draw
    lanczos(MatrixOperator(A), k=1, max_iter=5)
    assert drawn == [1]  # a cold start draws exactly its one column
    drawn.clear()
    # Two identical init columns for k=3: one missing column is drawn, the duplicate is replaced from a
    # fallback draw made only because QR found it rank-deficient; the block is orthonormal.
    block = eigen._start_block(MatrixOperator(A), 3, torch.stack([top, top], dim=1), seed=0)
    assert drawn == [1, 3]
    torch.testing.assert_close(block.T @ block, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(block[:, 0], top, rtol=0, atol=1e-12)


def test_lyapunov_single_vector_path_matches_block_formula():
    # k=1 takes a norm where k>1 takes a QR: same growth-rate estimate after the same steps.
    A = spectrum_matrix(EIGS)
    res = lyapunov_iteration(MatrixOperator(A), k=1, alpha=0.05, tol=1e-14, max_iter=7, seed=4)
    import lyapunov_callbacks.core.eigen as eigen

    delta = eigen._start_block(MatrixOperator(A), 1, None, 4)[:, 0]
    for _ in range(7):
        last = delta
        m = delta + 0.05 * (A @ delta)
        growth = float(m.norm())
        delta = m / growth
    assert float(res.lyapunov_exponents[0]) == pytest.approx(math.log(growth), rel=1e-12)
    torch.testing.assert_close(res.eigenvectors[:, 0], last, rtol=0, atol=1e-12)
    assert float(res.eigenvalues[0]) == pytest.approx(float(last @ A @ last), rel=1e-12)
    block = lyapunov_iteration(MatrixOperator(A), k=2, alpha=0.05, tol=1e-14, max_iter=14, seed=4)
    V = block.eigenvectors
    torch.testing.assert_close(block.eigenvalues, torch.linalg.eigvalsh(V.T @ A @ V).flip(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("k", [1, 2])
def test_non_finite_operator_gives_nan_not_an_exception(name, k):
    # A diverged loss makes every HVP non-finite: the solvers must report NaN (not converged) so that
    # callbacks can reject the estimate, instead of raising inside the training loop.
    A = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    A[0, 0] = math.nan
    res = SOLVERS[name](MatrixOperator(A), k=k, tol=1e-6, max_iter=20)
    assert res.eigenvalues.shape == (k,)
    assert bool(torch.isnan(res.eigenvalues[0]))
    assert not res.converged


@pytest.mark.parametrize("k", [1, 2, 3])
def test_power_iteration_returns_the_top_eigenvalues_when_a_negative_one_dominates_in_magnitude(k):
    # Away from a minimum the most negative eigenvalue can be the largest in magnitude; plain power
    # iteration (PyHessian) would return it. Ours switches to H + shift·I and returns the top ones.
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    spectrum = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1, -0.2, -0.9, -2.5], dtype=torch.float64)
    A = Q @ torch.diag(spectrum) @ Q.T
    res = power_iteration(MatrixOperator(A), k=k, tol=1e-8, max_iter=5000)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, spectrum[:k], rtol=1e-6, atol=0)
    # the vectors are eigenvectors of the top eigenvalues, not of -2.5
    torch.testing.assert_close(A @ res.eigenvectors, res.eigenvectors * spectrum[:k], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- indefinite Hessians, order


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("k", [1, 3])
def test_dominant_negative_eigenvalue_gives_the_algebraically_largest(name, k):
    # diag(1, -3, 0, ..., 0): the eigenvalue of largest magnitude is -3; h0 is 1. The growth-rate formula
    # of the Lyapunov iteration used to return 2.653, marked converged.
    eigs = torch.zeros(20, dtype=torch.float64)
    eigs[0], eigs[1] = 1.0, -3.0
    A = torch.diag(eigs)
    res = SOLVERS[name](MatrixOperator(A), k=k, tol=1e-8, max_iter=400)
    expected = torch.linalg.eigvalsh(A).flip(0)[:k]
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, expected, rtol=0, atol=1e-7)
    V = res.eigenvectors
    torch.testing.assert_close(((A @ V) * V).sum(dim=0), res.eigenvalues, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["lanczos", "power", "lyapunov"])
def test_indefinite_model_hessian_via_top_hessian_eigenvalues(method):
    # L(θ) = ½ θᵀ diag(1, -3, 0, 0, 0, 0) θ as a model: h0 = 1, whatever the method.
    class Saddle(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.linspace(0.1, 0.6, 6, dtype=torch.float64))

        def forward(self, d):
            return 0.5 * (d * self.theta**2).sum()

    d = torch.tensor([1.0, -3.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    for hvp in ("autograd", "finite_difference"):
        for k in (1, 3):
            res = top_hessian_eigenvalues(Saddle(), lambda m, b: m(b), d, k=k, method=method, hvp=hvp, tol=1e-8,
                                          max_iter=300)
            assert res.converged, (method, hvp, k)
            torch.testing.assert_close(res.eigenvalues, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)[:k],
                                       rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_eigenvalues_descending_with_close_top_pair(name):
    # Two nearly equal top eigenvalues (a LinearModel MSE run logged h1 = 200.819 > h0 = 200.816): the
    # returned values must be in descending order whether or not the solver converged.
    A = spectrum_matrix([200.819, 200.816, 50.0, 10.0, 5.0] + [1.0] * 35)
    for max_iter in (10, 25, 400):
        res = SOLVERS[name](MatrixOperator(A), k=5, tol=1e-10, max_iter=max_iter, seed=2)
        assert bool((res.eigenvalues[:-1] >= res.eigenvalues[1:]).all()), (name, max_iter, res.eigenvalues)
