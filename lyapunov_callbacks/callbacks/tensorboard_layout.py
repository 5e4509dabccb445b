"""TensorBoard custom-scalars layout that overlays λ, 1/h0 and the learning rate: the paper's figure, live.

The layout is written once per ``TensorBoardLogger`` (rank zero only) by the curvature callbacks with their default
``prefix`` in ``on_fit_start``; it charts the default tags (``hessian/*``, ``lyapunov/*``, ``quasi_newton/*``), so
callbacks with another ``prefix`` do not write it (their tags are in the Scalars tab). It is metadata in the event
file and does not change any logged value.
"""

from __future__ import annotations

import weakref
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["PAPER_LAYOUT", "add_paper_layout"]

#: The custom-scalars layout: ``{category: {chart title: ["Multiline", [tags]]}}``. The first chart is the
#: paper's figure (the Lyapunov exponent λ, the inverse sharpness 1/h0 and the step size α on one axis: λ
#: changes sign where α crosses 2/h0), the second the sharpness h0 and the edge-of-stability ratio α·h0, the third
#: Adam's preconditioned sharpness and its ratio ``pre_stability`` (edge at 2), with the opt-in batch sharpness.
PAPER_LAYOUT: dict[str, dict[str, list[Any]]] = {
    "lyapunov": {
        "lambda vs 1/h0 vs lr": [
            "Multiline",
            ["lyapunov/lambda", "hessian/inv_h0", "optim/lr", "quasi_newton/lr", "train/loss"],
        ],
        "sharpness h0 and stability lr*h0": ["Multiline", ["hessian/h0", "hessian/stability"]],
        # Adam/AdamW: the preconditioned sharpness and its stability ratio (edge at 2, as lr*h0's for SGD)
        "preconditioned sharpness pre_h0 and pre_stability": [
            "Multiline",
            ["hessian/pre_h0", "hessian/pre_stability", "hessian/batch_sharpness"],
        ],
    }
}

# Loggers that already carry the layout (weak, so finished runs are not kept alive).
_DONE: "weakref.WeakSet[TensorBoardLogger]" = weakref.WeakSet()


def add_paper_layout(trainer: pl.Trainer) -> int:
    """Write :data:`PAPER_LAYOUT` to every ``TensorBoardLogger`` of ``trainer`` that does not have it yet.

    Only global rank zero writes (other ranks' experiments are dummies). Idempotent per logger, so every
    curvature callback can call it from ``on_fit_start``.

    Args:
        trainer: the trainer whose ``loggers`` are inspected.

    Returns:
        The number of loggers written to by this call.

    Example::

        from lyapunov_callbacks.callbacks.tensorboard_layout import add_paper_layout

        class MyCallback(L.Callback):
            def on_fit_start(self, trainer, pl_module):
                add_paper_layout(trainer)
    """
    if not trainer.is_global_zero:
        return 0
    written = 0
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and logger not in _DONE:
            logger.experiment.add_custom_scalars(PAPER_LAYOUT)
            _DONE.add(logger)
            written += 1
    return written
