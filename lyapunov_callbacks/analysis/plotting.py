"""The paper's figures from TensorBoard logs: λ, 1/h0, α and the loss against the global step, grids of runs, spectra.

Everything draws on ``matplotlib.figure.Figure`` objects with the Agg canvas (``pyplot`` is never imported, so no
window opens and no global figure state leaks between calls). Event files are read by
:mod:`lyapunov_callbacks.analysis.tb_reader` with TensorBoard's own ``EventAccumulator``.

Axis rule of the run chart (:func:`plot_run`): the positive quantities 1/h0, α and the loss share the left axis,
which is logarithmic when all their finite values are > 0 and ``max/min > LOG_SPAN`` (they span more than a
decade), linear otherwise; λ, which changes sign, has its own linear twin axis on the right with a dashed zero
line (λ > 0: nearby trajectories diverge, the edge of stability).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from lyapunov_callbacks.analysis.tb_reader import Scalar, find_runs, read_scalars, run_title

__all__ = [
    "SERIES",
    "LOG_SPAN",
    "MissingTagsWarning",
    "RunPlot",
    "SpectrumPlot",
    "GridPlot",
    "plot_run",
    "plot_grid",
    "plot_spectrum",
    "plot_figure",
    "plot_analysis",
    "default_out",
    "spectrum",
    "main",
]

#: A positive axis turns logarithmic when its values span more than this factor (one decade).
LOG_SPAN = 10.0
#: File formats :func:`plot_run` and friends can write.
FORMATS = ("png", "pdf", "svg")
#: Hessian colour of the spectrum bars, the same as 1/h0 in the run chart.
SPECTRUM_COLOR = "tab:orange"
#: Neutral grey of the λ = 0 line.
_ZERO_LINE_COLOR = "0.4"


@dataclass(frozen=True)
class Series:
    """One curve of the run chart: the tags it may be logged under (first present wins) and its colour."""

    key: str
    label: str
    tags: tuple[str, ...]
    color: str
    positive: bool
    linestyle: str = "-"
    linewidth: float = 1.2


#: The four curves of the paper's chart, in legend order. α prefers the LR the quasi-Newton callback set, then the
#: optimiser's LR as our monitors log it, then Lightning's ``LearningRateMonitor`` (``lr-SGD``, ``lr-Adam``, ...).
SERIES: tuple[Series, ...] = (
    Series("lambda", "λ (Lyapunov exponent)", ("lyapunov/lambda",), "tab:blue", positive=False),
    # Under QuasiNewtonLR α = 1/h0 exactly: a wide 1/h0 under a dashed α keeps both curves visible.
    Series("inv_h0", "1/h0", ("hessian/inv_h0",), "tab:orange", positive=True, linewidth=2.4),
    Series("inv_h0_probe", "1/h0 (probe batch)", ("hessian_probe/inv_h0",), "tab:brown", positive=True,
           linestyle=":", linewidth=1.6),
    Series("lr", "α (learning rate)", ("quasi_newton/lr", "optim/lr", "lr-SGD"), "tab:red", positive=True,
           linestyle="--"),
    Series("loss", "training loss", ("train/loss", "train/loss_step"), "tab:green", positive=True),
)


#: The curves of the AdamW chart (``kind="preconditioned"``): λ, the preconditioned stability ratio
#: α·h0(P⁻¹H)·(1−β1)/(1+β1) that AdamW is stable below (edge at :data:`PRECONDITIONED_EDGE`), and the loss.
PRECONDITIONED_SERIES: tuple[Series, ...] = (
    SERIES[0],
    # h0(P⁻¹H), the top eigenvalue of the preconditioned Hessian: not "λ1", which would read as the Lyapunov λ
    Series("pre_stability", "α·h0(P⁻¹H)·(1−β1)/(1+β1)", ("hessian/pre_stability",), "tab:purple", positive=True,
           linewidth=1.6),
    SERIES[-1],
)
#: The edge of stability of the preconditioned ratio (drawn as a dashed line).
PRECONDITIONED_EDGE = 2.0
#: The log axis of a spectrum stops this far below its largest mean (smaller eigenvalues are counted, not drawn).
SPECTRUM_FLOOR = 1e-4
#: Chart kinds of :func:`plot_grid`: the curves each draws.
KIND_SERIES: dict[str, tuple[Series, ...]] = {"run": SERIES, "preconditioned": PRECONDITIONED_SERIES}


class MissingTagsWarning(UserWarning):
    """A run lacks some of the chart's tags; the others are plotted."""


@dataclass
class RunPlot:
    """What :func:`plot_run` drew.

    Attributes:
        run_dir: the run directory read.
        figure, ax: the figure and the left axes (1/h0, α, loss).
        lambda_ax: the twin right axes of λ, ``None`` when the run logged no λ.
        lines: series key (``"lambda"``, ``"inv_h0"``, ``"lr"``, ``"loss"``) -> its ``Line2D``.
        tags: series key -> the tag it was read from.
        missing: the chart's tags the run lacks (for α: ``"optim/lr"``).
        title: the title from the run's config.
        log_scale: whether the left axis is logarithmic.
        paths: the files written (empty without ``out``).
        diverged_at: the first step at which a drawn run diverged (:func:`~lyapunov_callbacks.analysis.summary.
            divergence_step`), ``None`` if none; the curves of a diverged run stop there.
        num_runs: how many runs (seeds) the curves aggregate.
    """

    run_dir: Path
    figure: Figure
    ax: Axes
    lambda_ax: Axes | None
    lines: dict[str, Line2D]
    tags: dict[str, str]
    missing: list[str]
    title: str
    log_scale: bool
    paths: list[Path] = field(default_factory=list)
    diverged_at: int | None = None
    num_runs: int = 1


@dataclass
class SpectrumPlot:
    """What :func:`plot_spectrum` drew.

    Attributes:
        run_dir, figure, ax: as in :class:`RunPlot`.
        eigenvalues: ``[k]`` mean of ``hessian/h{i}`` over the window (NaN where h{i} has no point in it).
        end_step: the window is the steps ``< end_step`` (``None``: all logged steps).
        num_points: ``[k]`` how many logged points each mean averages.
        missing: the requested ``hessian/h{i}`` tags with no point in the window.
        title, log_scale, paths: as in :class:`RunPlot`.
    """

    run_dir: Path
    figure: Figure
    ax: Axes
    eigenvalues: np.ndarray
    end_step: int | None
    num_points: np.ndarray
    missing: list[str]
    title: str
    log_scale: bool
    paths: list[Path] = field(default_factory=list)


@dataclass
class GridPlot:
    """What :func:`plot_grid` drew: ``cells[r][c]`` is a :class:`RunPlot` / :class:`SpectrumPlot` or ``None``.

    ``missing`` maps each run with absent tags to them; ``paths`` are the files written.
    """

    figure: Figure
    axes: np.ndarray
    cells: list[list[RunPlot | SpectrumPlot | None]]
    missing: dict[str, list[str]]
    paths: list[Path] = field(default_factory=list)
    #: The α·h0 panel under each run chart (``None`` for a spectrum grid; cells without a run are off).
    stability_axes: np.ndarray | None = None
    #: ``stability[r][c]``: what :func:`plot_stability` drew in that panel (``None`` for an empty cell).
    stability: list[list["StabilityPlot | None"]] | None = None


