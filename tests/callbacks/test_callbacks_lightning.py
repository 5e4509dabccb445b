"""The callbacks under Lightning's conventions: several instances, refits, the LR of the step, accumulation,
non-finite steps, param groups, prog_bar and fast_dev_run, each against exact references."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR
from lyapunov_callbacks.core.tangent import TangentDynamics
from recording_logger import RecordingLogger


class RecordingSGD(torch.optim.SGD):
    """SGD that records the LR of every param group at each ``step()``: the LRs the steps really used."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.used: list[list[float]] = []

    def step(self, closure=None):
        loss = super().step(closure)  # Lightning passes the closure that runs forward/backward
        self.used.append([float(g["lr"]) for g in self.param_groups])
        return loss


class TanhMLP(L.LightningModule):
    """Float64 tanh MLP, mean cross-entropy; ``scheduler`` adds a per-step LambdaLR, ``group_lrs`` two groups."""

    def __init__(self, hidden: int = 3, lr: float = 0.1, scheduler: bool = False, group_lrs=None, poison_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
        self.lr, self.scheduler, self.group_lrs, self.poison_at = lr, scheduler, group_lrs, poison_at

    def training_loss(self, batch):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.poison_at is not None and self.trainer.global_step == self.poison_at:
            loss = loss * float("nan")  # the measured loss only: training_step trains on the finite one
        return loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.group_lrs is not None:
            groups = [{"params": self.net[0].parameters(), "lr": self.group_lrs[0]},
                      {"params": self.net[2].parameters(), "lr": self.group_lrs[1]}]
            self.opt = RecordingSGD(groups, lr=self.group_lrs[0])
        else:
            self.opt = RecordingSGD(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return self.opt
        sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1.0 + 0.5 * s))
        return {"optimizer": self.opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader(n: int = 48, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _trainer(callbacks, logger=None, max_steps: int = 6, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=logger if logger is not None else False,
        enable_checkpointing=kw.pop("enable_checkpointing", False), enable_progress_bar=kw.pop("progress", False),
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
        log_every_n_steps=1000, **kw,
    )


class StepRecorder(L.Callback):
    """Records, in ``on_before_optimizer_step`` (first in the list), the pre-step weights and the step's micro-batches."""

    def __init__(self) -> None:
        self.micro: dict[int, list] = {}
        self.weights: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.micro.setdefault(trainer.global_step, []).append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.weights[trainer.global_step] = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone()


def _exact_hessian(model: TanhMLP, flat: torch.Tensor, batches) -> torch.Tensor:
    """Hessian of the mean of the micro-batch losses at the flat weights ``flat`` (autograd.functional)."""
    names = [n for n, _ in model.net.named_parameters()]
    shapes = [p.shape for p in model.net.parameters()]

    def loss(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        losses = [nn.functional.cross_entropy(torch.func.functional_call(model.net, params, (x,)), y) for x, y in batches]
        return sum(losses) / len(losses)

    return torch.autograd.functional.hessian(loss, flat)


# ------------------------------------------------------------------------------------------------ several instances
def test_two_hessian_monitors_keep_apart_tags_and_state_through_a_checkpoint(tmp_path):
    fast = HessianEigenvalueMonitor(every_n_steps=2, k=1, tol=1e-8, dtype="float64")
    full = HessianEigenvalueMonitor(every_n_steps=4, k=3, tol=1e-8, dtype="float64", prefix="hessian_top3")
    assert fast.state_key != full.state_key
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    rec = RecordingLogger()
    _trainer([fast, full, ckpt], logger=rec, max_steps=5, enable_checkpointing=True).fit(TanhMLP(), _loader())
    assert sorted(rec.series("hessian/h0")) == [0, 2, 4] and sorted(rec.series("hessian_top3/h0")) == [0, 4]
    assert "hessian/h1" not in {k for _, m in rec.records for k in m}
    assert sorted(rec.series("hessian_top3/h2")) == [0, 4]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[fast.state_key]["tracker"]["eigenvectors"].shape[1] == 1
    assert saved[full.state_key]["tracker"]["eigenvectors"].shape[1] == 3

    fast2 = HessianEigenvalueMonitor(every_n_steps=2, k=1, tol=1e-8, dtype="float64")
    full2 = HessianEigenvalueMonitor(every_n_steps=4, k=3, tol=1e-8, dtype="float64", prefix="hessian_top3")

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.vecs = (fast2._estimates.tracker.eigenvectors.clone(), full2._estimates.tracker.eigenvectors.clone())

    probe = AtStart()
    _trainer([fast2, full2, probe], max_steps=6).fit(TanhMLP(), _loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    torch.testing.assert_close(probe.vecs[0], saved[fast.state_key]["tracker"]["eigenvectors"], rtol=0, atol=0)
    torch.testing.assert_close(probe.vecs[1], saved[full.state_key]["tracker"]["eigenvectors"], rtol=0, atol=0)
    assert fast2._last_step == 4 and full2._last_step == 4  # restored: step 4 is not measured again


def test_prefix_is_checked():
    with pytest.raises(ValueError, match="prefix"):
        HessianEigenvalueMonitor(prefix="hessian/")
    with pytest.raises(ValueError, match="prefix"):
        LyapunovExponentMonitor(prefix="")


# ------------------------------------------------------------------------------------------------ refits
def test_refit_with_the_same_callbacks_on_another_model_and_on_the_same_architecture():
    def callbacks():
        return [QuasiNewtonLR(every_n_steps=2), HessianEigenvalueMonitor(every_n_steps=2, tol=1e-8),
                LyapunovExponentMonitor(window=3)]

    shared = callbacks()
    _trainer(shared, max_steps=3).fit(TanhMLP(hidden=3), _loader())
    _trainer(shared, max_steps=3).fit(TanhMLP(hidden=7), _loader())  # another parameter count
    rec_shared, rec_fresh = RecordingLogger(), RecordingLogger()
    _trainer(shared, logger=rec_shared, max_steps=3).fit(TanhMLP(hidden=7), _loader())
    _trainer(callbacks(), logger=rec_fresh, max_steps=3).fit(TanhMLP(hidden=7), _loader())
    assert rec_shared.series("quasi_newton/warmup_hvps")[0] > 0  # the warm-up ran again
    for tag in ("quasi_newton/warmup_hvps", "quasi_newton/lr", "hessian/h0", "lyapunov/lambda"):
        fresh = rec_fresh.series(tag)
        assert fresh, tag
        assert rec_shared.series(tag) == pytest.approx(fresh, rel=1e-9, abs=1e-12), tag


# ------------------------------------------------------------------------------------------------ LR of the step
@pytest.mark.parametrize("order", ["monitor_first", "monitor_last"])
def test_logged_lr_and_stability_use_the_lr_of_the_step_with_quasi_newton(order):
    monitor = HessianEigenvalueMonitor(every_n_steps=1, tol=1e-8, dtype="float64")
    lyap = LyapunovExponentMonitor(window=1)
    qn = QuasiNewtonLR(every_n_steps=2, max_lr=0.5)
    cbs = [monitor, lyap, qn] if order == "monitor_first" else [qn, monitor, lyap]
    rec, model = RecordingLogger(), TanhMLP()
    _trainer(cbs, logger=rec, max_steps=4).fit(model, _loader())
    used = [lrs[0] for lrs in model.opt.used]
    assert used[0] != pytest.approx(0.1)  # the warm-up changed the configured LR before the first step
    lr, stability, h0 = rec.series("optim/lr"), rec.series("hessian/stability"), rec.series("hessian/h0")
    for step in range(4):
        assert lr[step] == used[step]
        assert stability[step] == pytest.approx(used[step] * h0[step], rel=1e-12)


def test_logged_lr_follows_a_per_step_scheduler():
    monitor = HessianEigenvalueMonitor(every_n_steps=1, tol=1e-8, dtype="float64")
    lyap = LyapunovExponentMonitor(window=1)
    rec, model = RecordingLogger(), TanhMLP(scheduler=True)
    _trainer([monitor, lyap], logger=rec, max_steps=4).fit(model, _loader())
    used = [lrs[0] for lrs in model.opt.used]
    assert used == pytest.approx([0.1 / (1 + 0.5 * s) for s in range(4)], rel=1e-12)
    assert [rec.series("optim/lr")[s] for s in range(4)] == used


# ------------------------------------------------------------------------------------------------ accumulation
def test_accumulated_step_hessian_and_lambda_against_exact_hessian_of_the_mean_loss():
    k, steps, lr = 2, 3, 0.3
    recorder = StepRecorder()
    monitor = HessianEigenvalueMonitor(every_n_steps=1, k=2, tol=1e-10, max_iter=200, dtype="float64")
    lyap = LyapunovExponentMonitor(window=steps, seed=3)
    rec, model = RecordingLogger(), TanhMLP(lr=lr)
    _trainer([recorder, monitor, lyap], logger=rec, max_steps=steps, accumulate_grad_batches=k).fit(model, _loader())
    assert len(model.opt.used) == steps and all(len(recorder.micro[s]) == k for s in range(steps))
    dim = sum(p.numel() for p in model.parameters())
    ref = TangentDynamics(dim, seed=3, dtype=torch.float64)
    for step in range(steps):
        H = _exact_hessian(model, recorder.weights[step], recorder.micro[step])
        top = torch.linalg.eigvalsh(H).flip(0)[:2]
        assert rec.series("hessian/h0")[step] == pytest.approx(float(top[0]), rel=1e-8)
        assert rec.series("hessian/h1")[step] == pytest.approx(float(top[1]), rel=1e-6)
        # The first micro-batch alone (what a per-batch measurement would see) is another operator.
        h_first = float(torch.linalg.eigvalsh(_exact_hessian(model, recorder.weights[step], recorder.micro[step][:1]))[-1])
        assert abs(h_first - float(top[0])) > 1e-4 * abs(float(top[0]))
        ref.step(lambda v, H=H: H @ v, lr)
    assert rec.series("lyapunov/lambda")[steps - 1] == pytest.approx(ref.flush_window(), rel=1e-9)


# ------------------------------------------------------------------------------------------------ non-finite steps
def test_a_non_finite_tangent_step_is_skipped_and_counted_not_poisoning_lambda():
    steps, lr, poison = 4, 0.3, 1
    recorder = StepRecorder()
    # Only training_loss is poisoned (training_step trains on the finite loss), so the products must come
    # from the operator, which evaluates training_loss, not from the training step's graph.
    lyap = LyapunovExponentMonitor(window=2, seed=5, reuse_training_graph=False)
    rec, model = RecordingLogger(), TanhMLP(lr=lr, poison_at=poison)
    with pytest.warns(RuntimeWarning, match="skipped_steps"):
        _trainer([recorder, lyap], logger=rec, max_steps=steps).fit(model, _loader())
    dim = sum(p.numel() for p in model.parameters())
    ref = TangentDynamics(dim, seed=5, dtype=torch.float64)
    growths = {}
    for step in range(steps):
        if step != poison:
            H = _exact_hessian(model, recorder.weights[step], recorder.micro[step])
            growths[step] = ref.step(lambda v, H=H: H @ v, lr)
    lam = rec.series("lyapunov/lambda")
    assert sorted(lam) == [1, 3]
    assert lam[1] == pytest.approx(growths[0], rel=1e-9)  # the window's only finite step
    assert lam[3] == pytest.approx((growths[2] + growths[3]) / 2, rel=1e-9)
    assert rec.series("lyapunov/skipped_steps") == {1: 1.0, 3: 1.0}
    assert math.isfinite(lyap.tangent.lyapunov_exponent)
    assert lyap.tangent.lyapunov_exponent == pytest.approx(sum(growths.values()) / 3, rel=1e-9)


# ------------------------------------------------------------------------------------------------ param groups
def test_quasi_newton_keeps_the_ratio_of_param_group_lrs_and_lambda_runs_with_different_lrs():
    qn = QuasiNewtonLR(every_n_steps=2, max_lr=5.0)
    model = TanhMLP(group_lrs=(0.1, 0.02))
    _trainer([qn], max_steps=3).fit(model, _loader())
    assert len(model.opt.used) == 3 and model.opt.used[0][0] != pytest.approx(0.1)
    for first, second in model.opt.used:
        assert second == pytest.approx(first * 0.2, rel=1e-12)  # both groups scaled by the same factor
    assert model.opt.used[-1][0] == qn.rule.lr == pytest.approx(1.0 / qn.rule.h0, rel=1e-12)  # α = 1/h0 on the first group
    # each group's own LR enters the tangent map (checked against finite differences in test_lyapunov_monitor_adam)
    lam = LyapunovExponentMonitor(window=2)
    _trainer([lam], max_steps=2).fit(TanhMLP(group_lrs=(0.1, 0.02)), _loader())
    assert math.isfinite(lam.last_metrics["lyapunov/lambda"])


# ------------------------------------------------------------------------------------------------ prog_bar, fast_dev_run
def test_prog_bar_shows_h0_lambda_and_the_quasi_newton_lr():
    cbs = [QuasiNewtonLR(every_n_steps=2, prog_bar=True), HessianEigenvalueMonitor(every_n_steps=1, prog_bar=True),
           LyapunovExponentMonitor(window=1, prog_bar=True), HessianEigenvalueMonitor(every_n_steps=1, prefix="quiet")]
    trainer = _trainer(cbs, max_steps=2, progress=True)
    trainer.fit(TanhMLP(), _loader())
    shown = set(trainer.progress_bar_metrics)
    assert {"hessian/h0", "lyapunov/lambda", "quasi_newton/lr"} <= shown and "quiet/h0" not in shown


def test_fast_dev_run_runs_every_callback_on_a_minimal_budget(caplog):
    rec = RecordingLogger()
    cbs = [QuasiNewtonLR(warmup_tol=1e-12), HessianEigenvalueMonitor(tol=1e-12), LyapunovExponentMonitor(window=20)]
    trainer = L.Trainer(fast_dev_run=True, callbacks=cbs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.loggers = [rec]
    with caplog.at_level("INFO"):
        trainer.fit(TanhMLP(), _loader())
    assert rec.series("quasi_newton/warmup_hvps")[0] <= 3
    assert rec.series("hessian/num_hvps")[0] <= 3
    assert 0 in rec.series("lyapunov/lambda")  # the one-step window ran
    assert caplog.text.count("fast_dev_run") >= 3


@pytest.mark.parametrize("callback", [HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR])
def test_a_compiled_module_is_refused_at_setup_before_pytorch_2_6(callback, monkeypatch):
    # Before torch.compiler.set_stance (PyTorch 2.6) a compiled module cannot be run eagerly on demand; from 2.6 on
    # it is measured through its eager code (tests/test_compiled.py).
    monkeypatch.setattr("lyapunov_callbacks.core.compiled.can_evaluate_eagerly", lambda: False)
    model = TanhMLP()
    model.net = torch.compile(model.net)  # lazy: nothing is compiled before the first call
    with pytest.raises(ValueError, match=r"torch.compile'd model \(compiled: net\).*set_stance \(PyTorch >= 2.6\)"):
        _trainer([callback()], max_steps=1).fit(model, _loader())
