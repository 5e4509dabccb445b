"""TangentDynamics on quadratics: λ against exact spectral radii, and the tangent against real SGD trajectories."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lyapunov_callbacks import HessianOperator, TangentDynamics

# A quadratic L(θ) = ½ θᵀAθ with a known spectrum (one negative eigenvalue: a saddle direction).
SPECTRUM = [-0.5, 0.2, 1.0, 2.0, 3.0, 6.5]


def spectrum_matrix(eigs=SPECTRUM, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ Q.T


class Quadratic(nn.Module):
    def __init__(self, theta0):
        super().__init__()
        self.theta = nn.Parameter(theta0.clone())


def quadratic_loss(A):
    return lambda model, batch: 0.5 * model.theta @ (A @ model.theta)


def momentum_map(A, lr, momentum, dampening, nesterov, wd):
    """The exact 2n×2n linear map (θ, m) → (θ', m') of torch.optim.SGD on ½θᵀAθ (after the first step)."""
    n = A.shape[0]
    B = A + wd * torch.eye(n, dtype=A.dtype)
    I = torch.eye(n, dtype=A.dtype)
    m_theta, m_m = (1 - dampening) * B, momentum * I  # m' = (1-τ)Bθ + μm
    if nesterov:  # θ' = θ - α(Bθ + μ m')
        t_theta, t_m = I - lr * (B + momentum * m_theta), -lr * momentum * m_m
    else:  # θ' = θ - α m'
        t_theta, t_m = I - lr * m_theta, -lr * m_m
    return torch.cat([torch.cat([t_theta, t_m], 1), torch.cat([m_theta, m_m], 1)], 0)


def test_sgd_lambda_converges_to_log_max_abs_one_minus_lr_a():
    A = spectrum_matrix()
    lr = 0.3
    expected = math.log(max(abs(1 - lr * a) for a in SPECTRUM))  # log 1.15 (the saddle direction)
    model = Quadratic(torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    tangent = TangentDynamics(6, dtype=torch.float64, seed=4)
    loss_fn = quadratic_loss(A)
    growths = []
    for _ in range(60):  # second / first |1 - lr a| = 0.95 / 1.15: 1e-3 after ~40 steps
        with HessianOperator(model, loss_fn, None) as H:
            growths.append(tangent.step(H.matvec, lr=lr))
    assert abs(growths[-1] - expected) < 1e-3
    burn_in = tangent.flush_window()
    assert burn_in == pytest.approx(sum(growths) / 60, rel=1e-12)
    for _ in range(60):
        tangent.step(lambda v: A @ v, lr=lr)
    assert abs(tangent.flush_window() - expected) < 1e-3
    assert tangent.num_steps == 120 and tangent.flush_window() is None


def test_sgd_weight_decay_shifts_the_spectrum():
    A = spectrum_matrix()
    lr, wd = 0.25, 0.2
    expected = math.log(max(abs(1 - lr * (a + wd)) for a in SPECTRUM))
    tangent = TangentDynamics(6, weight_decay=wd, dtype=torch.float64)
    for _ in range(200):
        last = tangent.step(lambda v: A @ v, lr=lr)
    assert abs(last - expected) < 1e-6


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov", "wd", "lr"),
    [(0.9, 0.0, False, 0.01, 0.1), (0.9, 0.0, True, 0.01, 0.1), (0.5, 0.3, False, 0.0, 0.2), (0.6, 0.0, True, 0.0, 0.4)],
)
def test_momentum_lambda_is_log_spectral_radius_of_the_linear_map(momentum, dampening, nesterov, wd, lr):
    A = spectrum_matrix()
    M = momentum_map(A, lr, momentum, dampening, nesterov, wd)
    expected = math.log(float(torch.linalg.eigvals(M).abs().max()))
    tangent = TangentDynamics(6, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd, dtype=torch.float64)
    for _ in range(500):  # burn-in
        tangent.step(lambda v: A @ v, lr=lr)
    tangent.flush_window()
    for _ in range(3000):  # a complex dominant pair makes single steps oscillate: average a window
        tangent.step(lambda v: A @ v, lr=lr)
    assert abs(tangent.flush_window() - expected) < 1e-3


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov", "wd"),
    [(0.0, 0.0, False, 0.05), (0.9, 0.0, False, 0.0), (0.9, 0.0, True, 0.01), (0.7, 0.4, False, 0.02)],
)
def test_tangent_equals_difference_of_two_real_sgd_trajectories(momentum, dampening, nesterov, wd):
    """On a quadratic SGD is affine, so θ_b − θ_a is exactly ε × the (unnormalised) tangent, first step included."""
    A = spectrum_matrix()
    lr, eps, steps = 0.1, 1e-3, 12
    theta0 = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = Quadratic(theta0)
    opt_a = torch.optim.SGD(a.parameters(), lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd)
    tangent = TangentDynamics.from_optimizer(opt_a, 6, seed=9, dtype=torch.float64)
    b = Quadratic(theta0 + eps * tangent.delta_theta)
    opt_b = torch.optim.SGD(b.parameters(), lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd)
    loss_fn = quadratic_loss(A)
    scale = 1.0
    for _ in range(steps):
        with HessianOperator(a, loss_fn, None) as H:  # built before the step, at the step's parameters
            scale *= math.exp(tangent.step(H.matvec, lr=opt_a.param_groups[0]["lr"]))
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss_fn(model, None).backward()
            opt.step()
    d_theta = (b.theta - a.theta).detach() / eps
    assert torch.allclose(tangent.delta_theta * scale, d_theta, rtol=1e-7, atol=1e-9)
    if momentum:
        d_m = (opt_b.state[b.theta]["momentum_buffer"] - opt_a.state[a.theta]["momentum_buffer"]) / eps
        assert torch.allclose(tangent.delta_m * scale, d_m, rtol=1e-7, atol=1e-9)
        # Growth is measured in the joint Euclidean norm ‖(δθ, δm)‖.
        assert math.isclose(float(torch.cat([tangent.delta_theta, tangent.delta_m]).norm()), 1.0, rel_tol=1e-12)


def test_state_dict_round_trip_continues_identically():
    A = spectrum_matrix()
    t1 = TangentDynamics(6, momentum=0.9, nesterov=True, dtype=torch.float64, seed=3)
    for _ in range(5):
        t1.step(lambda v: A @ v, lr=0.1)
    state = t1.state_dict()
    t2 = TangentDynamics(6, momentum=0.9, nesterov=True, dtype=torch.float64, seed=99)
    t2.load_state_dict(state)
    g1 = [t1.step(lambda v: A @ v, lr=0.1) for _ in range(5)]
    g2 = [t2.step(lambda v: A @ v, lr=0.1) for _ in range(5)]
    assert g1 == g2 and t1.num_steps == t2.num_steps == 10
    assert t1.lyapunov_exponent == t2.lyapunov_exponent
    with pytest.raises(ValueError, match="dim"):
        TangentDynamics(7, momentum=0.9, nesterov=True).load_state_dict(state)
    with pytest.raises(ValueError, match="momentum"):
        TangentDynamics(6).load_state_dict(state)


def test_from_optimizer_validation():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    dim = sum(p.numel() for p in model.parameters())
    with pytest.raises(TypeError, match=r"Adam.*|only torch.optim.SGD"):
        TangentDynamics.from_optimizer(torch.optim.Adam(model.parameters()), dim)
    with pytest.raises(TypeError, match="only torch.optim.SGD"):
        TangentDynamics.from_optimizer(torch.optim.AdamW(model.parameters()), dim)
    with pytest.raises(ValueError, match="maximize"):
        TangentDynamics.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True), dim)
    groups = [{"params": model[0].parameters(), "momentum": 0.9}, {"params": model[1].parameters(), "momentum": 0.5}]
    with pytest.raises(ValueError, match="momentum"):
        TangentDynamics.from_optimizer(torch.optim.SGD(groups, lr=0.1), dim)
    groups = [{"params": model[0].parameters(), "weight_decay": 0.0}, {"params": model[1].parameters(), "weight_decay": 1e-4}]
    with pytest.raises(ValueError, match="weight_decay"):
        TangentDynamics.from_optimizer(torch.optim.SGD(groups, lr=0.1), dim)
    with pytest.raises(ValueError, match="dim=4"):
        TangentDynamics.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4)
    # An optimiser that already stepped has momentum buffers: no "m = g" first step.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    t = TangentDynamics.from_optimizer(opt, dim)
    assert t.momentum_initialized and t.nesterov and t.momentum == 0.9 and t.weight_decay == 1e-3
    assert t.delta_m is not None and t.dtype == torch.float32
    with pytest.raises(ValueError, match="nesterov"):
        TangentDynamics(dim, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        TangentDynamics(dim, momentum=1.5)
    with pytest.raises(ValueError, match="lr"):
        TangentDynamics(dim).step(lambda v: v, lr=-1.0)
    with pytest.raises(ValueError, match="hvp must return"):
        TangentDynamics(dim).step(lambda v: v[:-1], lr=0.1)


def test_a_step_that_annihilates_the_perturbation_gives_minus_inf_not_an_error():
    # One dimension, α = 1/a: (1 - α a) δ = 0. The log growth is -inf; the direction is kept, so the next
    # step (another LR) is still well defined.
    tangent = TangentDynamics(1, dtype=torch.float64)
    a = 4.0
    assert tangent.step(lambda v: a * v, lr=1 / a) == -math.inf
    assert torch.equal(tangent.delta_theta.abs(), torch.ones(1, dtype=torch.float64))
    assert tangent.step(lambda v: a * v, lr=0.5) == pytest.approx(math.log(1.0), abs=1e-12)  # |1 - 2| = 1
    assert tangent.flush_window() == -math.inf
