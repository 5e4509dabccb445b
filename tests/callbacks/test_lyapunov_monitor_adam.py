"""LyapunovExponentMonitor with Adam / AdamW and with SGD param groups of different LRs: λ against the core tangent
run by hand on the same trajectory, and against finite differences of two real optimiser runs."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks import HessianOperator
from lyapunov_callbacks.callbacks.lyapunov_monitor import LyapunovExponentMonitor
from lyapunov_callbacks.core.tangent import AdamTangentDynamics, TangentDynamics, tangent_dynamics
from recording_logger import RecordingLogger

EPS = 1e-7  # finite-difference perturbation (float64)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


OPTIMIZERS = {
    "adamw": lambda net: torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.0),
    "adamw_wd": lambda net: torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1),
    "adam_wd_two_groups": lambda net: torch.optim.Adam(
        [{"params": net[2].parameters(), "lr": 0.02, "betas": (0.8, 0.99)}, {"params": net[0].parameters()}],
        lr=0.05, weight_decay=0.01,
    ),
    # groups listed in reverse model order with different LRs: the flat order must be the operator's
    "sgd_two_lrs": lambda net: torch.optim.SGD(
        [{"params": net[2].parameters(), "lr": 0.9}, {"params": net[0].parameters(), "lr": 0.1}], momentum=0.5
    ),
}


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


class Regressor(L.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.net = _net()
        self.optimizer = optimizer

    def training_loss(self, batch):
        return _loss(self.net, batch)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer](self.net)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8 * n, 3, generator=g, dtype=torch.float64)
    y = torch.stack([torch.sin(2 * x.sum(1)), x[:, 0] * x[:, 2]], 1)
    return [(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]) for i in range(n)]


def _fit_with_monitor(optimizer: str, steps: int, window: int):
    data = _batches(steps)
    rec = RecordingLogger()
    monitor = LyapunovExponentMonitor(window=window, dtype="float64", seed=4)
    trainer = L.Trainer(
        max_steps=steps, callbacks=[monitor], logger=rec, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0, log_every_n_steps=1000,
    )
    model = Regressor(optimizer)
    loader = DataLoader(TensorDataset(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])), batch_size=8)
    trainer.fit(model, loader)
    return rec.series("lyapunov/lambda"), monitor, model, data


def _train_step(net, opt, batch) -> None:
    opt.zero_grad()
    _loss(net, batch).backward()
    opt.step()


@pytest.mark.parametrize("optimizer", ["adamw_wd", "adam_wd_two_groups"])
def test_monitor_lambda_equals_the_core_tangent_run_by_hand_on_the_same_trajectory(optimizer):
    steps, window = 12, 4
    lam, monitor, model, data = _fit_with_monitor(optimizer, steps, window)
    assert sorted(lam) == [3, 7, 11]
    assert isinstance(monitor.tangent, AdamTangentDynamics)

    net = _net()
    opt = OPTIMIZERS[optimizer](net)
    params = list(net.parameters())
    tangent = tangent_dynamics(opt, sum(p.numel() for p in params), params=params, seed=4, dtype=torch.float64)
    by_hand = {}
    for step, batch in enumerate(data):
        opt.zero_grad()
        _loss(net, batch).backward()  # the tangent reads .grad, as in on_before_optimizer_step
        with HessianOperator(net, _loss, batch) as H:
            tangent.step(H.matvec)
        opt.step()
        if (step + 1) % window == 0:
            by_hand[step] = tangent.flush_window()
    # the same trajectory (Lightning's fit and the plain loop), and the same λ to round-off
    for p, q in zip(model.net.parameters(), net.parameters()):
        assert torch.equal(p.detach(), q.detach())
    assert lam == pytest.approx(by_hand, rel=1e-10, abs=1e-12)
    assert torch.allclose(monitor.tangent.delta_v, tangent.delta_v, rtol=1e-10, atol=1e-14)


def _flat_state(net, opt, keys):
    params = list(net.parameters())
    out = [torch.cat([p.detach().reshape(-1) for p in params])]
    for key in keys:
        out.append(torch.cat([opt.state[p][key].reshape(-1) for p in params]))
    return torch.cat(out)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_wd", "adam_wd_two_groups", "sgd_two_lrs"])
def test_monitor_lambda_equals_finite_difference_growth_of_two_real_optimizer_runs(optimizer):
    """λ·N = log(‖Δstate_N‖ / ε) for two real runs from one state, one with θ perturbed by ε·δθ0 (δθ0 the
    monitor's seeded start vector, δm = δv = 0), the state being (θ, m, v) for Adam and (θ, m) for SGD."""
    steps = 6
    lam, monitor, _, data = _fit_with_monitor(optimizer, steps, window=steps)
    start = TangentDynamics(monitor.tangent.dim, seed=4, dtype=torch.float64).delta_theta
    keys = ["momentum_buffer"] if optimizer.startswith("sgd") else ["exp_avg", "exp_avg_sq"]

    a, b = _net(), _net()
    with torch.no_grad():
        offset = 0
        for p in b.parameters():
            p.add_(EPS * start[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    opt_a, opt_b = OPTIMIZERS[optimizer](a), OPTIMIZERS[optimizer](b)
    for batch in data:
        _train_step(a, opt_a, batch)
        _train_step(b, opt_b, batch)
    fd_growth = math.log(float((_flat_state(b, opt_b, keys) - _flat_state(a, opt_a, keys)).norm()) / EPS)
    assert lam[steps - 1] * steps == pytest.approx(fd_growth, rel=1e-6, abs=1e-6)
    assert abs(fd_growth) > 0.05  # far from zero (within 1e-6): a map that loses the perturbation would fail


def test_sgd_groups_with_different_lrs_follow_their_own_lr_at_each_step():
    """Core: two groups with their own LRs (and a scheduler that changes them differently) against the real
    SGD's finite difference, step by step."""
    net_a, net_b = _net(), _net()
    groups = lambda net: [{"params": net[2].parameters(), "lr": 0.3}, {"params": net[0].parameters(), "lr": 0.05}]
    opt_a, opt_b = torch.optim.SGD(groups(net_a), momentum=0.3), torch.optim.SGD(groups(net_b), momentum=0.3)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, [lambda t: 1.0 + t, lambda t: 0.5 ** t])
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, [lambda t: 1.0 + t, lambda t: 0.5 ** t])
    params = list(net_a.parameters())
    dim = sum(p.numel() for p in params)
    tangent = TangentDynamics.from_optimizer(opt_a, dim, params=params, seed=2, dtype=torch.float64)
    with torch.no_grad():
        offset = 0
        for p in net_b.parameters():
            p.add_(EPS * tangent.delta_theta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    scale = 1.0
    for batch in _batches(5):
        with HessianOperator(net_a, _loss, batch) as H:
            scale *= math.exp(tangent.step(H.matvec))
        for net, opt, sched in ((net_a, opt_a, sched_a), (net_b, opt_b, sched_b)):
            _train_step(net, opt, batch)
            sched.step()
        fd = _flat_state(net_b, opt_b, ["momentum_buffer"]) - _flat_state(net_a, opt_a, ["momentum_buffer"])
        got = torch.cat([tangent.delta_theta, tangent.delta_m]) * scale
        assert torch.allclose(got, fd / EPS, rtol=1e-5, atol=1e-6 * float(got.abs().max()))
    # one LR for all (the old behaviour) is a different map: the test tells them apart
    single = TangentDynamics.from_optimizer(opt_a, dim, params=params, seed=2, dtype=torch.float64)
    with HessianOperator(net_a, _loss, _batches(1)[0]) as H:
        per_group = copy.deepcopy(single)
        per_group.step(H.matvec)
        single.step(H.matvec, lr=opt_a.param_groups[0]["lr"])
    assert not torch.allclose(per_group.delta_theta, single.delta_theta, atol=1e-3)
    with pytest.raises(ValueError, match="lr=None"):
        TangentDynamics(dim).step(lambda v: v)


class SGDMaximize(Regressor):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, maximize=True)


class SubclassAdam(Regressor):
    def configure_optimizers(self):
        class MyAdam(torch.optim.Adam):
            pass

        return MyAdam(self.parameters(), lr=0.01)


class SGDSplitMomentum(Regressor):
    def configure_optimizers(self):
        return torch.optim.SGD(
            [{"params": self.net[0].parameters(), "momentum": 0.9}, {"params": self.net[2].parameters()}], lr=0.1
        )


@pytest.mark.parametrize(
    "model, match",
    [
        (SGDMaximize("adamw"), "maximize"),
        (SubclassAdam("adamw"), "MyAdam"),
        (SGDSplitMomentum("adamw"), "momentum"),
    ],
    ids=["sgd_maximize", "adam_subclass", "sgd_split_momentum"],
)
def test_what_the_core_refuses_fails_at_fit_start_with_one_value_error(model, match):
    steps = []

    class CountSteps(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    trainer = L.Trainer(max_steps=2, callbacks=[LyapunovExponentMonitor(window=1), CountSteps()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    data = _batches(2)
    with pytest.raises(ValueError, match=match) as excinfo:
        trainer.fit(model, DataLoader(TensorDataset(*map(torch.cat, zip(*data))), batch_size=8))
    assert "LyapunovExponentMonitor" in str(excinfo.value)
    assert steps == []


def test_adamw_state_dict_round_trip_restores_delta_theta_m_v_and_the_partial_window(tmp_path):
    data = _batches(8)
    loader = DataLoader(TensorDataset(*map(torch.cat, zip(*data))), batch_size=8)

    def trainer(callbacks, steps, **kw):
        return L.Trainer(max_steps=steps, callbacks=callbacks, logger=kw.pop("logger", False),
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         log_every_n_steps=1000, **kw)

    monitor = LyapunovExponentMonitor(window=4, dtype="float64")
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    trainer([monitor, ckpt], 6).fit(Regressor("adamw_wd"), loader)
    saved = monitor.state_dict()["tangent"]
    assert saved["optimizer"] == "adam" and saved["num_steps"] == 6
    assert monitor.state_dict()["window"]["steps"] == 2  # a partial window of 2 steps

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = resumed.tangent.state_dict()

    resumed, probe, rec = LyapunovExponentMonitor(window=4, dtype="float64"), Probe(), RecordingLogger()
    trainer([resumed, probe], 8, logger=rec, enable_checkpointing=False).fit(
        Regressor("adamw_wd"), loader, ckpt_path=str(tmp_path / "last.ckpt")
    )
    for key in ("delta_theta", "delta_m", "delta_v"):
        assert torch.equal(probe.state[key], saved[key])
    assert sorted(rec.series("lyapunov/lambda")) == [7]  # the partial window completed by steps 6 and 7
    assert resumed.tangent.num_steps == 8