# ------------------------------------------------------------------------------------------------ helpers


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(f.lower().lstrip(".") for f in formats)
    bad = [f for f in formats if f not in FORMATS]
    if not formats or bad:
        raise ValueError(f"formats={formats!r}: each format must be one of {FORMATS}.")
    return formats


def _check_dpi(dpi: float) -> None:
    if not (isinstance(dpi, (int, float)) and dpi > 0):
        raise ValueError(f"dpi={dpi!r} must be a positive number (e.g. 150).")


def _output_paths(out: str | os.PathLike, formats: Sequence[str] | None) -> list[Path]:
    """``out`` with one suffix per format; a known suffix on ``out`` is replaced (and chosen when formats=None)."""
    out = Path(out)
    suffix = out.suffix.lower().lstrip(".")
    base = str(out)[: -len(out.suffix)] if suffix in FORMATS else str(out)
    if formats is None:
        formats = (suffix,) if suffix in FORMATS else ("png",)
    return [Path(f"{base}.{fmt}") for fmt in _check_formats(formats)]


def _save(fig: Figure, out: str | os.PathLike | None, formats: Sequence[str] | None, dpi: float) -> list[Path]:
    if out is None:
        return []
    paths = _output_paths(out, formats)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format=path.suffix[1:])
    return paths


def _single_run(path: str | os.PathLike) -> Path:
    runs = find_runs(path)
    if len(runs) != 1:
        shown = ", ".join(str(r) for r in runs[:4]) + (", ..." if len(runs) > 4 else "")
        raise ValueError(f"{str(path)!r} holds {len(runs)} runs ({shown}); give one run directory per chart.")
    return runs[0]


def _select_tag(series: Series, scalars: dict[str, Scalar]) -> str | None:
    for tag in series.tags:
        if tag in scalars:
            return tag
    if series.key == "lr":  # LearningRateMonitor names the tag after the optimiser: lr-Adam, lr-SGD/pg1, ...
        lr_tags = sorted(t for t in scalars if t.startswith("lr-") and not t.endswith(("-momentum", "-weight_decay")))
        return lr_tags[0] if lr_tags else None
    return None


SERIES_BY_KEY = {s.key: s for s in SERIES}
#: λ drawn with markers when its points are this far apart or fewer than this many (sparse windows).
_SPARSE_POINTS = 60


def _series_of(scalars: dict[str, Scalar], series: Series) -> Scalar | None:
    tag = _select_tag(series, scalars)
    return None if tag is None else scalars[tag]


def _divergence(scalars: dict[str, Scalar]) -> int | None:
    from lyapunov_callbacks.analysis.summary import divergence_step

    return divergence_step(scalars.get("train/loss") or scalars.get("train/loss_step"))


def _clipped(data: Scalar | None, diverged_at: int | None) -> Scalar | None:
    """The series up to (excluding) the divergence step: curves of a diverged run stop where it diverged."""
    if data is None or diverged_at is None:
        return data
    keep = data.steps < diverged_at
    return Scalar(data.steps[keep], data.values[keep])


