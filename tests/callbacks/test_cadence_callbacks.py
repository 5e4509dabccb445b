"""``every_n_steps="auto"`` in real fits: the monitor and QuasiNewtonLR, a constructed sharpening, determinism, CLI."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks import HessianEigenvalueMonitor, QuasiNewtonLR
from lyapunov_callbacks.core.checks import NotAnIntegerError, NotPositiveError
from lyapunov_callbacks.cli import run_cli
from lyapunov_callbacks.core.quasi_newton_rule import QuasiNewtonRule
from recording_logger import RecordingLogger

SPECTRUM = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
_Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
A = _Q @ torch.diag(SPECTRUM) @ _Q.T
ONSET, RATE = 135, 0.02
CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


def sharpness(step: int) -> float:
    """Curvature scale of :class:`SharpeningQuadratic`: 1 before ``ONSET``, then growing by 2 % per step."""
    return math.exp(RATE * max(0, step - ONSET))


class SharpeningQuadratic(L.LightningModule):
    """Loss ½ s(t) θᵀAθ: its Hessian is s(t)·A, so h0 = 5 s(t) exactly, whatever θ is."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(1.0, 2.0, 5, dtype=torch.float64))

    def training_loss(self, batch):
        return 0.5 * sharpness(self.trainer.global_step) * self.theta @ (A @ self.theta)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def _trainer(callbacks, max_steps, logger=False):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )


def _zeros(n):
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def test_monitor_auto_reacts_to_a_constructed_sharpening_within_one_interval():
    logger = RecordingLogger()
    monitor = HessianEigenvalueMonitor(every_n_steps="auto", min_every=2, max_every=32, tol=1e-8, dtype="float64")
    _trainer([monitor], ONSET + 60, logger=logger).fit(SharpeningQuadratic(), _zeros(ONSET + 60))
    h0 = logger.series("hessian/h0")
    every = logger.series("hessian/every_n_steps")
    steps = sorted(h0)
    assert steps == sorted(every)
    for s in steps:  # every logged value is the exact h0 of its step
        assert h0[s] == pytest.approx(5.0 * sharpness(s), rel=1e-6)
    # the scheduled interval is within the bounds, and the next estimate comes no later than it says
    assert all(2 <= every[s] <= 32 for s in steps)
    assert all(b - a <= every[a] for a, b in zip(steps, steps[1:]))
    # Flat phase: the interval doubled up to max_every.
    flat = [s for s in steps if s <= ONSET]
    assert [int(every[s]) for s in flat[:6]] == [2, 4, 8, 16, 32, 32] and every[flat[-1]] == 32
    # The first estimate after the onset (step 158, h0 up 58 % since step 126) comes within one interval of it
    # and schedules a shorter one; from the third on, the intervals are at most 2·drift_tol/rate = 5 steps (h0
    # moves 2 % per step).
    after = [s for s in steps if s > ONSET]
    assert after[0] - ONSET <= 32
    assert every[after[0]] < 32
    assert max(every[s] for s in after[2:]) <= 2 * 0.05 / RATE


class SpikingQuadratic(SharpeningQuadratic):
    """½θᵀAθ, ten times larger at step ``SPIKE`` alone (a loss spike)."""

    def training_loss(self, batch):
        return 0.5 * (10.0 if self.trainer.global_step == SPIKE else 1.0) * self.theta @ (A @ self.theta)


SPIKE = 57


@pytest.mark.parametrize("loss_rise", [1.0, None])
def test_monitor_auto_loss_spike_brings_the_next_estimate_forward(loss_rise):
    logger = RecordingLogger()
    monitor = HessianEigenvalueMonitor(every_n_steps="auto", min_every=4, max_every=32, loss_rise=loss_rise,
                                       tol=1e-8, dtype="float64")
    _trainer([monitor], 80, logger=logger).fit(SpikingQuadratic(), _zeros(80))
    steps = sorted(logger.series("hessian/h0"))
    if loss_rise is None:
        assert steps == [0, 4, 12, 28, 60]
        return
    # the spike at step 57 is seen in its own step's loss: step 58 is measured, before the scheduled 60
    assert steps == [0, 4, 12, 28, 58] + [s for s in steps if s > 58]
    assert monitor._cadence.loss_triggers == 1
    # h0 did not move (5 everywhere but at the spike's own step, not measured): the schedule grows on from there
    assert logger.series("hessian/every_n_steps")[58] == 32


