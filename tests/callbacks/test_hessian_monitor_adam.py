"""HessianEigenvalueMonitor with Adam / AdamW / SGD: pre_h0, pre_stability and batch_sharpness against exact
Hessians (torch.autograd.functional.hessian) and the optimiser state at the measured step."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks.callbacks.hessian_monitor import HessianEigenvalueMonitor
from recording_logger import RecordingLogger


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05),
    "adam_amsgrad": lambda params: torch.optim.Adam(params, lr=0.02, betas=(0.8, 0.95), eps=1e-5, amsgrad=True),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.5),
}


class Regressor(L.LightningModule):
    """Linear(3,4)-tanh-Linear(4,2), float64, MSE: 26 parameters, exact Hessian by autograd.functional."""

    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        self.optimizer = optimizer

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer](self.parameters())


class Capture(L.Callback):
    """Before the monitor: the weights, batch and optimiser state at each step's on_before_optimizer_step."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[dict, object, dict]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = copy.deepcopy(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.at[trainer.global_step] = (weights, self._batch, copy.deepcopy(optimizer.state_dict()))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(48, 3, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.stack([torch.sin(x.sum(1)), x[:, 0] * x[:, 1]], 1))


def _fit(callbacks, model, max_steps: int, logger=None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=logger if logger is not None else False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=1, num_sanity_val_steps=0, log_every_n_steps=1000,
    )
    trainer.fit(model, DataLoader(_data(), batch_size=8, shuffle=False))
    return trainer


def _exact(weights, batch):
    """Flat gradient and exact Hessian of the batch loss at ``weights``."""
    model = Regressor()
    model.load_state_dict(weights)
    names = [n.removeprefix("net.") for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        chunks, i = {}, 0
        for n, s in zip(names, shapes):
            chunks[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.mse_loss(torch.func.functional_call(model.net, chunks, (batch[0],)), batch[1])

    flat = flat0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(flat), flat)
    return grad, torch.autograd.functional.hessian(loss_of, flat0)


def _preconditioner(opt_state, optimizer: str) -> torch.Tensor:
    """diag(√v̂ + ε) from a saved Adam state dict (model parameter order = the optimiser's here)."""
    group = opt_state["param_groups"][0]
    beta2, eps = group["betas"][1], group["eps"]
    key = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
    pieces = []
    for i in group["params"]:
        st = opt_state["state"][i]
        pieces.append((st[key].reshape(-1) / (1 - beta2 ** float(st["step"]))).sqrt() + eps)
    return torch.cat(pieces)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_pre_h0_pre_stability_and_batch_sharpness_match_exact_references(optimizer):
    capture, rec = Capture(), RecordingLogger()
    monitor = HessianEigenvalueMonitor(every_n_steps=2, tol=1e-8, pre_h0=True, batch_sharpness=True)
    _fit([capture, monitor], Regressor(optimizer), max_steps=7, logger=rec)
    group = capture.at[0][2]["param_groups"][0]
    adam = optimizer != "sgd_momentum"
    factor = (1 + group["betas"][0]) / (1 - group["betas"][0]) if adam else 1 + group["momentum"]

    assert sorted(s for s, _ in rec.records) == [0, 2, 4, 6]
    for step in (0, 2, 4, 6):
        weights, batch, opt_state = capture.at[step]
        logged = rec.at(step)
        grad, H = _exact(weights, batch)
        h0 = float(torch.linalg.eigvalsh(H)[-1])
        assert logged["hessian/h0"] == pytest.approx(h0, rel=1e-3)
        # batch sharpness: the Rayleigh quotient of the step's Hessian along the step's gradient
        assert logged["hessian/batch_sharpness"] == pytest.approx(float(grad @ H @ grad / (grad @ grad)), rel=1e-8)
        if adam:
            # before Adam's first step there is no exp_avg_sq: P is what that step divides by, |g| + eps
            p_diag = (grad.abs() + opt_state["param_groups"][0]["eps"]) if step == 0 else _preconditioner(opt_state, optimizer)
            d = p_diag.rsqrt()
            pre = float(torch.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1])
            assert abs(pre - h0) > 0.1 * h0  # the preconditioner really changes the value tested
            assert logged["hessian/pre_num_hvps"] >= 1
        else:  # P = I: pre_h0 is h0, taken from the h0 solve
            pre = h0
            assert logged["hessian/pre_num_hvps"] == 0
        assert logged["hessian/pre_h0"] == pytest.approx(pre, rel=1e-3)
        lr = group["lr"]
        assert logged["hessian/pre_stability"] == pytest.approx(lr * logged["hessian/pre_h0"] / factor, rel=1e-12)


