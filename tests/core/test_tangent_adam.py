"""AdamTangentDynamics against finite differences of the real torch.optim.Adam / AdamW, and its validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lyapunov_callbacks import HessianOperator, TangentDynamics
from lyapunov_callbacks.core.tangent import AdamTangentDynamics, tangent_dynamics

EPS = 1e-7  # perturbation of the finite difference (float64): second-order error ~ EPS, rounding ~ 1e-16 / EPS
STEPS = 20


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64))
            for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def train_step(model, opt, batch):
    opt.zero_grad()
    loss_fn(model, batch).backward()
    opt.step()


def flat_state(opt, params, key):
    return torch.cat([opt.state[p][key].reshape(-1) for p in params])


CASES = {
    "adamw": (torch.optim.AdamW, dict(lr=0.02, weight_decay=0.0)),
    "adamw_wd": (torch.optim.AdamW, dict(lr=0.02, weight_decay=0.1)),
    "adam": (torch.optim.Adam, dict(lr=0.02)),
    "adam_wd": (torch.optim.Adam, dict(lr=0.02, weight_decay=0.05)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=0.02, weight_decay=0.1, amsgrad=True)),
    "adam_maximize": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.05, maximize=True)),
    "adam_foreach": (torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, foreach=True)),
}


def group_kwargs(model, kwargs, split):
    """One group, or two groups (listed in reverse model order) with different LR and betas."""
    if not split:
        return [{"params": list(model.parameters())}]
    return [
        {"params": list(model[2].parameters()), "lr": kwargs["lr"] * 0.5, "betas": (0.85, 0.995)},
        {"params": list(model[0].parameters())},
    ]


@pytest.mark.parametrize("warmup", [0, 5], ids=["from_step0", "after_5_steps"])
@pytest.mark.parametrize("split", [False, True], ids=["one_group", "two_groups"])
@pytest.mark.parametrize("case", list(CASES))
def test_tangent_equals_finite_difference_of_the_real_optimizer(case, split, warmup):
    """(state_b − state_a)/ε of two real runs from one state, b perturbed by εδ, equals the propagated tangent."""
    cls, kwargs = CASES[case]
    a = mlp()
    opt_a = cls(group_kwargs(a, kwargs, split), **kwargs)
    data = batches(warmup + STEPS)
    for batch in data[:warmup]:
        train_step(a, opt_a, batch)
    params_a = list(a.parameters())  # the flat order of HessianOperator (model order, not the groups')
    dim = sum(p.numel() for p in params_a)
    tangent = tangent_dynamics(opt_a, dim, params=params_a, seed=3, dtype=torch.float64)
    assert isinstance(tangent, AdamTangentDynamics)

    b = copy.deepcopy(a)
    opt_b = cls(group_kwargs(b, kwargs, split), **kwargs)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    params_b = list(b.parameters())
    gen = torch.Generator().manual_seed(7)
    if warmup:  # perturb the whole state (θ, m, v[, v_max]); δv = v ⊙ r: v stays positive, εδv/v = O(ε)
        v_a = flat_state(opt_a, params_a, "exp_avg_sq")
        tangent.delta_m = torch.randn(dim, generator=gen, dtype=torch.float64)
        tangent.delta_v = v_a * torch.randn(dim, generator=gen, dtype=torch.float64)
        if tangent.delta_vmax is not None:
            tangent.delta_vmax = tangent.delta_v.clone()
    start = tangent._state_vectors()
    norm = math.sqrt(sum(float(x.pow(2).sum()) for x in start))
    tangent.delta_theta, tangent.delta_m, tangent.delta_v = (x / norm for x in start[:3])
    if tangent.delta_vmax is not None:
        tangent.delta_vmax = tangent.delta_vmax / norm
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if tangent.delta_vmax is not None else [])
    with torch.no_grad():
        offset = 0
        for p in params_b:
            n = p.numel()
            p.add_(EPS * tangent.delta_theta[offset:offset + n].view_as(p))
            if warmup:
                vectors = [tangent.delta_m, tangent.delta_v] + ([tangent.delta_vmax] if len(keys) == 3 else [])
                for key, d in zip(keys, vectors):
                    opt_b.state[p][key].add_(EPS * d[offset:offset + n].view_as(p))
            offset += n

    scale = 1.0
    worst = 0.0
    for batch in data[warmup:]:
        opt_a.zero_grad()
        with HessianOperator(a, loss_fn, batch) as H:
            scale *= math.exp(tangent.step(H.matvec, gradient=H.gradient()))
        train_step(a, opt_a, batch)
        train_step(b, opt_b, batch)
        fd = [torch.cat([(pb.detach() - pa.detach()).reshape(-1) for pa, pb in zip(params_a, params_b)]) / EPS]
        fd += [(flat_state(opt_b, params_b, k) - flat_state(opt_a, params_a, k)) / EPS for k in keys]
        for got, want in zip(fd, tangent._state_vectors()):
            want = want * scale
            err = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
            worst = max(worst, err)
    assert worst < 1e-6, f"largest relative difference {worst:.2e}"


def test_tangent_reads_grad_when_no_gradient_is_given_and_lr_overrides_groups():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    data = batches(4)
    for batch in data[:3]:
        train_step(model, opt, batch)
    dim = sum(p.numel() for p in model.parameters())
    t1 = tangent_dynamics(opt, dim, seed=1, dtype=torch.float64)
    t2 = tangent_dynamics(opt, dim, seed=1, dtype=torch.float64)
    t3 = tangent_dynamics(opt, dim, seed=1, dtype=torch.float64)
    opt.zero_grad()
    with HessianOperator(model, loss_fn, data[3]) as H:
        with pytest.raises(ValueError, match="no parameter has a .grad"):
            t1.step(H.matvec)
        loss_fn(model, data[3]).backward()
        g1 = t1.step(H.matvec)
        g2 = t2.step(H.matvec, gradient=H.gradient())
        g3 = t3.step(H.matvec, lr=0.02, gradient=H.gradient())
    assert g1 == pytest.approx(g2, rel=1e-12) and g1 == pytest.approx(g3, rel=1e-12)
    assert torch.allclose(t1.delta_theta, t2.delta_theta, rtol=1e-10, atol=1e-14)
    # A different LR gives a different map.
    t4 = tangent_dynamics(opt, dim, seed=1, dtype=torch.float64)
    with HessianOperator(model, loss_fn, data[3]) as H:
        assert t4.step(H.matvec, lr=0.2, gradient=H.gradient()) != pytest.approx(g1, rel=1e-6)


def test_validation_and_state_dict():
    model = mlp()
    dim = sum(p.numel() for p in model.parameters())
    with pytest.raises(TypeError, match="SGD, torch.optim.Adam and torch.optim.AdamW.*RMSprop"):
        tangent_dynamics(torch.optim.RMSprop(model.parameters()), dim)

    class MyAdam(torch.optim.Adam):
        pass

    with pytest.raises(TypeError, match="MyAdam"):
        tangent_dynamics(MyAdam(model.parameters()), dim)
    with pytest.raises(ValueError, match="dim=4"):
        tangent_dynamics(torch.optim.Adam(model.parameters()), 4)
    other = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="params\\[0\\].*not a trainable parameter"):
        tangent_dynamics(torch.optim.Adam(model.parameters()), dim, params=list(other.parameters()))
    with pytest.raises(ValueError, match="lr"):
        tangent_dynamics(torch.optim.Adam(model.parameters()), dim).step(lambda v: v, lr=-1.0, gradient=torch.zeros(dim))
    assert isinstance(tangent_dynamics(torch.optim.SGD(model.parameters(), lr=0.1), dim), TangentDynamics)

    opt = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    data = batches(6)
    t1 = tangent_dynamics(opt, dim, seed=2, dtype=torch.float64)
    for batch in data[:3]:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        with HessianOperator(model, loss_fn, batch) as H:
            t1.step(H.matvec)
        opt.step()
    state = t1.state_dict()
    t2 = tangent_dynamics(opt, dim, seed=99, dtype=torch.float64)
    t2.load_state_dict(state)
    for batch in data[3:]:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        with HessianOperator(model, loss_fn, batch) as H:
            assert t1.step(H.matvec) == t2.step(H.matvec)
        opt.step()
    assert t1.lyapunov_exponent == t2.lyapunov_exponent and t2.num_steps == 6
    with pytest.raises(ValueError, match="amsgrad"):
        tangent_dynamics(torch.optim.Adam(model.parameters()), dim).load_state_dict(state)
    with pytest.raises(ValueError, match="SGD"):
        t2.load_state_dict(TangentDynamics(dim).state_dict())


class PartlyUsed(nn.Module):
    """An MLP and a parameter the loss never touches: its .grad stays None and Adam skips it."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return self.net(x)


