"""The TensorBoard dashboard: the Custom Scalars layout is built from the attached callbacks, every chart holds
tags the run logged (no card that can only be empty), one unit per chart, and the reference levels 1 and 2
(and λ's 0) are logged beside the values they are drawn against, to TensorBoard only."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR
from lyapunov_callbacks.analysis.tb_reader import read_scalars
from lyapunov_callbacks.callbacks.tensorboard_layout import (
    FIGURE_CATEGORY,
    REFERENCE_LEVELS,
    TITLE_COUNTERS,
    TITLE_HVPS,
    TITLE_LAMBDA,
    TITLE_LOSS,
    TITLE_LR,
    TITLE_PRE_SHARPNESS,
    TITLE_SHARPNESS,
    TITLE_STABILITY,
    TITLE_STABILITY_ADAM,
    reference_levels,
)
from recording_logger import RecordingLogger

STABILITY_REFS = ["^reference/stability_1_quasi_newton_step$", "^reference/stability_2_edge_of_stability$"]


class LoggingMLP(L.LightningModule):
    """Float64 tanh MLP, mean cross-entropy, logging ``train/loss`` at every step as the package's models do."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
        self.optimizer, self.lr = optimizer, lr

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (48,), generator=g)), batch_size=8)


def _fit(tmp_path, callbacks, optimizer="sgd", max_steps=6):
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    rec = RecordingLogger()
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=[tb, rec], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        num_sanity_val_steps=0, log_every_n_steps=1,
    )
    trainer.fit(LoggingMLP(optimizer), _loader())
    tb.experiment.flush()
    return trainer, tb, rec