def _mlp_fit(callbacks, seed=0, steps=40):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))

        def training_loss(self, batch):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def training_step(self, batch, batch_idx):
            return self.training_loss(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    model = Net()
    logger = RecordingLogger()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    _trainer(callbacks, steps, logger=logger).fit(model, loader)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), logger


def test_monitor_auto_is_deterministic_and_leaves_training_unchanged():
    plain, _ = _mlp_fit([])
    runs = [_mlp_fit([HessianEigenvalueMonitor(every_n_steps="auto", min_every=2, max_every=16)]) for _ in range(2)]
    (w1, log1), (w2, log2) = runs
    assert torch.equal(w1, plain) and torch.equal(w2, plain)
    s1, s2 = log1.series("hessian/h0"), log2.series("hessian/h0")
    assert s1 == s2 and len(s1) >= 4
    assert log1.series("hessian/every_n_steps") == log2.series("hessian/every_n_steps")
    # not a fixed cadence: more than one interval was used
    steps = sorted(s1)
    assert len({b - a for a, b in zip(steps, steps[1:])}) > 1


def test_quasi_newton_auto_is_deterministic_two_fits_same_steps_and_same_weights():
    def qn():
        return QuasiNewtonLR(every_n_steps="auto", min_every=2, max_every=16, warmup_max_hvps=40)

    (w1, log1), (w2, log2) = _mlp_fit([qn()], steps=60), _mlp_fit([qn()], steps=60)
    assert torch.equal(w1, w2)
    h1, h2 = log1.series("quasi_newton/h0"), log2.series("quasi_newton/h0")
    assert h1 == h2
    every = log1.series("quasi_newton/every_n_steps")
    assert every == log2.series("quasi_newton/every_n_steps") and set(every) == set(h1)
    assert all(2 <= v <= 16 for v in every.values())
    # a QN run with a fixed cadence estimates at other steps (the auto schedule is in use)
    _, fixed = _mlp_fit([QuasiNewtonLR(every_n_steps=10, warmup_max_hvps=40)], steps=60)
    assert sorted(fixed.series("quasi_newton/h0")) != sorted(h1)
    assert "quasi_newton/every_n_steps" not in {k for _, m in fixed.records for k in m}


def test_quasi_newton_rule_auto_schedules_from_the_cadence_and_resumes():
    rule = QuasiNewtonRule(every_n_steps="auto", min_every=3, max_every=24, loss_rise=None)
    rule.reset(initial_lr=0.1)
    estimated = []
    for step in range(200):
        while rule.needs_estimate(step):
            rule.update(4.0, step, hvps=3)  # a constant h0: the warm-up agrees at once
            estimated.append(step)
        if step == 100:
            saved = rule.state_dict()
    gaps = [b - a for a, b in zip(estimated[1:], estimated[2:])]
    assert estimated[:2] == [0, 0]  # two warm-up estimates at step 0
    assert gaps[:4] == [3, 6, 12, 24] and set(gaps[4:]) == {24}
    assert rule.every_n_steps_in_use == 24 and rule.triggers["schedule"] == len(estimated) - 2
    resumed = QuasiNewtonRule(every_n_steps="auto", min_every=3, max_every=24, loss_rise=None)
    resumed.load_state_dict(saved)
    later = []
    for step in range(101, 200):
        if resumed.needs_estimate(step):
            resumed.update(4.0, step)
            later.append(step)
    assert later == [s for s in estimated if s > 100]