def test_parameters_without_grad_are_skipped_as_adam_skips_them():
    a = PartlyUsed()
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.02, weight_decay=0.1)
    data = batches(3 + STEPS)
    for batch in data[:3]:
        train_step(a, opt_a, batch)
    assert a.unused.grad is None and a.unused not in opt_a.state
    params_a = list(a.parameters())
    dim = sum(p.numel() for p in params_a)
    tangent = tangent_dynamics(opt_a, dim, params=params_a, seed=5, dtype=torch.float64)
    b = copy.deepcopy(a)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.02, weight_decay=0.1)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    params_b = list(b.parameters())
    with torch.no_grad():
        offset = 0
        for p in params_b:
            p.add_(EPS * tangent.delta_theta[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    scale = 1.0
    for batch in data[3:]:
        opt_a.zero_grad()
        loss_fn(a, batch).backward()
        with HessianOperator(a, loss_fn, batch) as H:
            scale *= math.exp(tangent.step(H.matvec))  # gradient read from .grad; `unused` has none
        opt_a.step()
        train_step(b, opt_b, batch)
    fd = torch.cat([(pb.detach() - pa.detach()).reshape(-1) for pa, pb in zip(params_a, params_b)]) / EPS
    want = tangent.delta_theta * scale
    assert float(torch.linalg.vector_norm(fd - want) / torch.linalg.vector_norm(want)) < 1e-6
    # The skipped coordinates kept their start value (wd would have shrunk them by (1 - α wd)^20 otherwise).
    start = tangent_dynamics(opt_a, dim, params=params_a, seed=5, dtype=torch.float64).delta_theta
    first = sum(p.numel() for p in params_a[:[id(p) for p in params_a].index(id(a.unused))])
    assert torch.allclose(want[first:first + 3], start[first:first + 3], rtol=1e-12, atol=0)
