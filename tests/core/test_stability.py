"""Adam's stability limit against the spectral radius of its linearised map; batch sharpness against gᵀHg/‖g‖²."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lyapunov_callbacks import HessianOperator, MatrixOperator
from lyapunov_callbacks.callbacks.quasi_newton import momentum_stability_factor as qn_momentum_stability_factor
from lyapunov_callbacks.core.stability import (
    adam_quasi_newton_lr,
    adam_stability_factor,
    batch_sharpness,
    momentum_stability_factor,
    pre_stability,
    stability_factor,
)
from lyapunov_callbacks.core.tangent import tangent_dynamics


def spd(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigs = torch.linspace(0.1, 5.0, n, dtype=torch.float64)
    return Q @ torch.diag(eigs) @ Q.T


def diag_p(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g, dtype=torch.float64))  # a spread of scales, ~0.2 to ~5


def adam_frozen_map(H, p, lr, beta1):
    """The 2n×2n map (θ, m) → (θ', m'): m' = β1 m + (1−β1)Hθ, θ' = θ − α P⁻¹ m'."""
    n = H.shape[0]
    I = torch.eye(n, dtype=H.dtype)
    Pinv = torch.diag(1 / p)
    m_theta, m_m = (1 - beta1) * H, beta1 * I
    return torch.cat([torch.cat([I - lr * Pinv @ m_theta, -lr * Pinv @ m_m], 1), torch.cat([m_theta, m_m], 1)], 0)


def rho(M):
    return float(torch.linalg.eigvals(M).abs().max())


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9, 0.99])
def test_spectral_radius_of_adams_frozen_map_crosses_one_at_the_limit(beta1):
    H, p = spd(), diag_p()
    lam1 = float(torch.linalg.eigvals(H / p.unsqueeze(1)).real.max())
    limit = 2 * adam_stability_factor(beta1) / lam1  # (2 + 2β1)/((1 − β1) λ1)
    assert limit == pytest.approx((2 + 2 * beta1) / ((1 - beta1) * lam1), rel=1e-15)
    assert rho(adam_frozen_map(H, p, limit * (1 - 1e-3), beta1)) < 1.0 < rho(adam_frozen_map(H, p, limit * (1 + 1e-3), beta1))
    lo, hi = limit * 0.5, limit * 1.5  # bisection for ρ(α) = 1
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rho(adam_frozen_map(H, p, mid, beta1)) < 1.0 else (lo, mid)
    assert lo == pytest.approx(limit, rel=1e-6)
    # pre_stability is 2 at the limit; the QN LR sits at half of it and is stable.
    assert pre_stability(limit, lam1, beta1) == pytest.approx(2.0, rel=1e-12)
    qn = adam_quasi_newton_lr(lam1, beta1)
    assert qn == pytest.approx(limit / 2, rel=1e-12) and pre_stability(qn, lam1, beta1) == pytest.approx(1.0)
    assert rho(adam_frozen_map(H, p, qn, beta1)) < 1.0
    assert adam_quasi_newton_lr(lam1, beta1, scale=0.5) == pytest.approx(limit / 4, rel=1e-12)


def test_the_frozen_map_is_the_linearised_torch_adam_step_at_a_minimum():
    """At θ = 0 with m = 0, g = 0 and a late step count, one step of the exact tangent equals the explicit map."""
    n, lr, beta1 = 6, 0.05, 0.9
    H = spd(n)
    theta = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = torch.optim.Adam([theta], lr=lr, betas=(beta1, 0.999), eps=1e-8)
    v = diag_p(n) ** 2
    opt.state[theta] = {
        "step": torch.tensor(1e6, dtype=torch.float64),
        "exp_avg": torch.zeros(n, dtype=torch.float64),
        "exp_avg_sq": v.clone(),
    }
    theta.grad = torch.zeros(n, dtype=torch.float64)
    tangent = tangent_dynamics(opt, n, dtype=torch.float64, seed=4)
    tangent.delta_m = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = torch.cat([tangent.delta_theta, tangent.delta_m])
    growth = math.exp(tangent.step(lambda x: H @ x)) * float(before.norm())  # step() renormalises to 1
    p = (0.999 * v / (1 - 0.999 ** (1e6 + 1))).sqrt() + 1e-8  # v' = β2 v (g = 0), bias-corrected at step t+1
    expected = adam_frozen_map(H, p, lr / (1 - beta1 ** (1e6 + 1)), beta1) @ before
    assert torch.allclose(torch.cat([tangent.delta_theta, tangent.delta_m]) * growth, expected, rtol=1e-12, atol=1e-14)
    assert float(tangent.delta_v.abs().max()) == 0.0