def test_pre_h0_is_on_by_default_for_adam_only_and_warm_starts_from_its_own_vector(monkeypatch):
    import lyapunov_callbacks.core.eigen as eigen

    calls = []  # (init, result) of each preconditioned solve

    def spy_lanczos(op, **kw):
        res = eigen_lanczos(op, **kw)
        if type(op).__name__ == "PreconditionedOperator":
            calls.append((kw["init"], res.eigenvectors.clone(), type(op).__name__))
        return res

    eigen_lanczos = eigen.lanczos
    monkeypatch.setattr(eigen, "lanczos", spy_lanczos)
    runs = {}
    for optimizer in ("adamw", "sgd_momentum"):
        rec = RecordingLogger()
        monitor = HessianEigenvalueMonitor(every_n_steps=1, tol=1e-6)
        _fit([monitor], Regressor(optimizer), max_steps=6, logger=rec)
        runs[optimizer] = (rec, monitor)
    rec, monitor = runs["adamw"]
    assert [s for s, m in rec.records if "hessian/pre_h0" in m] == [0, 1, 2, 3, 4, 5]
    assert all("hessian/batch_sharpness" not in m for _, m in rec.records)  # opt-in
    # six preconditioned solves (AdamW steps 0-5, none for SGD): cold first, then each from the last vector
    assert [c[2] for c in calls] == ["PreconditionedOperator"] * 6
    assert calls[0][0] is None
    for (init, _, _), (_, previous, _) in zip(calls[1:], calls[:-1]):
        assert torch.equal(init, previous)
    # that second warm start is an eigenvector of P^-1/2 H P^-1/2, not the plain Hessian's
    pre_vec, h_vec = monitor._estimates.pre_tracker.eigenvectors[:, 0], monitor._estimates.tracker.eigenvectors[:, 0]
    assert abs(float(pre_vec @ h_vec)) < 0.99
    assert monitor.state_dict()["pre_tracker"]["eigenvectors"].shape == (26, 1)
    rec_sgd, _ = runs["sgd_momentum"]
    assert all("hessian/pre_h0" not in m for _, m in rec_sgd.records)


class RMSpropRegressor(Regressor):
    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=0.01)


class SplitBetas(Regressor):
    def configure_optimizers(self):
        return torch.optim.Adam([
            {"params": self.net[0].parameters(), "betas": (0.9, 0.999)},
            {"params": self.net[2].parameters(), "betas": (0.5, 0.999)},
        ])


@pytest.mark.parametrize(
    "model, kwargs, match",
    [
        (RMSpropRegressor(), {"pre_h0": True}, "pre_h0=True.*RMSprop"),
        (SplitBetas(), {}, "pre_h0=True.*betas"),
    ],
    ids=["rmsprop", "split_beta1"],
)
def test_pre_h0_settings_it_cannot_measure_fail_at_fit_start(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit([HessianEigenvalueMonitor(**kwargs)], model, max_steps=1)
    # auto (None) is off for an optimiser without a known preconditioner: h0 alone
    rec = RecordingLogger()
    if isinstance(model, RMSpropRegressor):
        _fit([HessianEigenvalueMonitor(every_n_steps=1)], RMSpropRegressor(), max_steps=2, logger=rec)
        assert all("hessian/pre_h0" not in m and math.isfinite(m["hessian/h0"]) for _, m in rec.records)


@pytest.mark.parametrize("kwargs, param", [({"pre_h0": "yes"}, "pre_h0"), ({"batch_sharpness": 1}, "batch_sharpness")])
def test_invalid_flags_raise_naming_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        HessianEigenvalueMonitor(**kwargs)
