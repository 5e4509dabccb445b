"""A run resumed from a checkpoint logs the same curvature values at the same steps as an uninterrupted one.

The three callbacks keep their state in ``state_dict`` (warm-start vectors, the tangent vector and its window,
the quasi-Newton LR and counters) and the data modules shuffle by (seed, epoch), so a run stopped at an epoch
boundary and resumed sees the same batches, the same weights and therefore the same estimates. Lightning
restarts an interrupted epoch from its first batch (our loaders do not save a position inside an epoch), so
the equality is asserted for epoch-boundary checkpoints.
"""

import math

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR
from lyapunov_callbacks.datamodules import DigitsDataModule
from lyapunov_callbacks.models import LinearModel
from recording_logger import RecordingLogger

TAGS = ("hessian/h0", "hessian/stability", "lyapunov/lambda", "quasi_newton/lr", "optim/lr")


def _by_tag_and_step(logger: RecordingLogger) -> dict[tuple[str, int], float]:
    return {(tag, int(step)): float(value) for tag in TAGS for step, value in logger.series(tag).items()}


def _callbacks():
    return [
        QuasiNewtonLR(every_n_steps=4, warmup_max_hvps=60),
        HessianEigenvalueMonitor(every_n_steps=3),
        LyapunovExponentMonitor(window=2, every_n_steps=5),
    ]


def _trainer(tmp_path, max_epochs, logger, checkpoint=None):
    callbacks = _callbacks() + ([checkpoint] if checkpoint is not None else [])
    return L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        enable_checkpointing=checkpoint is not None,
    )


def _model():
    L.seed_everything(0, verbose=False)
    return LinearModel(num_classes=2, loss="mse")


def _data():
    return DigitsDataModule(classes=[3, 5], batch_size=32, seed=1)


@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.filterwarnings("ignore:.*smaller than the logging interval")
def test_resumed_run_logs_the_uninterrupted_values_at_the_same_steps(tmp_path):
    whole = RecordingLogger()
    _trainer(tmp_path / "whole", 3, whole).fit(_model(), datamodule=_data())

    first = RecordingLogger()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    _trainer(tmp_path / "first", 1, first, checkpoint).fit(_model(), datamodule=_data())
    resumed = RecordingLogger()
    # A fresh model with other initial weights: everything must come from the checkpoint.
    L.seed_everything(123, verbose=False)
    other = LinearModel(num_classes=2, loss="mse")
    _trainer(tmp_path / "resumed", 3, resumed).fit(other, datamodule=_data(), ckpt_path=checkpoint.last_model_path)

    whole, first, resumed = (_by_tag_and_step(log) for log in (whole, first, resumed))
    split = max(step for _, step in first) + 1
    assert split > 3  # the first epoch measured something of each callback
    combined = {**first, **resumed}
    later = {key for key in whole if key[1] >= split}
    assert later and set(resumed) >= later
    assert set(combined) == set(whole)
    for key, value in whole.items():
        assert math.isclose(combined[key], value, rel_tol=1e-6, abs_tol=1e-9), (key, combined[key], value)
    for tag in TAGS:
        assert any(t == tag and step >= split for t, step in whole), tag