def _written_layout(tb: TensorBoardLogger) -> dict[str, dict[str, list[str]]]:
    """The layout in the event file: ``{category: {chart title: [tag regex, ...]}}`` (written once)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("custom_scalars__config__")
    assert len(events) == 1
    layout = layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0])
    return {cat.title: {c.title: list(c.multiline.tag) for c in cat.chart} for cat in layout.category}


def _assert_no_empty_chart(layout, scalars) -> None:
    """Every chart matches a logged tag other than the reference levels (what TensorBoard shows in it)."""
    for charts in layout.values():
        for title, regexes in charts.items():
            data = [t for t in scalars if not t.startswith("reference/") and any(re.match(r, t) for r in regexes)]
            assert data, f"chart {title!r} would be empty: {regexes}"


def test_quasi_newton_sgd_run_charts_figure_tags_one_unit_each(tmp_path):
    # the callbacks of `make train`: QuasiNewtonLR and the λ monitor, plain SGD
    trainer, tb, rec = _fit(tmp_path, [QuasiNewtonLR(every_n_steps=2, warmup_tol=1e-6),
                                       LyapunovExponentMonitor(window=2)])
    layout = _written_layout(tb)
    assert list(layout) == [FIGURE_CATEGORY, "sharpness, counters and cost"]
    assert layout[FIGURE_CATEGORY] == {
        TITLE_LR: ["^optim/lr$", "^hessian/inv_h0$"],
        TITLE_STABILITY: ["^hessian/stability$", *STABILITY_REFS],
        TITLE_LAMBDA: ["^lyapunov/lambda$", "^reference/lambda_0$"],
        TITLE_LOSS: ["^train/loss$", "^val/loss$"],
    }
    assert layout["sharpness, counters and cost"] == {
        TITLE_SHARPNESS: ["^hessian/h0$"],
        TITLE_COUNTERS: ["^quasi_newton/rejected_estimates$", "^quasi_newton/clamped_estimates$",
                         "^quasi_newton/triggered_estimates$"],
    }  # no preconditioned card for SGD, no HVP card without a monitor
    scalars = read_scalars(tb.log_dir)
    _assert_no_empty_chart(layout, scalars)
    # α·h0 of the step: QuasiNewtonLR's own lr times its h0, 1 at scale 1 (no clamp, no growth limit here)
    assert scalars["hessian/stability"].steps.tolist() == scalars["quasi_newton/lr"].steps.tolist() == [0, 2, 4]
    lr, h0, stability = (rec.series(t) for t in ("quasi_newton/lr", "quasi_newton/h0", "hessian/stability"))
    assert sorted(stability) == [0, 2, 4]
    for step, ratio in stability.items():
        assert ratio == pytest.approx(lr[step] * h0[step], rel=1e-12)
        assert ratio == pytest.approx(1.0, rel=1e-12)
    # the reference levels: constants at the steps of the values they are drawn against
    for tag, value in (("reference/stability_1_quasi_newton_step", 1.0),
                       ("reference/stability_2_edge_of_stability", 2.0)):
        assert scalars[tag].steps.tolist() == [0, 2, 4] and scalars[tag].values.tolist() == [value] * 3
    lam = scalars["lyapunov/lambda"]
    assert scalars["reference/lambda_0"].steps.tolist() == lam.steps.tolist() == [1, 3, 5]
    assert scalars["reference/lambda_0"].values.tolist() == [0.0] * 3
    # ... to TensorBoard only: another logger and callback_metrics never see them
    assert not any(t.startswith("reference/") for _, m in rec.records for t in m)
    assert not any(t.startswith("reference/") for t in trainer.callback_metrics)


def test_adamw_monitor_run_has_the_preconditioned_cards(tmp_path):
    _, tb, _ = _fit(tmp_path, [HessianEigenvalueMonitor(every_n_steps=2, k=2, batch_sharpness=True),
                               LyapunovExponentMonitor(window=3)], optimizer="adamw")
    layout = _written_layout(tb)
    assert layout[FIGURE_CATEGORY] == {
        TITLE_LR: ["^optim/lr$", "^hessian/inv_h0$"],
        TITLE_STABILITY_ADAM: ["^hessian/stability$", "^hessian/pre_stability$", *STABILITY_REFS],
        TITLE_LAMBDA: ["^lyapunov/lambda$", "^reference/lambda_0$"],
        TITLE_LOSS: ["^train/loss$", "^val/loss$"],
    }
    assert layout["sharpness, counters and cost"] == {
        TITLE_SHARPNESS: ["^hessian/h0$", "^hessian/h1$", "^hessian/batch_sharpness$"],
        TITLE_PRE_SHARPNESS: ["^hessian/pre_h0$"],
        TITLE_HVPS: ["^hessian/num_hvps$", "^hessian/pre_num_hvps$"],
    }  # no quasi-Newton counters without QuasiNewtonLR
    scalars = read_scalars(tb.log_dir)
    _assert_no_empty_chart(layout, scalars)
    # pre_stability is logged from the second measurement on (Adam has no v at step 0): references at 0, 2, 4
    assert scalars["hessian/pre_stability"].steps.tolist() == [0, 2, 4]  # P = |g| + eps at step 0
    assert scalars["reference/stability_2_edge_of_stability"].steps.tolist() == [0, 2, 4]


def test_sgd_monitor_has_no_preconditioned_card_and_other_prefixes_are_charted(tmp_path):
    _, tb, _ = _fit(tmp_path, [HessianEigenvalueMonitor(every_n_steps=2),
                               HessianEigenvalueMonitor(every_n_steps=3, batch="fixed", probe_size=16,
                                                        prefix="hessian_probe")])
    layout = _written_layout(tb)
    titles = [t for charts in layout.values() for t in charts]
    assert TITLE_PRE_SHARPNESS not in titles and TITLE_STABILITY_ADAM not in titles
    assert TITLE_LAMBDA not in titles and TITLE_COUNTERS not in titles
    assert layout[FIGURE_CATEGORY][TITLE_LR] == ["^optim/lr$", "^hessian/inv_h0$", "^hessian_probe/inv_h0$"]
    assert layout[FIGURE_CATEGORY][TITLE_STABILITY] == [
        "^hessian/stability$", "^hessian_probe/stability$", *STABILITY_REFS]
    _assert_no_empty_chart(layout, read_scalars(tb.log_dir))


def test_reference_levels_follow_the_tags_they_are_drawn_against():
    assert reference_levels({"hessian/h0": 3.0}) == {}
    assert reference_levels({"hessian/pre_stability": 0.4}) == {
        "reference/stability_1_quasi_newton_step": 1.0, "reference/stability_2_edge_of_stability": 2.0}
    assert reference_levels({"lyap_b/lambda": -0.1}) == {"reference/lambda_0": 0.0}
    assert set(REFERENCE_LEVELS.values()) == {0.0, 1.0, 2.0}