@pytest.mark.parametrize(
    "make, error, name",
    [
        (lambda: HessianEigenvalueMonitor(every_n_steps="sometimes"), NotAnIntegerError, "every_n_steps"),
        (lambda: HessianEigenvalueMonitor(every_n_steps="auto", drift_tol=0.0), NotPositiveError, "drift_tol"),
        (lambda: HessianEigenvalueMonitor(every_n_steps="auto", min_every=0), NotAnIntegerError, "min_every"),
        (lambda: QuasiNewtonLR(every_n_steps="auto", min_every=10, max_every=5), NotAnIntegerError, "max_every"),
        (lambda: QuasiNewtonLR(every_n_steps=0), NotAnIntegerError, "every_n_steps"),
    ],
)
def test_bad_cadence_settings_raise_at_construction(make, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        make()


CALLBACKS_AUTO = """\
- class_path: lyapunov_callbacks.QuasiNewtonLR
  init_args:
    every_n_steps: auto
    drift_tol: 0.1
    max_every: 100
- class_path: lyapunov_callbacks.HessianEigenvalueMonitor
  init_args:
    every_n_steps: auto
    prefix: hessian_probe
    batch: fixed
- class_path: lyapunov_callbacks.HessianEigenvalueMonitor
  init_args:
    every_n_steps: 20
"""


@pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore::DeprecationWarning")
def test_cli_accepts_auto_in_yaml_and_trains(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lyapunov-cli"])
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(CALLBACKS_AUTO)
    args = [
        "--config", str(CONFIG_ROOT / "quasi_newton" / "mlp_ce.yaml"),
        "--trainer.callbacks", str(callbacks),
        "--data.init_args.data_dir", str(cifar_dir), "--data.init_args.download", "false",
        "--data.init_args.allow_unverified_files", "true", "--data.init_args.batch_size", "8",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.max_steps", "3",
    ]  # fmt: skip
    cli = run_cli(["fit", *args])
    qn, probe, fixed = [c for c in cli.trainer.callbacks if isinstance(c, (QuasiNewtonLR, HessianEigenvalueMonitor))]
    assert qn.rule.every_n_steps == "auto" and qn.rule.cadence is not None and qn.rule.cadence.drift_tol == 0.1
    assert qn.rule.cadence.max_every == 100
    assert probe.every_n_steps == "auto" and fixed.every_n_steps == 20
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    assert float(metrics["hessian_probe/every_n_steps"]) == 10.0  # the first interval is min_every
    assert float(metrics["quasi_newton/every_n_steps"]) == 10.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_refuses_a_misspelt_auto(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["lyapunov-cli"])
    callbacks = tmp_path / "callbacks.yaml"
    misspelt = CALLBACKS_AUTO.replace("every_n_steps: auto\n    drift_tol", "every_n_steps: atuo\n    drift_tol")
    assert misspelt != CALLBACKS_AUTO
    callbacks.write_text(misspelt)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--config", str(CONFIG_ROOT / "quasi_newton" / "mlp_ce.yaml"), "--trainer.callbacks", str(callbacks)],
                run=False)
    assert exit_info.value.code != 0
    assert "every_n_steps" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.filterwarnings("ignore:.*smaller than the logging interval")
def test_resumed_auto_run_estimates_at_the_uninterrupted_steps(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lyapunov_callbacks.models import LinearModel
    from test_resume import _data, _model

    tags = ("hessian/h0", "hessian/every_n_steps", "quasi_newton/h0", "quasi_newton/every_n_steps")

    def trainer(root, epochs, logger, checkpoint=None):
        callbacks = [
            QuasiNewtonLR(every_n_steps="auto", min_every=2, max_every=8, warmup_max_hvps=60),
            HessianEigenvalueMonitor(every_n_steps="auto", min_every=3, max_every=12),
        ] + ([checkpoint] if checkpoint is not None else [])
        return L.Trainer(
            accelerator="cpu", max_epochs=epochs, logger=logger, callbacks=callbacks, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root,
            enable_checkpointing=checkpoint is not None,
        )

    def series(logger):
        return {(tag, int(s)): float(v) for tag in tags for s, v in logger.series(tag).items()}

    whole = RecordingLogger()
    trainer(tmp_path / "whole", 3, whole).fit(_model(), datamodule=_data())
    first = RecordingLogger()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    trainer(tmp_path / "first", 1, first, checkpoint).fit(_model(), datamodule=_data())
    resumed = RecordingLogger()
    L.seed_everything(123, verbose=False)
    trainer(tmp_path / "resumed", 3, resumed).fit(
        LinearModel(num_classes=2, loss="mse"), datamodule=_data(), ckpt_path=checkpoint.last_model_path
    )
    whole, first, resumed = series(whole), series(first), series(resumed)
    split = max(step for _, step in first) + 1
    assert any(step >= split for tag, step in resumed if tag == "hessian/h0")
    combined = {**first, **resumed}
    assert set(combined) == set(whole)  # the same tags at the same steps
    for key, value in whole.items():
        assert math.isclose(combined[key], value, rel_tol=1e-6, abs_tol=1e-9), (key, combined[key], value)