def real_sgd_map(h, lr, mu, dampening, nesterov):
    cols = []
    for theta, m in ((1.0, 0.0), (0.0, 1.0)):
        p = nn.Parameter(torch.tensor([theta], dtype=torch.float64))
        opt = torch.optim.SGD([p], lr=lr, momentum=mu, dampening=dampening, nesterov=nesterov)
        opt.state[p]["momentum_buffer"] = torch.tensor([m], dtype=torch.float64)
        p.grad = h * p.detach().clone()
        opt.step()
        cols.append(torch.cat([p.detach(), opt.state[p]["momentum_buffer"]]))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize(("mu", "dampening", "nesterov"), [(0.9, 0.0, False), (0.9, 0.5, False), (0.6, 0.0, True)])
def test_stability_factor_of_sgd_matches_the_real_sgd_map(mu, dampening, nesterov):
    h = 3.0
    param = nn.Parameter(torch.zeros(1))
    c = stability_factor(torch.optim.SGD([param], lr=0.1, momentum=mu, dampening=dampening, nesterov=nesterov))
    limit = 2 * c / h
    below = rho(real_sgd_map(h, limit * (1 - 1e-3), mu, dampening, nesterov))
    above = rho(real_sgd_map(h, limit * (1 + 1e-3), mu, dampening, nesterov))
    assert below < 1.0 < above


def test_stability_factor_values_and_validation():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    assert stability_factor(torch.optim.AdamW([a], betas=(0.9, 0.999))) == pytest.approx(19.0)
    assert stability_factor(torch.optim.Adam([a], betas=(0.0, 0.999))) == 1.0
    assert stability_factor(torch.optim.SGD([a], lr=0.1)) == 1.0
    for mu in (0.0, 0.5, 0.9):
        for nesterov in (False, True):
            if nesterov and mu == 0:
                continue
            assert momentum_stability_factor(mu, nesterov) == qn_momentum_stability_factor(mu, nesterov)
    with pytest.raises(ValueError, match="betas"):
        stability_factor(torch.optim.Adam([{"params": [a]}, {"params": [b], "betas": (0.5, 0.9)}]))
    with pytest.raises(ValueError, match="momentum"):
        stability_factor(torch.optim.SGD([{"params": [a]}, {"params": [b], "momentum": 0.5}], lr=0.1))
    with pytest.raises(TypeError, match="RMSprop"):
        stability_factor(torch.optim.RMSprop([a]))
    with pytest.raises(ValueError, match="beta1"):
        adam_stability_factor(1.0)
    with pytest.raises(ValueError, match="pre_h0"):
        adam_quasi_newton_lr(-1.0, 0.9)
    with pytest.raises(ValueError, match="pre_h0"):
        adam_quasi_newton_lr(float("nan"), 0.9)
    with pytest.raises(ValueError, match="scale"):
        adam_quasi_newton_lr(1.0, 0.9, scale=0.0)
    with pytest.raises(ValueError, match="lr"):
        pre_stability(-1e-3, 1.0, 0.9)
    assert pre_stability(0.1, -2.0, 0.0) == pytest.approx(-0.2)


def test_batch_sharpness_equals_explicit_rayleigh_quotient_in_one_hvp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, 1, generator=g, dtype=torch.float64))

    def loss_fn(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    params = list(model.parameters())
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_g = torch.cat([x.reshape(-1) for x in grads])
    H = torch.stack([torch.cat([y.reshape(-1) for y in torch.autograd.grad(flat_g[i], params, retain_graph=True)])
                     for i in range(flat_g.numel())])
    gd = flat_g.detach()
    expected = float(gd @ H @ gd / (gd @ gd))
    with HessianOperator(model, loss_fn, batch) as op:
        before = op.num_hvps
        value = batch_sharpness(op)
        assert op.num_hvps - before == 1
        assert value == pytest.approx(expected, rel=1e-10)
        u = torch.randn(op.dim, dtype=torch.float64, generator=g)
        assert batch_sharpness(op, u) == pytest.approx(float(u @ H @ u / (u @ u)), rel=1e-10)
        assert math.isnan(batch_sharpness(op, torch.zeros(op.dim, dtype=torch.float64)))
        with pytest.raises(ValueError, match="shape"):
            batch_sharpness(op, torch.zeros(3))
    # λ1 bounds it: a Rayleigh quotient lies within the spectrum.
    eigs = torch.linalg.eigvalsh(0.5 * (H + H.T)).detach()
    assert float(eigs[0]) <= expected <= float(eigs[-1])
    with pytest.raises(ValueError, match="gradient="):
        batch_sharpness(MatrixOperator(torch.eye(2, dtype=torch.float64)))
