"""TensorBoard's Custom Scalars dashboard for the curvature callbacks: the paper's figure, one unit per chart.

:func:`add_paper_layout` is called by every curvature callback in ``on_fit_start`` (rank zero writes, once per
``TensorBoardLogger``). The layout is built by :func:`paper_layout` from the callbacks attached to the trainer and
its optimiser, so every chart holds tags that this run logs: no card that can only be empty (the preconditioned
sharpness appears only where ``pre_h0`` is measured, the quasi-Newton counters only with ``QuasiNewtonLR``). Each
chart has one unit, so no curve sets the scale of another:

- **α and 1/h0** (both step sizes): the learning rate ``optim/lr`` beside ``{prefix}/inv_h0``;
- **the stability ratio α·h0** (and ``pre_stability`` where logged), with the reference levels 1 (the
  quasi-Newton step) and 2 (the edge of stability) drawn as the constant tags of :data:`REFERENCE_LEVELS`;
- **λ** alone (per step), with the level 0 drawn;
- **the loss** (training, and validation per epoch);
- then the sharpness h0 (and the top-k, the batch sharpness), the preconditioned sharpness, the quasi-Newton
  counters and the monitors' HVPs per estimate.

Each chart has a *toggle y-axis log scale* button under it in TensorBoard. Chart tags are anchored regular
expressions of the exact tag names. The layout is metadata in the event file and the reference levels are
constant tags written to ``TensorBoardLogger`` s only; neither changes a measured value, ``callback_metrics`` or
what other loggers receive.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Mapping
from typing import Any

import torch

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lyapunov_callbacks.core.checks import finite_or_nan

__all__ = [
    "FIGURE_CATEGORY",
    "REFERENCE_LEVELS",
    "add_paper_layout",
    "log_hessian_curves",
    "log_reference_levels",
    "paper_layout",
    "reference_levels",
]

#: The category of the first four charts: the figure the README calls "λ, 1/h0, α and the loss".
FIGURE_CATEGORY = "λ, 1/h0, α and the loss (the paper's figure)"
#: The second category: the curvature behind the figure and what measuring it cost.
CURVATURE_CATEGORY = "sharpness, counters and cost"

#: Constant tags drawn as reference levels: tag -> value. The two stability levels are logged beside every
#: ``*/stability`` / ``*/pre_stability`` value, the λ level beside every ``*/lambda`` value (so each spans the
#: steps of its chart).
REFERENCE_LEVELS: dict[str, float] = {
    "reference/stability_1_quasi_newton_step": 1.0,
    "reference/stability_2_edge_of_stability": 2.0,
    "reference/lambda_0": 0.0,
}
_STABILITY_REFERENCES = ("reference/stability_1_quasi_newton_step", "reference/stability_2_edge_of_stability")
_LAMBDA_REFERENCE = ("reference/lambda_0",)

# Chart titles (also what the README and the user guide name).
TITLE_LR = "α (learning rate) and 1/h0: one curve where α·h0 = 1"
TITLE_STABILITY = "stability ratio α·h0 (1: quasi-Newton step, 2: edge)"
TITLE_STABILITY_ADAM = "stability ratios α·h0 and pre_stability = α·λ1(P⁻¹H)(1−β1)/(1+β1) (edge 2)"
TITLE_LAMBDA = "λ, Lyapunov exponent per step (> 0: trajectories diverge)"
TITLE_LOSS = "loss (training per step, validation per epoch)"
TITLE_SHARPNESS = "sharpness h0 (top Hessian eigenvalues)"
TITLE_PRE_SHARPNESS = "preconditioned sharpness λ1(P⁻¹H)"
TITLE_COUNTERS = "quasi-Newton counters: rejected, clamped and triggered estimates"
TITLE_HVPS = "HVPs per estimate of the monitors"

_ADAM = (torch.optim.Adam, torch.optim.AdamW)
_LOSS_TAGS = ("train/loss", "val/loss")

# Loggers that already carry the layout (weak, so finished runs are not kept alive).
_DONE: "weakref.WeakSet[TensorBoardLogger]" = weakref.WeakSet()


def _regex(tag: str) -> str:
    """The chart entry of exactly ``tag`` (TensorBoard reads chart tags as regular expressions)."""
    return f"^{re.escape(tag)}$"


def _unique(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


def paper_layout(trainer: pl.Trainer) -> dict[str, dict[str, list[Any]]]:
    """The Custom Scalars layout of the curvature callbacks attached to ``trainer``.

    Reads ``trainer.callbacks`` (:class:`~lyapunov_callbacks.HessianEigenvalueMonitor`,
    :class:`~lyapunov_callbacks.LyapunovExponentMonitor`, :class:`~lyapunov_callbacks.QuasiNewtonLR`, with their
    ``prefix`` and options) and the first optimiser (Adam/AdamW switch ``pre_h0`` on by default), so call it once
    the optimisers exist (``on_fit_start``). A chart is left out when none of its tags is logged by those
    callbacks; a category without charts is left out.

    Returns:
        ``{category: {chart title: ["Multiline", [tag regex, ...]]}}``, the format of
        ``SummaryWriter.add_custom_scalars``; the regexes are ``^tag$`` of the exact tags.

    Example::

        layout = paper_layout(trainer)   # in on_fit_start
        trainer.logger.experiment.add_custom_scalars(layout)
    """
    from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR

    callbacks = list(trainer.callbacks)
    monitors = [c for c in callbacks if isinstance(c, HessianEigenvalueMonitor)]
    lyapunov = [c for c in callbacks if isinstance(c, LyapunovExponentMonitor)]
    quasi_newton = [c for c in callbacks if isinstance(c, QuasiNewtonLR)]
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    adam = isinstance(optimizer, _ADAM)

    lr, inv_h0, stability, sharpness, pre_sharpness, hvps = [], [], [], [], [], []
    for m in monitors:
        p = m.prefix
        pre_on = m.pre_h0 if m.pre_h0 is not None else adam
        lr.append("optim/lr")
        inv_h0.append(f"{p}/inv_h0")
        stability.append(f"{p}/stability")
        sharpness += [f"{p}/h{i}" for i in range(m.k)]
        if m.batch_sharpness:
            sharpness.append(f"{p}/batch_sharpness")
        hvps.append(f"{p}/num_hvps")
        if pre_on:
            stability.append(f"{p}/pre_stability")
            pre_sharpness.append(f"{p}/pre_h0")
            hvps.append(f"{p}/pre_num_hvps")
    # QuasiNewtonLR logs the figure's curves under hessian/* unless a monitor with that prefix logs them itself.
    default_monitor = any(m.prefix == "hessian" for m in monitors)
    counters = []
    for q in quasi_newton:
        lr.append("optim/lr")
        r = q.prefix
        counters += [f"{r}/rejected_estimates", f"{r}/clamped_estimates", f"{r}/triggered_estimates"]
        if default_monitor:
            continue
        if adam:
            stability.append("hessian/pre_stability")
            pre_sharpness.append("hessian/pre_h0")
        else:
            inv_h0.append("hessian/inv_h0")
            stability.append("hessian/stability")
            sharpness.append("hessian/h0")
    lambdas = [f"{c.prefix}/lambda" for c in lyapunov]
    if lambdas:
        lr.append("optim/lr")

    def chart(tags: list[str], references: tuple[str, ...] = ()) -> list[Any]:
        return ["Multiline", [_regex(t) for t in _unique(tags) + list(references)]]

    figure: dict[str, list[Any]] = {}
    if lr or inv_h0:
        figure[TITLE_LR] = chart(lr + inv_h0)
    if stability:
        title = TITLE_STABILITY_ADAM if any(t.endswith("/pre_stability") for t in stability) else TITLE_STABILITY
        figure[title] = chart(stability, _STABILITY_REFERENCES)
    if lambdas:
        figure[TITLE_LAMBDA] = chart(lambdas, _LAMBDA_REFERENCE)
    figure[TITLE_LOSS] = chart(list(_LOSS_TAGS))
    curvature: dict[str, list[Any]] = {}
    if sharpness:
        curvature[TITLE_SHARPNESS] = chart(sharpness)
    if pre_sharpness:
        curvature[TITLE_PRE_SHARPNESS] = chart(pre_sharpness)
    if counters:
        curvature[TITLE_COUNTERS] = chart(counters)
    if hvps:
        curvature[TITLE_HVPS] = chart(hvps)
    layout = {FIGURE_CATEGORY: figure}
    if curvature:
        layout[CURVATURE_CATEGORY] = curvature
    return layout


def add_paper_layout(trainer: pl.Trainer) -> int:
    """Write :func:`paper_layout` to every ``TensorBoardLogger`` of ``trainer`` that does not have it yet.

    Only global rank zero writes (other ranks' experiments are dummies). Idempotent per logger, so every
    curvature callback calls it from ``on_fit_start``; the first call builds the layout from all the callbacks.

    Args:
        trainer: the trainer whose ``loggers`` and ``callbacks`` are read.

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
    layout = None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and logger not in _DONE:
            layout = paper_layout(trainer) if layout is None else layout
            logger.experiment.add_custom_scalars(layout)
            _DONE.add(logger)
            written += 1
    return written


def reference_levels(metrics: Mapping[str, float]) -> dict[str, float]:
    """The constant tags to log beside ``metrics``: the stability levels 1 and 2 beside a ``*/stability`` or
    ``*/pre_stability`` value, the level 0 beside a ``*/lambda`` value, none otherwise."""
    names = set()
    for tag in metrics:
        if tag.endswith("/stability") or tag.endswith("/pre_stability"):
            names.update(_STABILITY_REFERENCES)
        elif tag.endswith("/lambda"):
            names.update(_LAMBDA_REFERENCE)
    return {name: REFERENCE_LEVELS[name] for name in sorted(names)}


def log_reference_levels(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Log :func:`reference_levels` of ``metrics`` at ``step`` to the ``TensorBoardLogger`` s (global rank zero).

    Other loggers (CSV, in-memory, experiment trackers) get nothing: the levels are a drawing of the dashboard.
    """
    levels = reference_levels(metrics)
    if not levels or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_metrics(levels, step=step)


def log_hessian_curves(trainer: pl.Trainer, h0: float, lr: float, step: int, factor: float | None = None) -> None:
    """The figure's ``hessian/*`` curves of a quasi-Newton estimate, to the loggers only (global rank zero).

    ``hessian/h0``, ``hessian/inv_h0`` and the stability ratio ``hessian/stability`` = α·h0; with ``factor``
    (Adam's stability factor c, h0 then being λ1(P⁻¹H)) ``hessian/pre_h0`` and ``hessian/pre_stability`` = α·h0/c.
    Not through ``LightningModule.log``: a ``HessianEigenvalueMonitor`` logs these tags there, with its own options.
    A non-finite h0 is logged as NaN, without 1/h0 or a ratio.
    """
    if not trainer.is_global_zero:
        return
    usable = math.isfinite(h0) and h0 > 0
    value = finite_or_nan(h0)
    if factor is not None:
        curves = {"hessian/pre_h0": value}
        if usable:
            curves["hessian/pre_stability"] = lr * h0 / factor
    else:
        curves = {"hessian/h0": value}
        if usable:
            curves["hessian/inv_h0"] = 1.0 / h0
            curves["hessian/stability"] = lr * h0
    for logger in trainer.loggers:
        logger.log_metrics(curves, step=step)
    log_reference_levels(trainer, curves, step)