def _aggregate(series: list[Scalar | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median, min and max over runs at every step any run logged (non-finite values ignored)."""
    present = [s for s in series if s is not None and s.steps.size]
    if not present:
        empty = np.empty(0)
        return empty, empty, empty, empty
    if len(present) == 1:
        v = present[0].values
        return present[0].steps, v, v, v
    steps = np.unique(np.concatenate([s.steps for s in present]))
    table = np.full((len(present), steps.size), np.nan)
    for i, s in enumerate(present):
        table[i, np.searchsorted(steps, s.steps)] = s.values
    table[~np.isfinite(table)] = np.nan
    keep = np.isfinite(table).any(axis=0)
    table, steps = table[:, keep], steps[keep]
    return steps, np.nanmedian(table, axis=0), np.nanmin(table, axis=0), np.nanmax(table, axis=0)


def _markers(steps: np.ndarray) -> dict[str, Any]:
    sparse = steps.size < _SPARSE_POINTS or (steps.size > 1 and np.median(np.diff(steps)) > 1)
    return {"marker": "o", "markersize": 2.5} if sparse and steps.size else {}


#: A y-axis label longer than this many characters is broken into lines (one curve per line), so that a
#: row's label does not run past its axes and over itself (the AdamW chart's ratio is 24 characters alone).
_LABEL_WIDTH = 30


def _left_label(positive: Sequence[Series], log_scale: bool) -> str:
    names = []
    for s in positive:
        name = s.label.split(" (")[0] if not s.label.startswith("α·h0(") else "α·h0(P⁻¹H)·(1−β1)/(1+β1)"
        if name not in names:
            names.append(name)
    text = ", ".join(names) + (" (log)" if log_scale else "")
    return text if len(text) <= _LABEL_WIDTH else ",\n".join(names) + (" (log)" if log_scale else "")


def _wants_log(values: list[np.ndarray]) -> bool:
    if not values:
        return False
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    return bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > LOG_SPAN)


def _warn_missing(run_dir: Path, missing: list[str], what: str = "plotting the others") -> None:
    if missing:
        warnings.warn(
            f"Run {str(run_dir)!r} has no data for tag(s) {', '.join(missing)}; {what}.",
            MissingTagsWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------ run chart


def plot_run(
    run_dir: str | os.PathLike,
    ax: Axes | None = None,
    *,
    out: str | os.PathLike | None = None,
    formats: Sequence[str] | None = ("png",),
    dpi: float = 150,
    title: str | None = None,
    legend: bool = True,
    axis_labels: bool = True,
    figsize: tuple[float, float] = (7.0, 4.5),
    series: Sequence[Series] = SERIES,
    edge: float | None = None,
) -> RunPlot:
    """Draw λ (blue), 1/h0 (orange), α (red) and the training loss (green) of one run against the global step.

    1/h0, α and the loss share the left axis, logarithmic when they are all positive and span more than
    :data:`LOG_SPAN`; λ has a linear twin axis on the right with a dashed line at λ = 0. Tags the run lacks
    are left out, returned in ``missing`` and named in a :class:`MissingTagsWarning`.

    Args:
        run_dir: a run directory (holds ``events.out.tfevents.*``), or a directory with exactly one run below it.
        ax: axes to draw into; ``None`` makes a new figure of ``figsize``.
        out: where to save, e.g. ``figures/mlp.png`` (parents are created; the suffix is replaced per format).
            ``None`` saves nothing.
        formats: file formats among ``png``, ``pdf``, ``svg``; ``None`` takes the suffix of ``out``.
        dpi: resolution of raster output.
        title: the chart title; ``None`` reads it from the run's ``config.yaml`` / ``hparams.yaml``
            (model, loss and data set; the optimiser and the LR rule), else the run directory's name.
            ``""`` sets none.
        legend: draw a legend: below the chart in a new figure (it covers no curve), on the axes given as ``ax``.
        axis_labels: label the y axes (grids switch this off and label rows instead).
        figsize: size in inches of a new figure.
        series: the curves (default :data:`SERIES`; :data:`PRECONDITIONED_SERIES` for the AdamW chart).
        edge: draw a dashed horizontal line at this value of the left axis, labelled "edge" (e.g. 2 for the
            preconditioned stability ratio); ``None`` (default) draws none.

    Raises:
        FileNotFoundError: no such directory, or no event files in it.
        ValueError: unreadable event files, no scalars, none of the chart's tags, or a bad ``formats``/``dpi``.

    Example::

        from lyapunov_callbacks.analysis.plotting import plot_run
        result = plot_run("lightning_logs/version_0", out="figures/version_0.png")
        print(result.paths, result.missing)
    """
    _check_dpi(dpi)
    if out is not None:
        _output_paths(out, formats)  # validate before the work
    run_dirs = find_runs(run_dir)
    all_scalars = [read_scalars(d) for d in run_dirs]
    run_dir = run_dirs[0] if len(run_dirs) == 1 else Path(run_dir)

    series = tuple(series)
    by_key = {s.key: s for s in series}
    tags = {}
    for s in series:
        found = [t for sc in all_scalars if (t := _select_tag(s, sc)) is not None]
        if found:
            tags[s.key] = found[0]
    missing = [s.tags[0] if s.key != "lr" else "optim/lr" for s in series
               if s.key not in tags and s.key != "inv_h0_probe"]
    if not tags:
        raise ValueError(
            f"Run {str(run_dir)!r} logged none of the chart's tags "
            f"({', '.join(t for s in series for t in s.tags)}); it has: {', '.join(sorted(all_scalars[0]))}."
        )
    _warn_missing(run_dir, missing)

    own_figure = ax is None
    if ax is None:
        ax = _new_figure(figsize).add_subplot()
    fig = ax.figure
    if title is None:
        title = run_title(run_dirs[0]) + (f" · {len(run_dirs)} seeds" if len(run_dirs) > 1 else "")

    diverged = [_divergence(sc) for sc in all_scalars]
    agg = {key: _aggregate([_clipped(_series_of(sc, by_key[key]), d) for sc, d in zip(all_scalars, diverged)])
           for key in tags}
    lines: dict[str, Line2D] = {}
    positive = [s for s in series if s.positive and s.key in tags]
    log_scale = _wants_log([agg[s.key][1] for s in positive])
    for s in positive:
        steps, mid, lo, hi = agg[s.key]
        (lines[s.key],) = ax.plot(steps, mid, color=s.color, label=s.label, linestyle=s.linestyle,
                                  linewidth=s.linewidth)
        if len(run_dirs) > 1:
            ax.fill_between(steps, lo, hi, color=s.color, alpha=0.2, linewidth=0)
    if log_scale:
        ax.set_yscale("log")
    if not positive:
        ax.set_yticks([])
    elif axis_labels:
        ax.set_ylabel(_left_label(positive, log_scale))

    lambda_ax = None
    if "lambda" in tags:
        lam = by_key["lambda"]
        steps, mid, lo, hi = agg["lambda"]
        lambda_ax = ax.twinx()
        (lines["lambda"],) = lambda_ax.plot(steps, mid, color=lam.color, label=lam.label, linewidth=1.2,
                                            **_markers(steps))
        if len(run_dirs) > 1:
            lambda_ax.fill_between(steps, lo, hi, color=lam.color, alpha=0.2, linewidth=0)
        lambda_ax.axhline(0.0, color=_ZERO_LINE_COLOR, linestyle="--", linewidth=0.8)
        if axis_labels:
            lambda_ax.set_ylabel("λ", color=lam.color)
        lambda_ax.tick_params(axis="y", colors=lam.color)

    if edge is not None:
        ax.axhline(edge, color="k", linestyle="--", linewidth=1.0)
        ax.text(0.98, edge, f" edge {edge:g}", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                fontsize="small")

    marks = sorted({d for d in diverged if d is not None})
    if marks:
        first = marks[0]
        ax.axvline(first, color="k", linestyle=":", linewidth=1.0)
        which = "" if len(run_dirs) == 1 else f" ({sum(d is not None for d in diverged)}/{len(run_dirs)} seeds)"
        ax.text(0.02, 0.04, f"diverged at step {first}{which}", transform=ax.transAxes, fontsize="small",
                color="k", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})

    ax.set_xlabel("global step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers, also in a 3-step run
    if title:
        ax.set_title(title, fontsize="medium")
    if legend:
        order = [s.key for s in series if s.key in lines]
        handles, labels = [lines[k] for k in order], [lines[k].get_label() for k in order]
        if own_figure:  # below the chart, where it covers no curve (inside, "best" only avoids λ's axes)
            fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 3), fontsize="small")
        else:  # on the top-most axes of the caller's figure, so the λ curve does not cover it
            (lambda_ax or ax).legend(handles, labels, fontsize="small")
    paths = _save(fig, out, formats, dpi)
    return RunPlot(run_dir, fig, ax, lambda_ax, lines, tags, missing, title, log_scale, paths,
                   diverged_at=next((d for d in sorted(x for x in diverged if x is not None)), None),
                   num_runs=len(run_dirs))


# ------------------------------------------------------------------------------------------------ α·h0 panel


#: The α·h0 panel's y range (log): values outside are drawn at its edge as triangles and counted.
STABILITY_RANGE = (0.1, 10.0)
#: The reference lines of the α·h0 panel: the paper's claim A and the edge of stability B.
STABILITY_LINES = ((1.0, "A: α·h0 = 1"), (2.0, "B: α·h0 = 2"))
#: The h0 sources of the α·h0 panel: prefix of the tags, label, colour, line style.
STABILITY_SOURCES = (("hessian", "mini-batch", "tab:orange", "-"), ("hessian_probe", "probe", "tab:brown", ":"))


@dataclass
class StabilityPlot:
    """What :func:`plot_stability` drew: per h0 source (``"mini-batch"``, ``"probe"``) its ``Line2D``, the
    number of estimates per seed it rests on, and how many median points fell outside :data:`STABILITY_RANGE`."""

    ax: Axes
    lines: dict[str, Line2D]
    estimates: dict[str, int]
    seeds: int
    clipped: dict[str, int]


def _stability_series(scalars: dict[str, Scalar], prefix: str) -> Scalar | None:
    """``<prefix>/stability`` (α·h0 as the monitor logged it), else ``<prefix>/h0`` times α at the same steps."""
    if f"{prefix}/stability" in scalars:
        return scalars[f"{prefix}/stability"]
    h0 = scalars.get(f"{prefix}/h0")
    lr = _series_of(scalars, SERIES_BY_KEY["lr"])
    if h0 is None or lr is None:
        return None
    common, ih, il = np.intersect1d(h0.steps, lr.steps, return_indices=True)
    return Scalar(common, h0.values[ih] * lr.values[il])


def plot_stability(run_dir: str | os.PathLike, ax: Axes, *, late_fraction: float | None = None,
                   legend: bool = True) -> StabilityPlot:
    """α·h0 of one run (median over its seeds, min-max band) against the step, per h0 source, on a log axis
    with the reference lines α·h0 = 1 (claim A) and 2 (claim B) and the late window shaded; the legend says
    how many estimates (per seed, times the seeds) each curve rests on. Points outside
    :data:`STABILITY_RANGE` are drawn at its edge as triangles and counted; a diverged run's curve stops at
    its divergence step. ``late_fraction``: the summary's late window (default its threshold).

    Raises:
        FileNotFoundError: no such directory or no event files (as :func:`plot_run`).
    """
    from lyapunov_callbacks.analysis.summary import THRESHOLDS

    late_fraction = THRESHOLDS["late_fraction"] if late_fraction is None else late_fraction
    run_dirs = find_runs(run_dir)
    all_scalars = [read_scalars(d) for d in run_dirs]
    diverged = [_divergence(sc) for sc in all_scalars]
    lo_y, hi_y = STABILITY_RANGE
    lines: dict[str, Line2D] = {}
    estimates: dict[str, int] = {}
    clipped: dict[str, int] = {}
    last = 0
    for prefix, label, color, style in STABILITY_SOURCES:
        per = [_clipped(_stability_series(sc, prefix), d) for sc, d in zip(all_scalars, diverged)]
        steps, mid, lo, hi = _aggregate(per)
        if not steps.size:
            continue
        last = max(last, int(steps[-1]))
        estimates[label] = max(s.steps.size for s in per if s is not None)
        seeds = sum(s is not None and s.steps.size > 0 for s in per)
        shown = np.clip(mid, lo_y, hi_y)
        (lines[label],) = ax.plot(steps, shown, color=color, linestyle=style, linewidth=1.2, marker="o",
                                  markersize=2.0, label=f"{label}: {estimates[label]} estimates × {seeds} seed(s)")
        if len(run_dirs) > 1:
            ax.fill_between(steps, np.clip(lo, lo_y, hi_y), np.clip(hi, lo_y, hi_y), color=color, alpha=0.15,
                            linewidth=0)
        out = (mid < lo_y) | (mid > hi_y)
        clipped[label] = int(out.sum())
        if out.any():
            ax.scatter(steps[out], shown[out], marker="^", s=10, color=color, zorder=3)
    for value, text in STABILITY_LINES:
        ax.axhline(value, color="k", linestyle="--" if value == 1.0 else "-.", linewidth=0.8)
        ax.text(0.005, value, text, transform=ax.get_yaxis_transform(), fontsize="xx-small", va="bottom")
    ax.set_yscale("log")
    ax.set_ylim(lo_y, hi_y)
    if last:
        ax.axvspan((1.0 - late_fraction) * last, last, color="0.5", alpha=0.1, linewidth=0)
    if not lines:
        ax.text(0.5, 0.5, "no α·h0 logged", ha="center", va="center", transform=ax.transAxes, fontsize="small")
    elif legend:
        note = [f"{n} outside {lo_y:g}–{hi_y:g}" for n in clipped.values() if n]
        ax.legend(fontsize="xx-small", loc="upper right", title=("; ".join(note) or None),
                  title_fontsize="xx-small")
    ax.set_xlabel("global step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return StabilityPlot(ax, lines, estimates, len(run_dirs), clipped)


# ------------------------------------------------------------------------------------------------ spectrum


def _first_epoch_end(scalars: dict[str, Scalar]) -> int | None:
    """Where the first epoch ends: one past the last step logged with the first ``epoch`` value.

    Lightning logs ``epoch`` beside every logged metric, at the step of the batch that logged it; validation at the
    end of epoch 0 logs at that epoch's last step, so the step after it is the first step of epoch 1 (where epoch 1
    starts, not where it was first logged, which can be ``log_every_n_steps - 1`` steps later). Without a logged
    end-of-epoch metric the window ends at most that many steps early, never late: no epoch-1 estimate enters the
    mean. ``None``: one epoch only, or no ``epoch`` tag.
    """
    epoch = scalars.get("epoch")
    if epoch is None or epoch.values.size == 0:
        return None
    first = epoch.values[0]
    if not (epoch.values != first).any():
        return None
    return int(epoch.steps[epoch.values == first].max()) + 1


def spectrum(
    scalars: dict[str, Scalar], k: int | None = None, first_epoch_steps: int | None = None
) -> tuple[np.ndarray, np.ndarray, int | None, list[str]]:
    """Mean of ``hessian/h0 .. hessian/h{k-1}`` over the first epoch.

    The window is the steps ``< first_epoch_steps`` when given, else the steps before epoch 1 starts (one past the
    last step logged with epoch 0, see :func:`_first_epoch_end`), else (one epoch, or no ``epoch`` tag) every
    logged step.

    Args:
        scalars: a run's series, as :func:`~lyapunov_callbacks.analysis.tb_reader.read_scalars` returns them.
        k: how many eigenvalues; ``None``: as many as there are consecutive tags ``hessian/h0, h1, ...``.
        first_epoch_steps: an explicit window length in global steps.

    Returns:
        ``(means [k], counts [k], end_step, missing_tags)``.

    Raises:
        ValueError: ``k`` or ``first_epoch_steps`` not a positive integer, or no ``hessian/h0`` in the window.
    """
    if k is not None and not (isinstance(k, int) and k > 0):
        raise ValueError(f"k={k!r} must be a positive integer (the number of eigenvalues), or None for all.")
    if first_epoch_steps is not None and not (isinstance(first_epoch_steps, int) and first_epoch_steps > 0):
        raise ValueError(f"first_epoch_steps={first_epoch_steps!r} must be a positive integer, or None.")
    if k is None:
        k = 0
        while f"hessian/h{k}" in scalars:
            k += 1
    end = first_epoch_steps if first_epoch_steps is not None else _first_epoch_end(scalars)
    means = np.full(k, np.nan)
    counts = np.zeros(k, dtype=np.int64)
    missing = []
    for i in range(k):
        data = scalars.get(f"hessian/h{i}")
        if data is None:
            window = np.empty(0)
        else:
            window = data.values if end is None else data.values[data.steps < end]
        if window.size:
            means[i], counts[i] = window.mean(), window.size
        else:
            missing.append(f"hessian/h{i}")
    if k == 0 or counts[0] == 0:
        where = f"steps < {end}" if end is not None else "any step"
        raise ValueError(f"No hessian/h0 value logged at {where}; was the Hessian spectrum monitored?")
    return means, counts, end, missing


def plot_spectrum(
    run_dir: str | os.PathLike,
    k: int | None = None,
    first_epoch_steps: int | None = None,
    out: str | os.PathLike | None = None,
    *,
    ax: Axes | None = None,
    formats: Sequence[str] | None = ("png",),
    dpi: float = 150,
    title: str | None = None,
    axis_labels: bool = True,
    figsize: tuple[float, float] = (6.0, 4.0),
) -> SpectrumPlot:
    """Bar chart of the top-k Hessian eigenvalues ``hessian/h{i}`` averaged over the first epoch (figure 3).

    The y axis is logarithmic when every mean is positive and they span more than :data:`LOG_SPAN`.

    Args:
        run_dir: a run directory, as in :func:`plot_run`.
        k: the number of eigenvalues; ``None``: every consecutive ``hessian/h{i}`` tag. Eigenvalues without data
            are left out, returned in ``missing`` and named in a :class:`MissingTagsWarning`.
        first_epoch_steps: average over the steps ``< first_epoch_steps`` instead of the steps before epoch 1
            starts.
        out, formats, dpi, title, axis_labels, figsize: as in :func:`plot_run`.
        ax: axes to draw into; ``None`` makes a new figure.

    Raises:
        FileNotFoundError: no such directory or no event files.
        ValueError: unreadable event files, no ``hessian/h0`` in the window, or a bad ``k`` /
            ``first_epoch_steps`` / ``formats`` / ``dpi``.

    Example::

        from lyapunov_callbacks.analysis.plotting import plot_spectrum
        plot_spectrum("lightning_logs/version_0", k=14, out="figures/spectrum.png")
    """
    _check_dpi(dpi)
    if out is not None:
        _output_paths(out, formats)
    run_dir = _single_run(run_dir)
    scalars = read_scalars(run_dir)
    means, counts, end, missing = spectrum(scalars, k, first_epoch_steps)
    _warn_missing(run_dir, missing, "leaving those eigenvalues out")

    if ax is None:
        ax = _new_figure(figsize).add_subplot()
    fig = ax.figure
    if title is None:
        title = run_title(run_dir)
    present = ~np.isnan(means)
    index = np.arange(means.size)
    log_scale = _wants_log([means[present]])
    ax.bar(index[present], means[present], color=SPECTRUM_COLOR, width=0.7, log=log_scale)
    if not log_scale:
        ax.axhline(0.0, color=_ZERO_LINE_COLOR, linewidth=0.8)
    elif present.any():
        # A log axis down to the smallest mean (1e-15 for an MSE model's near-null directions) squeezes the
        # eigenvalues that matter into the top of the panel: the axis stops SPECTRUM_FLOOR below the largest mean,
        # and the bars below it are counted in the panel.
        top = float(np.nanmax(means[present]))
        floor = top * SPECTRUM_FLOOR
        low = int((means[present] < floor).sum())
        ax.set_ylim(floor, top * 2.0)
        if low:
            ax.text(0.98, 0.96, f"{low} below {SPECTRUM_FLOOR:g}·h0", transform=ax.transAxes, ha="right", va="top",
                    fontsize="x-small")
    # every second index labelled when the bars are many (h10..h13 collided at the grid's cell width)
    step = 2 if means.size > 8 else 1
    ax.set_xticks(index, [f"h{i}" if i % step == 0 else "" for i in index],
                  fontsize="small" if means.size > 10 else "medium")
    ax.set_xlabel("eigenvalue index i")
    if axis_labels:
        window = f"steps < {end}" if end is not None else "all steps"
        ax.set_ylabel(f"mean h_i, first epoch ({window})")
    if title:
        ax.set_title(title, fontsize="medium")
    paths = _save(fig, out, formats, dpi)
    return SpectrumPlot(run_dir, fig, ax, means, end, counts, missing, title, log_scale, paths)


# ------------------------------------------------------------------------------------------------ grids


def plot_grid(
    runs: Sequence[Sequence[str | os.PathLike | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    kind: Literal["run", "spectrum", "preconditioned"] = "run",
    k: int | None = None,
    first_epoch_steps: int | None = None,
    formats: Sequence[str] | None = ("png",),
    dpi: float = 150,
    cell_size: tuple[float, float] = (4.0, 3.0),
) -> GridPlot:
    """A grid of run charts (rows: architectures or losses, columns: LR schedules), like the paper's figures.

    Each cell is :func:`plot_run` (``kind="run"``) or :func:`plot_spectrum` (``kind="spectrum"``) of one run;
    ``None`` leaves a cell empty. Column labels title the top row, row labels name the left column's y axis,
    and one legend for the whole figure names the curves. Without labels each cell carries its run's title.

    Args:
        runs: rows of run directories (or ``None``); shorter rows are padded with empty cells.
        row_labels: one label per row, or ``None``.
        col_labels: one label per column, or ``None``.
        out, formats, dpi: as in :func:`plot_run`.
        title: the figure's title.
        kind: ``"run"`` for the λ / 1/h0 / α / loss chart, ``"spectrum"`` for the eigenvalue bars,
            ``"preconditioned"`` for the AdamW chart (λ, the preconditioned stability ratio with its edge at 2, loss).
        k, first_epoch_steps: passed to :func:`plot_spectrum` when ``kind="spectrum"``.
        cell_size: inches per cell (width, height).

    Raises:
        ValueError: no run at all, a label count that does not match the grid, a bad ``kind``, or any error of
            :func:`plot_run` / :func:`plot_spectrum` for a cell.
        FileNotFoundError: a cell's directory is missing or holds no event files.

    Example::

        from lyapunov_callbacks.analysis.plotting import plot_grid
        plot_grid([["logs/mlp_const", "logs/mlp_qn"], ["logs/lenet_const", None]],
                  row_labels=["MLP", "LeNet1"], col_labels=["constant", "quasi-Newton"], out="figures/fig1.png")
    """
    if kind not in ("run", "spectrum", "preconditioned"):
        raise ValueError(f"kind={kind!r} must be 'run', 'spectrum' or 'preconditioned'.")
    curves = KIND_SERIES.get(kind, SERIES)
    if isinstance(runs, (str, os.PathLike)) or not all(
        isinstance(row, Sequence) and not isinstance(row, str) for row in runs
    ):
        raise ValueError(
            "runs must be a list of rows, each a list of run directories or None, e.g. [[a, b], [c, None]]."
        )
    nrows = len(runs)
    ncols = max((len(row) for row in runs), default=0)
    if nrows == 0 or ncols == 0 or all(cell is None for row in runs for cell in row):
        raise ValueError("runs holds no run directory; give at least one non-empty cell.")
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"row_labels has {len(row_labels)} labels but runs has {nrows} rows.")
    if col_labels is not None and len(col_labels) != ncols:
        raise ValueError(f"col_labels has {len(col_labels)} labels but runs has {ncols} columns.")
    _check_dpi(dpi)
    if out is not None:
        _output_paths(out, formats)

    with_stability = kind != "spectrum"
    if with_stability:  # under every run chart its α·h0 panel, a third of its height
        fig = _new_figure((cell_size[0] * ncols, cell_size[1] * nrows * 1.45))
        both = np.asarray(fig.subplots(2 * nrows, ncols, squeeze=False,
                                       gridspec_kw={"height_ratios": [3.0, 1.35] * nrows}))
        axes, stability_axes = both[0::2], both[1::2]
    else:
        fig = _new_figure((cell_size[0] * ncols, cell_size[1] * nrows))
        axes, stability_axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)), None
    stability: list[list[StabilityPlot | None]] | None = [] if with_stability else None
    labelled = row_labels is not None or col_labels is not None
    cells: list[list[RunPlot | SpectrumPlot | None]] = []
    missing: dict[str, list[str]] = {}
    for r in range(nrows):
        row_cells: list[RunPlot | SpectrumPlot | None] = []
        for c in range(ncols):
            run = runs[r][c] if c < len(runs[r]) else None
            ax = axes[r, c]
            if run is None:
                ax.set_axis_off()
                if stability_axes is not None:
                    stability_axes[r, c].set_axis_off()
                row_cells.append(None)
                continue
            cell_title = None if not labelled else ""
            if kind == "run":
                cell = plot_run(run, ax, title=cell_title, legend=False, axis_labels=False)
            elif kind == "preconditioned":
                cell = plot_run(run, ax, title=cell_title, legend=False, axis_labels=False, series=curves,
                                edge=PRECONDITIONED_EDGE)
            else:
                cell = plot_spectrum(run, k, first_epoch_steps, ax=ax, title=cell_title, axis_labels=False)
            if cell.title:
                ax.title.set_fontsize("small")
            if r < nrows - 1:
                ax.set_xlabel("")
            if cell.missing:
                missing[str(cell.run_dir)] = cell.missing
            row_cells.append(cell)
            if stability_axes is not None:
                ax.set_xlabel("")
        cells.append(row_cells)
        if stability is not None:
            stability.append([None if cell is None else plot_stability(runs[r][c], stability_axes[r, c])
                              for c, cell in enumerate(row_cells)])
            if row_cells[0] is not None or any(x is not None for x in row_cells):
                stability_axes[r, 0].set_ylabel("α·h0 (log)", fontsize="small")
            if r < nrows - 1:
                for c in range(ncols):
                    stability_axes[r, c].set_xlabel("")
    _share_row_scales(cells)
    for c, label in enumerate(col_labels or []):
        axes[0, c].set_title(label, fontsize="medium", fontweight="bold")  # a title shows on an empty cell too
    for r, row_cells in enumerate(cells):
        drawn = [cell for cell in row_cells if cell is not None]
        if not drawn:
            continue
        if kind != "spectrum":
            positive = [s for s in curves if s.positive and any(s.key in cell.lines for cell in drawn)]
            quantity = _left_label(positive, any(cell.log_scale for cell in drawn))
        else:
            quantity = "mean h_i, first epoch" + (" (log)" if any(cell.log_scale for cell in drawn) else "")
        label = row_labels[r] if row_labels is not None else ""
        axes[r, 0].set_ylabel(f"{label}\n{quantity}" if label else quantity, fontsize="small")
        last = drawn[-1]
        if isinstance(last, RunPlot) and last.lambda_ax is not None:
            last.lambda_ax.set_ylabel("λ", color=SERIES_BY_KEY["lambda"].color)
    for r, label in enumerate(row_labels or []):
        if cells[r][0] is None:
            axes[r, 0].set_ylabel(label, fontsize="medium", fontweight="bold")
        if cells[r][0] is None:  # keep the row label visible on an empty first cell
            axes[r, 0].set_axis_on()
            axes[r, 0].set_xticks([])
            axes[r, 0].set_yticks([])
            for spine in axes[r, 0].spines.values():
                spine.set_visible(False)
    if kind != "spectrum":
        seen = {key for row in cells for cell in row if cell is not None for key in cell.lines}
        handles = [
            Line2D([], [], color=s.color, label=s.label, linestyle=s.linestyle, linewidth=s.linewidth)
            for s in curves
            if s.key in seen
        ]
        if kind == "preconditioned":
            handles.append(Line2D([], [], color="k", linestyle="--", linewidth=1.0,
                                  label=f"edge {PRECONDITIONED_EDGE:g}"))
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")
    if title:  # wrapped to the figure's width: a one-column figure cut its title at both edges
        width = max(30, int(11 * cell_size[0] * ncols))
        fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.split("\n")))
    paths = _save(fig, out, formats, dpi)
    return GridPlot(fig, axes, cells, missing, paths, stability_axes, stability)


def _share_row_scales(cells: list[list[RunPlot | SpectrumPlot | None]]) -> None:
    """One scale per figure row: the left axes of a row share scale type and limits, and so do its λ axes. A
    run that diverged keeps its own axes (its last values, up to 1e37, would squash the row), marked so."""
    for row in cells:
        for cell in row:
            if isinstance(cell, RunPlot) and cell.diverged_at is not None:
                cell.ax.text(0.98, 0.96, "own y-axis (diverged)", transform=cell.ax.transAxes, ha="right",
                             va="top", fontsize="x-small", color="k",
                             bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        drawn = [cell for cell in row if cell is not None
                 and not (isinstance(cell, RunPlot) and cell.diverged_at is not None)]
        if len(drawn) < 2:
            continue
        log = any(cell.log_scale for cell in drawn)
        for cell in drawn:
            if log and not cell.ax.get_yscale() == "log":
                cell.ax.set_yscale("log")
                cell.log_scale = True
        lows, highs = zip(*(cell.ax.get_ylim() for cell in drawn))
        lo, hi = min(lows), max(highs)
        if log and lo <= 0:
            lo = min(v for v in lows if v > 0) if any(v > 0 for v in lows) else 1e-8
        for cell in drawn:
            cell.ax.set_ylim(lo, hi)
        twins = [cell.lambda_ax for cell in drawn if isinstance(cell, RunPlot) and cell.lambda_ax is not None]
        if len(twins) > 1:
            lows, highs = zip(*(ax.get_ylim() for ax in twins))
            for ax in twins:
                ax.set_ylim(min(lows), max(highs))


def plot_figure(
    spec: dict[str, Any],
    out: str | os.PathLike,
    *,
    formats: Sequence[str] | None = None,
    dpi: float = 150,
    base_dir: str | os.PathLike | None = None,
) -> GridPlot:
    """One paper figure from a spec: ``{"title", "rows", "cols", "runs"}`` (used by the figures script).

    Args:
        spec: ``title`` (str, optional), ``rows`` (row labels), ``cols`` (column labels), ``runs`` (a
            ``len(rows) x len(cols)`` list of run directories or ``None``), optionally ``kind``
            (``"run"``/``"spectrum"``/``"preconditioned"``), ``k`` and ``first_epoch_steps`` for spectra.
        out: the output path; its suffix picks the format when ``formats`` is ``None`` (default PNG).
        formats, dpi: as in :func:`plot_run`.
        base_dir: relative run paths are taken relative to this directory (default: the working directory).

    Raises:
        ValueError: a missing key, an unknown key, or ``runs`` not of shape ``len(rows) x len(cols)``;
            and the errors of :func:`plot_grid`.

    Example::

        plot_figure({"title": "Figure 1", "rows": ["MLP"], "cols": ["constant", "quasi-Newton"],
                     "runs": [["logs/mlp/version_0", "logs/mlp/version_1"]]}, "figures/fig1.png")
    """
    if not isinstance(spec, dict):
        raise ValueError(
            f"spec must be a dict with keys 'rows', 'cols', 'runs' (and 'title'), not {type(spec).__name__}."
        )
    allowed = {"title", "rows", "cols", "runs", "kind", "k", "first_epoch_steps"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"spec has unknown key(s) {unknown}; allowed: {sorted(allowed)}.")
    for key in ("rows", "cols", "runs"):
        if key not in spec:
            raise ValueError(f"spec lacks the key {key!r}; it needs 'rows', 'cols' and 'runs'.")
    rows, cols, runs = list(spec["rows"]), list(spec["cols"]), spec["runs"]
    if len(runs) != len(rows) or any(len(row) != len(cols) for row in runs):
        shape = [len(row) for row in runs]
        raise ValueError(
            f"spec['runs'] must be {len(rows)} rows x {len(cols)} columns (rows x cols labels); "
            f"got row lengths {shape}."
        )
    base = Path(base_dir) if base_dir is not None else None
    resolved = [
        [None if p is None else (base / p if base is not None and not Path(p).is_absolute() else Path(p)) for p in row]
        for row in runs
    ]
    return plot_grid(
        resolved,
        rows,
        cols,
        out,
        title=spec.get("title"),
        kind=spec.get("kind", "run"),
        k=spec.get("k"),
        first_epoch_steps=spec.get("first_epoch_steps"),
        formats=formats,
        dpi=dpi,
    )


# ------------------------------------------------------------------------------------------------ CLI


#: Up to this many runs go in one row when ``--grid`` is not given; more make a near-square grid.
_MAX_ONE_ROW = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lyapunov-cli plot",
        description="Plot λ, 1/h0, α and the training loss (or the Hessian spectrum) from TensorBoard logs.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory, or a directory above runs (all are drawn)")
    p.add_argument("--out", default=None,
                   help="output file, e.g. figures/fig1.png (suffix replaced per format); default: curves.png "
                        "(spectrum.png with --spectrum) in the first RUN directory")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=None, dest="formats",
                   help="file formats (default: the suffix of --out, else png)")
    p.add_argument("--dpi", type=float, default=150.0)
    p.add_argument("--grid", nargs=2, type=int, metavar=("ROWS", "COLS"), help="grid shape, filled row by row")
    p.add_argument("--row-labels", nargs="+", default=None)
    p.add_argument("--col-labels", nargs="+", default=None)
    p.add_argument("--spectrum", action="store_true", help="bar chart of the first-epoch mean of hessian/h{i}")
    p.add_argument("--k", type=int, default=None, help="number of eigenvalues for --spectrum (default: all)")
    p.add_argument("--first-epoch-steps", type=int, default=None,
                   help="average --spectrum over steps < N (default: the steps before epoch 1 starts)")
    p.add_argument("--title", default=None)
    return p


def _layout(n: int, grid: list[int] | None) -> tuple[int, int]:
    if grid is not None:
        rows, cols = grid
        if rows < 1 or cols < 1:
            raise ValueError(f"--grid {rows} {cols}: both must be positive.")
        if rows * cols < n:
            raise ValueError(f"--grid {rows} {cols} holds {rows * cols} runs but {n} were given.")
        return rows, cols
    if n <= _MAX_ONE_ROW:
        return 1, n
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def default_out(first: str | os.PathLike, spectrum: bool = False) -> Path:
    """``--out`` when none is given: ``curves.png`` (or ``spectrum.png``) inside the first RUN directory (beside
    an event file given as RUN)."""
    first = Path(first)
    folder = first.parent if first.is_file() else first
    return folder / ("spectrum.png" if spectrum else "curves.png")


def _has_chart_tags(run: Path, spectrum: bool) -> bool:
    try:
        scalars = read_scalars(run)
    except (FileNotFoundError, ValueError):
        return False
    if spectrum:
        return "hessian/h0" in scalars
    return any(_select_tag(s, scalars) is not None for s in SERIES)


def _expand(paths: Sequence[str], spectrum: bool) -> tuple[list[Path], list[Path]]:
    """The runs to draw and the runs skipped: below a directory that holds several runs, the runs holding none of
    the chart's tags (e.g. the ``version_N`` a ``validate`` writes) are skipped; a run named directly is kept."""
    runs, skipped = [], []
    for path in paths:
        found = find_runs(path)
        if len(found) == 1:
            runs += found
            continue
        for run in found:
            (runs if _has_chart_tags(run, spectrum) else skipped).append(run)
    return runs, skipped


def _run_cli(args: argparse.Namespace) -> list[Path]:
    runs, skipped = _expand(args.runs, args.spectrum)
    for run in skipped:
        print(f"lyapunov-cli plot: note: skipping {run}: it holds none of the chart's tags", file=sys.stderr)
    if not runs:
        raise ValueError(f"no run under {', '.join(args.runs)} holds the chart's tags "
                         f"({'hessian/h0' if args.spectrum else ', '.join(t for s in SERIES for t in s.tags)}).")
    if args.out is None:
        args.out = str(default_out(args.runs[0], args.spectrum))
    kw = dict(formats=args.formats, dpi=args.dpi)
    if len(runs) == 1 and args.grid is None:
        if args.spectrum:
            return plot_spectrum(runs[0], args.k, args.first_epoch_steps, args.out, title=args.title, **kw).paths
        return plot_run(runs[0], out=args.out, title=args.title, **kw).paths
    rows, cols = _layout(len(runs), args.grid)
    cells: list[Path | None] = list(runs) + [None] * (rows * cols - len(runs))
    grid = [cells[r * cols : (r + 1) * cols] for r in range(rows)]
    kind = "spectrum" if args.spectrum else "run"
    _output_paths(args.out, args.formats)  # a bad --format fails before the work
    drawn = plot_grid(grid, args.row_labels, args.col_labels, None, title=args.title, kind=kind, k=args.k,
                      first_epoch_steps=args.first_epoch_steps, **kw)
    if args.row_labels is None and args.col_labels is None:
        _name_panels(drawn)
    return _save(drawn.figure, args.out, args.formats, args.dpi)


def _name_panels(drawn: GridPlot) -> None:
    """Put each panel's run path, relative to the runs' common folder, above its config title: runs of one
    config (e.g. two versions, or two data sets before the log folder named them) are told apart."""
    runs = [Path(cell.run_dir).resolve() for row in drawn.cells for cell in row if cell is not None]
    common = Path(os.path.commonpath(runs)) if len(runs) > 1 else None
    for row in drawn.cells:
        for cell in row:
            if cell is not None:
                run = Path(cell.run_dir).resolve()
                name = str(run.relative_to(common)) if common is not None and run != common else run.name
                cell.ax.set_title(f"{name}\n{cell.title}" if cell.title else name, fontsize="small")


def main(argv: list[str] | None = None) -> int:
    """``lyapunov-cli plot RUN [RUN ...] [--out PATH] [--format png pdf svg] [--grid ROWS COLS] ...``.

    Prints the written paths; missing-tag warnings go to stderr. Returns 0 on success, 2 with a one-line error
    on stderr for a bad argument or an empty / unreadable log directory.

    Example::

        lyapunov-cli plot lightning_logs/version_0 --out figures/run.png --format png pdf
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage and error
        return int(exit_.code or 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingTagsWarning)
        try:
            paths = _run_cli(args)
        except (FileNotFoundError, ValueError) as err:
            for w in caught:
                if issubclass(w.category, MissingTagsWarning):
                    print(f"{parser.prog}: warning: {w.message}", file=sys.stderr)
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
    for w in caught:
        if issubclass(w.category, MissingTagsWarning):
            print(f"{parser.prog}: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for path in paths:
        print(path)
    return 0


# ------------------------------------------------------------------------------------------------ analysis

#: Marker per schedule in the analysis figures.
_SCHEDULE_MARKER = {"constant": "o", "cyclic": "^", "quasi_newton": "s"}
_ARCH_COLOR = {"linear": "tab:gray", "mlp": "tab:blue", "lenet1": "tab:green", "tinyresnet": "tab:purple",
               "resnet18": "tab:red"}


def _record_groups(payload: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(run row, seed record) pairs of a summary payload, spectrum runs left out, and the AdamW runs (their α·h0
    is not the SGD stability ratio; they have their own figure against the preconditioned edge)."""
    rows = {r["name"]: r for r in payload["runs"]}
    return [(rows[rec["name"]], rec) for rec in payload["records"]
            if rec["name"] in rows and rows[rec["name"]]["schedule"] not in ("spectrum", "adamw", "control_adam")]


def _steps_text(payload: dict[str, Any]) -> str:
    steps = sorted({int(rec["steps"]) for _, rec in _record_groups(payload)})
    if not steps:
        return "no runs"
    return f"{steps[0]}-{steps[-1]} steps" if len(steps) > 1 else f"{steps[0]} steps"


#: Schedules whose α is set to 1/h0: their points would sit on the line 1/h0 = α by definition, not as evidence.
_BY_CONSTRUCTION = ("quasi_newton",)


def plot_analysis(payload: dict[str, Any], out_dir: str | os.PathLike, *, dpi: float = 100) -> list[Path]:
    """The three analysis figures of a :mod:`lyapunov_callbacks.analysis.summary` payload (``summary_<data>.json``).

    - ``analysis_alpha_h0.png``: late-training median 1/h0 against median α, one point per run and seed, log-log
      (quasi-Newton runs left out: their α is 1/h0 by construction),
      with the lines 1/h0 = α (the paper's claim) and 1/h0 = α/2 (the edge of stability); rows: loss, columns:
      mini-batch and probe-batch h0; colour: architecture, marker: schedule.
    - ``analysis_lambda.png``: the distribution of λ (every estimate before divergence, seeds pooled) per run,
      with the band |λ| <= ``lambda_zero``.
    - ``analysis_qn.png``: the full-training-set loss per epoch of every quasi-Newton run beside the constant-LR
      runs of the same architecture and loss, each labelled with its fraction of rising mini-batch losses.

    Returns the written paths (a figure with no data is not written).
    """
    out_dir = Path(out_dir)
    data = payload["data"]
    pairs = _record_groups(payload)
    paths: list[Path] = []
    head = f"data: {data}; {_steps_text(payload)}"

    # 1/h0 against α
    losses = sorted({row["loss"] for row, _ in pairs})
    if losses:
        fig = _new_figure((10.0, 4.0 * len(losses)))
        axes = np.asarray(fig.subplots(len(losses), 2, squeeze=False))
        for r, loss in enumerate(losses):
            for c, source in enumerate(("minibatch", "probe")):
                ax = axes[r, c]
                xs, ys = [], []
                for row, rec in pairs:
                    a, inv = rec.get("alpha", math.nan), rec.get(f"inv_h0_{source}", math.nan)
                    if row["schedule"] in _BY_CONSTRUCTION:  # α = 1/h0 there: a point on the line by definition
                        continue
                    if row["loss"] != loss or not (np.isfinite(a) and np.isfinite(inv) and a > 0 and inv > 0):
                        continue
                    ax.scatter([a], [inv], color=_ARCH_COLOR.get(row["arch"], "k"),
                               marker=_SCHEDULE_MARKER.get(row["schedule"], "x"), s=28, alpha=0.8)
                    xs.append(a)
                    ys.append(inv)
                if xs:
                    lo = min(xs + ys) / 2
                    hi = max(xs + ys) * 2
                    grid = np.geomspace(lo, hi, 10)
                    ax.plot(grid, grid, "k-", linewidth=1, label="1/h0 = α (paper)")
                    ax.plot(grid, grid / 2, "k--", linewidth=1, label="1/h0 = α/2 (edge of stability)")
                    ax.set_xscale("log")
                    ax.set_yscale("log")
                    ax.legend(fontsize="x-small", loc="upper left")
                else:
                    ax.text(0.5, 0.5, "no h0 logged", ha="center", va="center", transform=ax.transAxes)
                ax.set_xlabel("α, median over the late window")
                ax.set_ylabel(f"{loss.upper()}: 1/h0 ({'mini-batch' if source == 'minibatch' else 'probe batch'})")
                ax.set_title(f"{loss.upper()}, {'mini-batch' if source == 'minibatch' else 'probe-batch'} h0",
                             fontsize="medium")
        handles = [Line2D([], [], color=col, marker="o", linestyle="", label=arch) for arch, col in _ARCH_COLOR.items()]
        handles += [Line2D([], [], color="k", marker=m, linestyle="", label=sch) for sch, m in _SCHEDULE_MARKER.items()
                    if sch not in _BY_CONSTRUCTION]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")
        fig.suptitle(f"Late-training 1/h0 against α (quasi-Newton runs left out: α = 1/h0 by construction)\n{head}")
        paths += _save(fig, out_dir / "analysis_alpha_h0.png", ("png",), dpi)

    # λ distribution
    lam_runs: dict[str, list[float]] = {}
    for row, rec in pairs:
        lam_runs.setdefault(row["name"], []).extend(rec.get("lambda_values") or [])
    lam_runs = {k: v for k, v in lam_runs.items() if v}
    if lam_runs:
        names = sorted(lam_runs)
        fig = _new_figure((8.0, 1.0 + 0.22 * len(names)))
        ax = fig.add_subplot()
        ax.boxplot([lam_runs[n] for n in names], orientation="horizontal", tick_labels=names, whis=(5, 95),
                   flierprops={"markersize": 2})
        zero = payload["thresholds"]["lambda_zero"]
        ax.axvspan(-zero, zero, color="tab:blue", alpha=0.12, label=f"|λ| ≤ {zero:g}")
        ax.axvline(0.0, color=_ZERO_LINE_COLOR, linestyle="--", linewidth=0.8)
        ax.tick_params(axis="y", labelsize="x-small")
        ax.set_xlabel("λ per step (every estimate before divergence, seeds pooled; whiskers 5-95 %)")
        ax.legend(fontsize="small", loc="lower right")
        ax.set_title(f"Distribution of the Lyapunov exponent λ per run\n{head}", fontsize="medium")
        paths += _save(fig, out_dir / "analysis_lambda.png", ("png",), dpi)

    # quasi-Newton against constant LR: full-training-set loss per epoch
    qn = sorted({(row["arch"], row["loss"]) for row, _ in pairs if row["schedule"] == "quasi_newton"})
    if qn:
        ncols = min(4, len(qn))
        nrows = math.ceil(len(qn) / ncols)
        fig = _new_figure((4.0 * ncols, 3.2 * nrows))
        axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
        for i, (arch, loss) in enumerate(qn):
            ax = axes[i // ncols, i % ncols]
            drew = False
            colors = iter(["tab:blue", "tab:green", "tab:purple", "tab:olive", "tab:cyan"])
            for row in sorted((r for r in payload["runs"] if r["arch"] == arch and r["loss"] == loss
                               and r["schedule"] in ("quasi_newton", "constant")),
                              key=lambda r: (r["schedule"] != "quasi_newton", r["lr"] or 0)):
                is_qn = row["schedule"] == "quasi_newton"
                color = "tab:red" if is_qn else next(colors, "k")
                rise = row.get("loss_rise_frac", math.nan)
                label = ("quasi-Newton" if is_qn else f"α = {row['lr']:g}") + (
                    f" (rises {100 * rise:.0f} %)" if np.isfinite(rise) else "")
                first = True
                for _, rec in (p for p in pairs if p[0]["name"] == row["name"]):
                    steps, vals = np.asarray(rec.get("full_loss_steps", [])), np.asarray(rec.get("full_loss", []))
                    if rec.get("diverged_at") is not None:
                        keep = steps < rec["diverged_at"]
                        steps, vals = steps[keep], vals[keep]
                    if steps.size == 0:
                        continue
                    ax.plot(steps, vals, color=color, marker="o", markersize=3,
                            linewidth=2.0 if is_qn else 1.0, label=label if first else None)
                    first, drew = False, True
            ax.set_title(f"{arch} · {loss.upper()}", fontsize="medium")
            ax.set_xlabel("global step")
            ax.set_ylabel("full-training-set loss")
            if drew:
                vals = [v for line in ax.lines for v in line.get_ydata() if np.isfinite(v)]
                if vals and min(vals) > 0 and max(vals) / min(vals) > LOG_SPAN:
                    ax.set_yscale("log")
                ax.legend(fontsize="x-small")
            else:
                ax.text(0.5, 0.5, "no train_full/loss logged", ha="center", va="center", transform=ax.transAxes)
        for j in range(len(qn), nrows * ncols):
            axes[j // ncols, j % ncols].set_axis_off()
        fig.suptitle("Quasi-Newton against constant α: full-training-set loss per epoch "
                     f"(rises: share of logged mini-batch losses above the previous one)\n{head}", fontsize="medium")
        paths += _save(fig, out_dir / "analysis_qn.png", ("png",), dpi)
    return paths
