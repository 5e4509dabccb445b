"""The numbers and verdicts of ``docs/results``: per-run statistics read from TensorBoard logs, their seed
aggregates, and a verdict per claim and per architecture/loss, computed with the thresholds of :data:`THRESHOLDS`.

No Lightning import: the logs are read by :mod:`lyapunov_callbacks.analysis.tb_reader`, everything else is NumPy.

The paper's claims tested here:

- **A (paper)**: along SGD the inverse sharpness settles near the learning rate, 1/h0 ≈ α, i.e. α·h0 ≈ 1.
- **B (edge of stability)**: the gradient-descent limit α·h0 ≈ 2 (a quadratic is stable for α·h0 < 2).
- **C (edge of chaos)**: the Lyapunov exponent of the SGD map stays near zero, |λ| small.
- **D (quasi-Newton)**: training with α = 1/h0 is stable and the loss decreases monotonically.

A and B are judged on the median of α·h0 over the last :data:`THRESHOLDS` ``late_fraction`` of a run's logged
steps, separately for the mini-batch h0 (``hessian/*``) and the probe-batch h0 (``hessian_probe/*``, a fixed batch
of >= 1,024 training samples), on the constant-LR and cyclic runs (under quasi-Newton α·h0 = 1 by construction).
They exclude each other: a run sides with the nearer target on a log scale (boundary √2 between 1 and 2), and a
run far from both (below 1/√2 or above 2√2) sides with neither. Before a run is placed at all it must have
trained (:func:`did_not_train`), not diverged, and settled (:func:`settling`); otherwise it is counted apart.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lyapunov_callbacks.analysis.tb_reader import Scalar, find_runs, read_scalars

__all__ = [
    "THRESHOLDS",
    "RunInfo",
    "describe_run",
    "divergence_step",
    "late_drift",
    "full_loss_rises",
    "h0_is_constant",
    "run_stats",
    "did_not_train",
    "ab_side",
    "ab_label",
    "settling",
    "lambda_label",
    "d_label",
    "collect",
    "aggregate",
    "verdicts",
    "write_summary",
    "render_results_page",
]

#: Every threshold a verdict uses, with the sentence that justifies it (quoted on the results page).
THRESHOLDS: dict[str, float] = {
    # the last 30 % of the logged steps: past the initial transient at >= 1,000 steps
    "late_fraction": 0.3,
    # λ "≈ 0" when |median λ| <= 0.05 per step (a perturbation grows or shrinks by at most 5 % a step)
    "lambda_zero": 0.05,
    # a run diverged at the first logged step whose loss is non-finite or > 10 x the first logged loss
    "diverge_factor": 10.0,
    # A/B: a median α·h0 sides with the nearer target on a log scale: the boundary is the geometric mean √2 of 1
    # and 2; below 1/√2 or above 2√2 it is as far from both as 1 is from 2 on the other side, and sides with none
    "ab_boundary": math.sqrt(2.0),
    # "not settled": fewer late estimates than this (per h0 source, and λ) cannot give a stable median ...
    "min_late_estimates": 10,
    # ... nor can a late 1/h0 whose second-half median differs from its first-half one by more than 10 %
    "settle_drift": 0.10,
    # "did not train": final validation accuracy within 5 points of chance (1 / number of classes) ...
    "chance_margin": 0.05,
    # ... or an h0 that never moves: (max - min) / |median| <= 1e-6 over the whole run (e.g. a dead MSE network,
    # whose Hessian is that of the loss in its constant output: h0 = 1 exactly)
    "h0_constant_rtol": 1e-6,
    # D: a rise of the full-training-set loss between epochs smaller than 1 % of the loss is not a rise
    "rise_tolerance": 0.01,
    # D: fewer full-training-set loss values than this (epochs + 1) cannot show monotone training
    "min_full_loss_points": 10,
}

#: Chance accuracy of a run's task: the ResNet-18 runs have ten classes, every other run two.
TEN_CLASS_ARCHS = ("resnet18",)
#: What a statistic reads when the committed summary predates it (it is never filled in by assumption).
NOT_MEASURED = "not measured in the committed runs"

#: Run groups; ``control_gd`` / ``control_adam``: full-batch gradient descent / Adam, the controls whose answer is
#: known (α·h0 -> 2, Cohen et al. 2021; the preconditioned ratio -> about 2, Cohen et al. 2022).
SCHEDULES = ("constant", "cyclic", "quasi_newton", "spectrum", "adamw", "control_gd", "control_adam")
PREFIXES = {"minibatch": "hessian", "probe": "hessian_probe"}


@dataclass(frozen=True)
class RunInfo:
    """What a run is, from its name in ``figures/figures.yaml`` (``constant/mlp_ce_lr0.1``, ``cyclic/mlp_mse``,
    ``quasi_newton/lenet1_ce``, ``resnet18_comparison/cyclic``, ``spectrum/mlp_ce_lr0.1``)."""

    name: str
    arch: str
    loss: str
    schedule: str
    lr: float | None


_NAME = re.compile(r"^(?P<arch>[a-z0-9]+?)_(?P<loss>ce|mse)(?:_lr(?P<lr>[0-9.]+))?$")


def describe_run(name: str) -> RunInfo:
    """Parse a run name into architecture, loss, schedule and constant LR.

    Raises:
        ValueError: a name that follows none of the patterns above.
    """
    group, _, base = name.partition("/")
    if group == "resnet18_comparison":
        m = re.fullmatch(r"(quasi_newton|cyclic|constant_lr(?P<lr>[0-9.]+))", base)
        if not m:
            raise ValueError(f"run {name!r}: expected resnet18_comparison/(quasi_newton|cyclic|constant_lr<LR>).")
        schedule = "constant" if base.startswith("constant") else base
        return RunInfo(name, "resnet18", "ce", schedule, float(m["lr"]) if m["lr"] else None)
    m = _NAME.match(base)
    if group not in SCHEDULES or not m:
        raise ValueError(f"run {name!r}: expected <{'|'.join(SCHEDULES)}>/<arch>_<ce|mse>[_lr<LR>].")
    return RunInfo(name, m["arch"], m["loss"], group, float(m["lr"]) if m["lr"] else None)


# ------------------------------------------------------------------------------------------------ one run


def divergence_step(loss: Scalar | None, factor: float = THRESHOLDS["diverge_factor"]) -> int | None:
    """The first logged step whose loss is non-finite or above ``factor`` x the first finite logged loss."""
    if loss is None or loss.values.size == 0:
        return None
    finite = np.isfinite(loss.values)
    first = loss.values[finite][0] if finite.any() else np.nan
    bad = ~finite | (loss.values > factor * first) if np.isfinite(first) else ~finite
    idx = np.nonzero(bad)[0]
    return int(loss.steps[idx[0]]) if idx.size else None


def _late(series: Scalar | None, start: float, stop: float | None) -> np.ndarray:
    if series is None:
        return np.empty(0)
    keep = series.steps >= start
    if stop is not None:
        keep &= series.steps < stop
    v = series.values[keep]
    return v[np.isfinite(v)]


def _median(v: np.ndarray) -> float:
    return float(np.median(v)) if v.size else math.nan


def _first_tag(scalars: dict[str, Scalar], *tags: str) -> Scalar | None:
    return next((scalars[t] for t in tags if t in scalars), None)


def late_drift(series: Scalar | None, start: float, stop: float | None) -> float:
    """How much a late-window series still moves: ``|median(second half) - median(first half)| / |median|`` of
    its finite values in ``[start, stop)``, the halves split at the middle estimate (NaN with fewer than 2)."""
    v = _late(series, start, stop)
    if v.size < 2:
        return math.nan
    half = v.size // 2
    mid = float(np.median(v))
    return abs(float(np.median(v[v.size - half:])) - float(np.median(v[:half]))) / abs(mid) if mid else math.inf


def full_loss_rises(values: Sequence[float], tolerance: float = THRESHOLDS["rise_tolerance"]) -> tuple[int, float]:
    """The rises of a per-epoch loss series: how many consecutive pairs rose by more than ``tolerance`` of the
    earlier value, and the largest relative rise ``(b - a) / a`` (0 when it never rose; NaN for < 2 values; a
    non-finite later value is an infinite rise)."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return 0, math.nan
    a, b = v[:-1], v[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.isfinite(b), (b - a) / np.abs(a), np.inf)
    rel = np.where(np.isfinite(a), rel, 0.0)
    return int((rel > tolerance).sum()), float(max(0.0, rel.max()))


def h0_is_constant(series: Scalar | None, stop: float | None,
                   rtol: float = THRESHOLDS["h0_constant_rtol"]) -> bool | None:
    """Whether h0 never moved over the run (before ``stop``): ``(max - min) <= rtol * |median|`` over at least
    two finite estimates; ``None`` without them."""
    v = _late(series, 0, stop)
    if v.size < 2:
        return None
    return bool(v.max() - v.min() <= rtol * abs(float(np.median(v))))


def run_stats(scalars: dict[str, Scalar], late_fraction: float = THRESHOLDS["late_fraction"]) -> dict[str, Any]:
    """Statistics of one run's scalars (the columns of the summary table).

    Keys: ``steps`` (last logged training step), ``diverged_at`` (:func:`divergence_step` or ``None``),
    ``loss_first``, ``loss_late`` (median of ``train/loss`` over the late window), ``val_acc`` (last logged);
    per h0 source ``s`` in ``minibatch`` / ``probe``: ``alpha_h0_{s}`` (median α·h0, late window) with
    ``alpha_h0_{s}_q10`` / ``_q90`` (its spread over the late window), ``inv_h0_{s}`` (median 1/h0),
    ``n_h0_{s}`` (estimates in the window), ``drift_{s}`` (:func:`late_drift` of 1/h0), ``h0_constant_{s}``
    (:func:`h0_is_constant` over the whole run); ``alpha`` (median α, late window); λ over the late window only:
    ``lambda_median``, ``lambda_q10``, ``lambda_q90``, ``lambda_pos_frac``, ``lambda_n``; ``lambda_values`` and
    ``lambda_steps`` (every λ estimate before divergence, for the distribution plot);
    ``loss_rise_frac`` (fraction of consecutive logged mini-batch losses that rose); ``full_loss`` (the
    ``train_full/loss`` series, one value per epoch), ``full_loss_rises`` (how many times it rose by more than
    ``rise_tolerance``) and ``full_loss_max_rise`` (its largest relative rise).

    The late window is the logged steps ``>= (1 - late_fraction) * steps``, cut at the divergence step.
    """
    nan = math.nan
    loss = _first_tag(scalars, "train/loss", "train/loss_step")
    steps = int(loss.steps[-1]) if loss is not None and loss.steps.size else 0
    for s in scalars.values():
        if s.steps.size:
            steps = max(steps, int(s.steps[-1]))
    div = divergence_step(loss)
    start, stop = (1.0 - late_fraction) * steps, (None if div is None else div)
    out: dict[str, Any] = {"steps": steps, "diverged_at": div}
    if loss is not None and loss.values.size:
        out["loss_first"] = float(loss.values[0])
        out["loss_late"] = _median(_late(loss, start, stop))
        pre = loss.values if div is None else loss.values[loss.steps < div]
        d = np.diff(pre[np.isfinite(pre)])
        out["loss_rise_frac"] = float((d > 0).mean()) if d.size else nan
    else:
        out.update(loss_first=nan, loss_late=nan, loss_rise_frac=nan)
    acc = scalars.get("val/acc")
    out["val_acc"] = float(acc.values[-1]) if acc is not None and acc.values.size else nan
    lr = _first_tag(scalars, "quasi_newton/lr", "optim/lr", "lr-SGD")
    out["alpha"] = _median(_late(lr, start, stop))
    for source, prefix in PREFIXES.items():
        h0 = scalars.get(f"{prefix}/h0")
        stab = scalars.get(f"{prefix}/stability")
        if stab is None and h0 is not None and lr is not None:  # α·h0 from α at the same steps
            common, ih, il = np.intersect1d(h0.steps, lr.steps, return_indices=True)
            stab = Scalar(common, h0.values[ih] * lr.values[il])
        ratio = _late(stab, start, stop)
        inv_series = scalars.get(f"{prefix}/inv_h0")
        if inv_series is None and h0 is not None:
            with np.errstate(divide="ignore"):
                inv_series = Scalar(h0.steps, 1.0 / h0.values)
        out[f"alpha_h0_{source}"] = _median(ratio)
        out[f"alpha_h0_{source}_q10"] = float(np.quantile(ratio, 0.1)) if ratio.size else nan
        out[f"alpha_h0_{source}_q90"] = float(np.quantile(ratio, 0.9)) if ratio.size else nan
        out[f"inv_h0_{source}"] = _median(_late(inv_series, start, stop))
        out[f"n_h0_{source}"] = int(ratio.size)
        out[f"drift_{source}"] = late_drift(inv_series, start, stop)
        out[f"h0_constant_{source}"] = h0_is_constant(h0, stop)
    pre = _late(scalars.get("hessian/pre_stability"), start, stop)
    out["pre_stability"] = _median(pre)
    out["n_pre_stability"] = int(pre.size)
    lam = scalars.get("lyapunov/lambda")
    lam_v = _late(lam, start, stop)
    out["lambda_median"] = _median(lam_v)
    out["lambda_q10"] = float(np.quantile(lam_v, 0.1)) if lam_v.size else nan
    out["lambda_q90"] = float(np.quantile(lam_v, 0.9)) if lam_v.size else nan
    out["lambda_pos_frac"] = float((lam_v > 0).mean()) if lam_v.size else nan
    out["lambda_n"] = int(lam_v.size)
    keep = np.ones(0, bool) if lam is None else np.isfinite(lam.values) & (
        True if div is None else lam.steps < div)
    out["lambda_values"] = [] if lam is None else [float(v) for v in lam.values[keep]]
    out["lambda_steps"] = [] if lam is None else [int(s) for s in lam.steps[keep]]
    full = scalars.get("train_full/loss")
    out["full_loss"] = [float(v) for v in full.values] if full is not None else []
    out["full_loss_steps"] = [int(s) for s in full.steps] if full is not None else []
    rises, biggest = full_loss_rises(out["full_loss"])
    out["full_loss_rises"] = rises if len(out["full_loss"]) > 1 else None
    out["full_loss_max_rise"] = biggest
    return out


@dataclass
class Record:
    """One seed of one run: what it is, where its logs are, its :func:`run_stats`."""

    info: RunInfo
    seed: str
    path: str
    stats: dict[str, Any] = field(default_factory=dict)


def collect(runs: Iterable[tuple[str, str | Path]]) -> list[Record]:
    """Read every ``(run name, log directory)``: each run directory below it (one per seed) becomes a :class:`Record`.

    Directories without logs are skipped (a run that failed or was not trained).
    """
    records = []
    for name, root in runs:
        root = Path(root)
        if not root.exists():
            continue
        try:
            dirs = find_runs(root)
        except FileNotFoundError:
            continue
        for d in dirs:
            try:
                scalars = read_scalars(d)
            except (FileNotFoundError, ValueError):
                continue
            seed = d.name if d != root else "seed0"
            records.append(Record(describe_run(name), seed, str(d), run_stats(scalars)))
    return records


# ------------------------------------------------------------------------------------------------ seeds


NUMERIC = ("steps", "loss_first", "loss_late", "val_acc", "alpha", "alpha_h0_minibatch", "inv_h0_minibatch",
           "alpha_h0_probe", "inv_h0_probe", "lambda_median", "lambda_q10", "lambda_q90", "lambda_pos_frac",
           "loss_rise_frac", "alpha_h0_minibatch_q10", "alpha_h0_minibatch_q90", "alpha_h0_probe_q10",
           "alpha_h0_probe_q90", "drift_minibatch", "drift_probe", "pre_stability")


def chance_accuracy(arch: str) -> float:
    """Accuracy of guessing: 1/10 for the ten-class ResNet-18 runs, 1/2 for the two-class ones."""
    return 0.1 if arch in TEN_CLASS_ARCHS else 0.5


def did_not_train(stats: dict[str, Any], arch: str, loss: str = "ce") -> str | None:
    """Why one seed did not train, or ``None``: its final validation accuracy lies within ``chance_margin`` of
    chance, or its h0 (mini-batch or probe) stayed constant to ``h0_constant_rtol`` over the whole run. A run
    that diverged is not judged here (it is listed with its divergence step). The linear model with MSE is a
    quadratic, whose Hessian is constant by construction: the h0 rule does not apply to it."""
    if stats.get("diverged_at") is not None:
        return None
    acc, chance = stats.get("val_acc", math.nan), chance_accuracy(arch)
    if isinstance(acc, (int, float)) and math.isfinite(acc) and abs(acc - chance) <= THRESHOLDS["chance_margin"]:
        return f"validation accuracy {100 * acc:.0f} % (chance {100 * chance:.0f} %)"
    for source in PREFIXES if not (arch == "linear" and loss == "mse") else ():
        if stats.get(f"h0_constant_{source}"):
            return f"{source} h0 constant to {THRESHOLDS['h0_constant_rtol']:g}"
    return None


def aggregate(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per run name: the median over seeds of every :data:`NUMERIC` statistic, with min and max over seeds
    for α·h0; the number of seeds; per seed the divergence step, the full-loss rises (recounted with
    ``rise_tolerance`` from the stored series) and why it did not train (:func:`did_not_train`); the fewest late
    estimates of any seed (``n_h0_*``, ``lambda_n``) and of full-loss values (``full_loss_n``); the largest
    relative full-loss rise of any seed (``full_loss_max_rise``). Where a record predates a statistic (a committed
    summary of older code) the row holds ``None`` for it (see :data:`NOT_MEASURED`) rather than a guess."""
    by_name: dict[str, list[Record]] = {}
    for r in records:
        by_name.setdefault(r.info.name, []).append(r)
    rows = []
    for name, recs in by_name.items():
        info = recs[0].info
        row: dict[str, Any] = {**asdict(info), "seeds": len(recs)}
        for key in NUMERIC:
            v = np.array([r.stats.get(key, math.nan) for r in recs], dtype=float)
            v = v[np.isfinite(v)]
            row[key] = float(np.median(v)) if v.size else math.nan
            if key in ("alpha_h0_minibatch", "alpha_h0_probe"):
                row[key + "_min"] = float(v.min()) if v.size else math.nan
                row[key + "_max"] = float(v.max()) if v.size else math.nan
        for source in PREFIXES:  # drift and constancy were added later: absent in older summaries
            measured = all(f"drift_{source}" in r.stats for r in recs)
            row[f"drift_{source}_measured"] = measured
            row[f"n_h0_{source}"] = min(int(r.stats.get(f"n_h0_{source}") or 0) for r in recs)
        row["lambda_late_measured"] = all("lambda_steps" in r.stats for r in recs)
        row["pre_stability_measured"] = all("pre_stability" in r.stats for r in recs)
        row["n_pre_stability"] = min(int(r.stats.get("n_pre_stability") or 0) for r in recs)
        row["lambda_n"] = min(int(r.stats.get("lambda_n") or 0) for r in recs)
        row["diverged_at"] = [r.stats.get("diverged_at") for r in recs]
        row["did_not_train"] = [did_not_train(r.stats, info.arch, info.loss) for r in recs]
        rises = [full_loss_rises(r.stats.get("full_loss") or []) for r in recs]
        row["full_loss_rises"] = [n if len(r.stats.get("full_loss") or []) > 1 else None
                                  for (n, _), r in zip(rises, recs)]
        big = [b for _, b in rises if math.isfinite(b)]
        row["full_loss_max_rise"] = max(big) if big else math.nan
        row["full_loss_n"] = min(len(r.stats.get("full_loss") or []) for r in recs)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ verdicts


#: The four places of a median α·h0 on the log scale (:func:`ab_side`).
SIDES = ("below A", "A", "B", "above B")


def ab_side(value: float) -> str:
    """Which of A (α·h0 ≈ 1) and B (≈ 2) a median α·h0 sides with: the nearer on a log scale, the boundary at
    ``ab_boundary`` = √2; ``below A`` under 1/√2 and ``above B`` over 2√2 (farther from the nearer target than
    the two targets are from each other's boundary); ``n/a`` for a non-finite value."""
    b = THRESHOLDS["ab_boundary"]
    if not math.isfinite(value):
        return "n/a"
    if value < 1.0 / b:
        return "below A"
    if value < b:
        return "A"
    if value < 2.0 * b:
        return "B"
    return "above B"


def _apart(row: dict[str, Any]) -> str | None:
    """Why a run is counted apart from every claim's evidence: it diverged in a seed or did not train."""
    if any(d is not None for d in row["diverged_at"]):
        return "diverged"
    if any(x is not None for x in row["did_not_train"]):
        return "did not train"
    return None


def settling(row: dict[str, Any], source: str) -> str | None:
    """Why the late α·h0 of ``source`` is not settled (``None`` when it is): fewer than ``min_late_estimates``
    late estimates in some seed, a late 1/h0 that drifts by more than ``settle_drift`` (median over seeds), or a
    drift the committed summary did not measure."""
    n, t = row.get(f"n_h0_{source}", 0), THRESHOLDS
    if n < t["min_late_estimates"]:
        return f"not settled ({n} late estimates < {t['min_late_estimates']})"
    if not row.get(f"drift_{source}_measured", False):
        return f"late drift {NOT_MEASURED}"
    drift = row.get(f"drift_{source}", math.nan)
    if not math.isfinite(drift) or drift > t["settle_drift"]:
        return f"not settled (late 1/h0 drifts {100 * drift:.0f} % > {100 * t['settle_drift']:.0f} %)"
    return None


def ab_label(row: dict[str, Any], source: str) -> str:
    """A run's A/B label for one h0 source: ``diverged`` / ``did not train`` (counted apart), ``n/a`` (no h0),
    ``not settled ...`` (:func:`settling`), else its :func:`ab_side`."""
    apart = _apart(row)
    if apart:
        return apart
    if not math.isfinite(row.get(f"alpha_h0_{source}", math.nan)):
        return "n/a"
    return settling(row, source) or ab_side(row[f"alpha_h0_{source}"])


def _spread(row: dict[str, Any], source: str) -> str:
    k = f"alpha_h0_{source}"
    seeds = (f"seeds {row[k + '_min']:.3g}–{row[k + '_max']:.3g}" if row["seeds"] > 1 else "1 seed")
    q10, q90 = row.get(k + "_q10", math.nan), row.get(k + "_q90", math.nan)
    late = (f"late q10–q90 {q10:.3g}–{q90:.3g}" if math.isfinite(q10) and math.isfinite(q90)
            else f"late spread {NOT_MEASURED}")
    return f"{row[k]:.3g} [{seeds}; {late}; n={row.get(f'n_h0_{source}', 0)}]"


def lambda_label(row: dict[str, Any]) -> str:
    """A run's C label: counted apart as for A/B; ``n/a`` without λ; ``not measured`` where the committed summary
    has λ over the whole run only; ``not settled`` with fewer than ``min_late_estimates`` late λ; else ``≈ 0``
    (|median| <= ``lambda_zero``), ``> 0`` or ``< 0``."""
    apart = _apart(row)
    if apart:
        return apart
    lam = row["lambda_median"]
    if not math.isfinite(lam):
        return "n/a"
    if not row.get("lambda_late_measured", False):
        return f"late λ {NOT_MEASURED}"
    if row["lambda_n"] < THRESHOLDS["min_late_estimates"]:
        return f"not settled ({row['lambda_n']} late λ < {THRESHOLDS['min_late_estimates']})"
    return "≈ 0" if abs(lam) <= THRESHOLDS["lambda_zero"] else "> 0" if lam > 0 else "< 0"


def _claim_verdict(labels: list[str], good: str, judged: Sequence[str]) -> str:
    """``agrees`` (every judged run is ``good``), ``partly`` (some), ``disagrees`` (none), else ``not settled``
    (runs exist but none could be judged) or ``no data``."""
    real = [x for x in labels if x in judged]
    if real:
        n = sum(x == good for x in real)
        return "agrees" if n == len(real) else "partly" if n else "disagrees"
    if any(x.startswith("not settled") for x in labels):
        return "not settled"
    if any(NOT_MEASURED in x for x in labels):
        return "not measured"
    return "no data"


def d_label(row: dict[str, Any]) -> str:
    """A quasi-Newton run's D label: ``disagrees`` (diverged, or a full-training-set loss rise above
    ``rise_tolerance``), ``did not train``, ``too short`` (fewer than ``min_full_loss_points`` full-loss values),
    ``no data``, else ``agrees``."""
    if any(d is not None for d in row["diverged_at"]):
        return "disagrees"
    if any(x is not None for x in row["did_not_train"]):
        return "did not train"
    rises = [x for x in row["full_loss_rises"] if x is not None]
    if not rises:
        return "no data"
    if row["full_loss_n"] < THRESHOLDS["min_full_loss_points"]:
        return f"too short ({row['full_loss_n']} full-loss values < {THRESHOLDS['min_full_loss_points']})"
    return "agrees" if max(rises) == 0 else "disagrees"


def _pct(x: float) -> str:
    return "—" if not math.isfinite(x) else "∞" if math.isinf(x) else f"{100 * x:.2g} %"


def verdicts(rows: Sequence[dict[str, Any]], figure_of: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A verdict per claim (A, B, C, D) and per architecture/loss, each with its evidence.

    A/B, per h0 source: each constant-LR or cyclic run gets :func:`ab_label`; A and B exclude each other
    (:func:`ab_side`). The claim's verdict counts only the runs placed on the scale (``below A``, ``A``, ``B``,
    ``above B``): ``agrees`` when all are on its side, ``partly`` when some, ``disagrees`` when none,
    ``not settled`` when no run could be placed. Runs that diverged, did not train or did not settle are listed
    in the evidence, with their step or reason, and counted apart.
    C: :func:`lambda_label` per run; the same counting with ``≈ 0`` as the good label.
    D: :func:`d_label` per quasi-Newton run, with the largest relative full-training-set loss rise of QN beside
    that of each constant-LR run of the same architecture/loss.

    Args:
        rows: :func:`aggregate` rows.
        figure_of: run name -> the figures showing it (evidence pointers).
    """
    figure_of = figure_of or {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["schedule"] in ("constant", "cyclic", "quasi_newton"):
            groups.setdefault((row["arch"], row["loss"]), []).append(row)
    out = []
    for (arch, loss), grp in sorted(groups.items()):
        sgd = [r for r in grp if r["schedule"] in ("constant", "cyclic")]
        ev_div = "; ".join(_divergence(r) for r in sgd if any(d is not None for d in r["diverged_at"]))
        for claim, good in () if not sgd else (("A: α·h0 ≈ 1 (paper)", "A"), ("B: α·h0 ≈ 2 (edge of stability)", "B")):
            for source in PREFIXES:
                per = [(r, ab_label(r, source)) for r in sgd]
                ev = "; ".join(f"{r['name']} {_spread(r, source)} → {b}" if b in SIDES or b.startswith("not settled")
                               or NOT_MEASURED in b
                               else f"{r['name']}: {_why_apart(r, b)}" for r, b in per if b != "n/a")
                out.append(_verdict(claim, arch, loss, source, _claim_verdict([b for _, b in per], good, SIDES),
                                    ev or "no h0 logged", ev_div, [r["name"] for r, _ in per], figure_of,
                                    _counts([b for _, b in per])))
        per = [(r, lambda_label(r)) for r in sgd]
        ev = "" if not sgd else "; ".join(f"{r['name']} median late λ {r['lambda_median']:.2g} (q10–q90 {r['lambda_q10']:.2g}–"
                       f"{r['lambda_q90']:.2g}, n={r['lambda_n']}) → {b}" if b in ("≈ 0", "> 0", "< 0") or
                       b.startswith("not settled") or NOT_MEASURED in b else f"{r['name']}: {_why_apart(r, b)}"
                       for r, b in per if b != "n/a")
        out += [] if not sgd else [_verdict("C: λ ≈ 0 (edge of chaos)", arch, loss, "minibatch",
                            _claim_verdict([b for _, b in per], "≈ 0", ("≈ 0", "> 0", "< 0")),
                            ev or "no λ logged", ev_div, [r["name"] for r, _ in per], figure_of,
                            _counts([b for _, b in per]))]
        const = [r for r in grp if r["schedule"] == "constant" and math.isfinite(r["full_loss_max_rise"])]
        const_txt = ", ".join(f"{r['name'].split('/')[-1]} {_pct(r['full_loss_max_rise'])}" for r in const)
        for r in (r for r in grp if r["schedule"] == "quasi_newton"):
            label = d_label(r)
            rises = [x for x in r["full_loss_rises"] if x is not None]
            ev = (f"{r['name']}: largest full-train loss rise {_pct(r['full_loss_max_rise'])}, rises > "
                  f"{100 * THRESHOLDS['rise_tolerance']:g} % per seed {rises} over {r['full_loss_n']} values; "
                  f"constant α, same task: {const_txt or 'none'}")
            if label == "did not train":
                ev = f"{r['name']}: {_why_apart(r, label)}"
            out.append(_verdict("D: QN loss decreases monotonically", arch, loss, "-", label, ev,
                                _divergence(r) if any(d is not None for d in r["diverged_at"]) else "",
                                [r["name"]], figure_of, {label: 1}))
    return out


def _why_apart(row: dict[str, Any], label: str) -> str:
    if label == "diverged":
        return _divergence(row).split(" ", 1)[1]
    if label == "did not train":
        why = [x for x in row["did_not_train"] if x is not None]
        return f"did not train in {len(why)} of {len(row['did_not_train'])} seeds ({why[0]})"
    return label


def _counts(labels: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in labels:
        key = "not measured" if NOT_MEASURED in x else "not settled" if x.startswith("not settled") else x
        out[key] = out.get(key, 0) + 1
    return out


def _divergence(row: dict[str, Any]) -> str:
    """How a run diverged: its step, or with several seeds how many diverged and where (a run that diverges in
    one seed of three near the edge of stability is not one that diverges in all three)."""
    steps = sorted(d for d in row["diverged_at"] if d is not None)
    if len(row["diverged_at"]) == 1:
        return f"{row['name']} diverged at step {steps[0]}"
    return (f"{row['name']} diverged in {len(steps)} of {len(row['diverged_at'])} seeds, at step"
            f"{'s' if len(steps) > 1 else ''} {', '.join(str(d) for d in steps)}")


def _verdict(claim, arch, loss, source, label, evidence, diverged, names, figure_of, counts) -> dict[str, Any]:
    figs = sorted({f for n in names for f in figure_of.get(n, "").split(",") if f},
                  key=lambda f: int(re.sub(r"\D", "", f) or 0))
    return {"claim": claim, "arch": arch, "loss": loss, "h0": source, "verdict": label, "evidence": evidence,
            "diverged": diverged, "figures": ", ".join(figs), "counts": counts}


# ------------------------------------------------------------------------------------------------ files


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if not math.isfinite(v) else f"{v:.3g}"
    if isinstance(v, list):
        return ",".join("—" if x is None else str(x) for x in v)
    return str(v)


TABLE_COLUMNS = ("name", "seeds", "steps", "alpha", "alpha_h0_minibatch", "alpha_h0_probe", "inv_h0_minibatch",
                 "inv_h0_probe", "lambda_median", "lambda_pos_frac", "loss_first", "loss_late", "loss_rise_frac",
                 "full_loss_rises", "val_acc", "diverged_at", "n_h0_minibatch", "n_h0_probe", "drift_minibatch",
                 "drift_probe", "lambda_n", "full_loss_max_rise", "did_not_train", "pre_stability")


def write_summary(records: Sequence[Record], out_dir: str | Path, data: str, *,
                  figure_of: dict[str, str] | None = None, meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``summary_<data>.json`` (everything), ``summary_<data>.csv`` (one row per run) and
    ``summary_<data>.md`` (the tables the results page quotes) into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    verdict_rows = verdicts(rows, figure_of)
    payload = {"data": data, "thresholds": THRESHOLDS, "meta": meta or {}, "runs": rows,
               "verdicts": verdict_rows,
               "records": [{"name": r.info.name, "seed": r.seed, "path": r.path, **r.stats} for r in records]}
    paths = {"json": out_dir / f"summary_{data}.json", "csv": out_dir / f"summary_{data}.csv",
             "md": out_dir / f"summary_{data}.md"}
    paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(TABLE_COLUMNS)
        for row in rows:
            w.writerow([_fmt(row.get(c)) for c in TABLE_COLUMNS])
    paths["md"].write_text(summary_markdown(payload))
    return paths


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def summary_markdown(payload: dict[str, Any]) -> str:
    """The summary tables of one data set as markdown (runs, then verdicts)."""
    data, meta = payload["data"], payload.get("meta", {})
    lines = [f"# Summary: data set `{data}`", ""]
    if meta:
        lines += [", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    t = payload["thresholds"]
    lines += [f"Late window: last {100 * t['late_fraction']:.0f} % of the logged steps. A / B: the nearer target on "
              f"a log scale (boundary √2). Not settled: < {t['min_late_estimates']} late estimates or a late 1/h0 "
              f"drift > {100 * t['settle_drift']:.0f} %. λ ≈ 0: |median late λ| ≤ {t['lambda_zero']:g}. D: rises "
              f"> {100 * t['rise_tolerance']:g} % of the loss. Diverged: loss non-finite or > "
              f"{t['diverge_factor']:g} × its first value. Values are medians over seeds.", "", "## Verdicts", ""]
    lines += _table(("claim", "arch", "loss", "h0", "verdict", "evidence", "diverged", "figures"),
                    [[v[k] for k in ("claim", "arch", "loss", "h0", "verdict", "evidence", "diverged", "figures")]
                     for v in payload["verdicts"]])
    lines += ["", "## Runs", ""]
    lines += _table(TABLE_COLUMNS, [[row.get(c) for c in TABLE_COLUMNS] for row in payload["runs"]])
    return "\n".join(lines) + "\n"


NOT_RUN = ("**Not run: no `docs/results/summary_{data}.json`. `make figures DATA={data}` trains the runs and "
           "writes this section.**")

#: The claims in the words of the verdict paragraph.
CLAIM_WORDS = {"A": "A (α·h0 ≈ 1, the paper)", "B": "B (α·h0 ≈ 2, edge of stability)", "C": "C (λ ≈ 0, edge of chaos)",
               "D": "D (quasi-Newton loss decreases monotonically)"}

#: What λ ≈ 0 can and cannot tell apart (quoted on the page).
LAMBDA_NOTE = (
    "λ ≈ 0 does not tell A from B. Along a flat direction of the Hessian (most of a network's parameters) the "
    "tangent map multiplies a perturbation by 1 − α·0 = 1, so λ is pulled to 0 whatever α·h0 is; a top direction "
    "at α·h0 = 1 contracts (|1 − 1| = 0) and one at α·h0 = 2 neither grows nor shrinks (|1 − 2| = 1), and both "
    "are averaged with the flat ones. What λ can tell apart is a trajectory that amplifies perturbations over "
    "the window (λ clearly > 0: chaos, α·h0 > 2 along the way) from one that does not (λ ≤ 0); |λ| of 1e-7 to "
    "1e-3 per step on trained runs is that second case.")


def payload_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The :func:`aggregate` rows of a summary, recomputed from its per-seed records with this code's rules (a
    committed summary of older code lacks some statistics: they read :data:`NOT_MEASURED`, never a guess)."""
    records = [Record(describe_run(r["name"]), r["seed"], r.get("path", ""),
                      {k: v for k, v in r.items() if k not in ("name", "seed", "path")})
               for r in payload.get("records", [])]
    return aggregate(records)


def _count_text(counts: dict[str, int], good: str) -> str:
    order = [*SIDES, "≈ 0", "> 0", "< 0", "agrees", "disagrees", "not settled", "not measured", "did not train",
             "diverged"]
    words = {"A": "side with A", "B": "side with B", "below A": "below A (< 1/√2)", "above B": "above B (> 2√2)",
             "not measured": f"whose settling is {NOT_MEASURED}",
             "≈ 0": "have λ ≈ 0", "> 0": "have λ > 0", "< 0": "have λ < 0"}
    parts = [f"{counts[k]} {words.get(k, k)}" for k in order if counts.get(k)]
    parts += [f"{v} {k}" for k, v in counts.items() if k not in order and v]
    return ", ".join(parts) if parts else "no run"


def _claim_sentence(vs: list[dict[str, Any]], good: str) -> str:
    """One sentence for one claim on one data set: the architecture/loss verdicts, then the runs by label."""
    by: dict[str, int] = {}
    runs: dict[str, int] = {}
    for v in vs:
        by[v["verdict"]] = by.get(v["verdict"], 0) + 1
        for k, n in v["counts"].items():
            runs[k] = runs.get(k, 0) + n
    pairs = ", ".join(f"{n} {k}" for k, n in sorted(by.items(), key=lambda kv: -kv[1]))
    return f"architecture/loss pairs: {pairs}; runs: {_count_text(runs, good)}"


def verdict_paragraph(data: str, payload: dict[str, Any], rows: list[dict[str, Any]],
                      vs: list[dict[str, Any]]) -> list[str]:
    """The verdict in words for one data set (markdown lines), every number from ``rows`` / ``vs``."""
    lines = [f"### {data}", ""]
    for key, good in (("A", "A"), ("B", "B")):
        for source in PREFIXES:
            sel = [v for v in vs if v["claim"].startswith(key) and v["h0"] == source]
            if sel:
                lines.append(f"- **{CLAIM_WORDS[key]}**, {source} h0: {_claim_sentence(sel, good)}.")
    for key, good in (("C", "≈ 0"), ("D", "agrees")):
        sel = [v for v in vs if v["claim"].startswith(key)]
        if sel:
            lines.append(f"- **{CLAIM_WORDS[key]}**: {_claim_sentence(sel, good)}.")
    for v in vs:
        if v["claim"].startswith("D"):
            lines.append(f"  - {v['verdict']}: {v['evidence']}.")
    by_name = {r["name"]: r for r in rows}
    controls = [r for r in rows if r["schedule"].startswith("control")]
    if controls:
        parts = []
        for r in controls:
            if r["schedule"] == "control_gd":
                parts.append(f"full-batch GD `{r['name']}`: late α·h0 {_fmt(r['alpha_h0_minibatch'])} "
                             f"(q10–q90 {_fmt(r['alpha_h0_minibatch_q10'])}–{_fmt(r['alpha_h0_minibatch_q90'])}, "
                             f"{r['n_h0_minibatch']} late estimates; known answer: 2)")
            else:
                parts.append(f"full-batch Adam `{r['name']}`: late pre_stability {_fmt(r['pre_stability'])} "
                             f"({r['n_pre_stability']} late estimates; known answer: about 2)")
        lines.append("- **Controls**: " + "; ".join(parts) + ".")
    else:
        lines.append(f"- **Controls** (full-batch GD and Adam, known answers 2): {NOT_MEASURED}.")
    judged = [r for r in rows if r["schedule"] != "spectrum"]  # one-epoch spectrum runs are not trained to an end
    div = [r for r in judged if any(d is not None for d in r["diverged_at"])]
    lines.append("- **Diverged**: " + ("; ".join(_divergence(r).replace(" diverged", "", 1) for r in div)
                                       if div else "none") + ".")
    dnt = [r for r in judged if any(x is not None for x in r["did_not_train"])]
    lines.append("- **Did not train** (counted apart): " + ("; ".join(
        f"{r['name']} ({_why_apart(r, 'did not train').split(' (', 1)[1]}" for r in dnt) if dnt else "none") + ".")
    lin = [r for r in rows if r["arch"] == "linear" and r["loss"] == "mse" and r["schedule"] == "constant"]
    if lin:
        n_div = sum(any(d is not None for d in r["diverged_at"]) for r in lin)
        which = ", ".join(f"α = {r['lr']:g}" for r in lin if any(d is not None for d in r["diverged_at"]))
        lines.append(f"- **Linear model, MSE, constant α**: {n_div} of {len(lin)} learning rates diverged"
                     + (f" ({which})." if which else "."))
    qn_lin = by_name.get("quasi_newton/linear_mse")
    if qn_lin:
        lines.append(f"- **Quasi-Newton on least squares** (`quasi_newton/linear_mse`): D {d_label(qn_lin)}, "
                     f"late training loss {_fmt(qn_lin['loss_late'])}, validation accuracy {_fmt(qn_lin['val_acc'])}.")
    r18 = [r for r in rows if r["arch"] == "resnet18"]
    if r18:
        steps = sorted({int(r["steps"]) for r in r18 if math.isfinite(r["steps"])})
        lines.append(f"- **ResNet-18 comparison** (figure 10): {', '.join(map(str, steps))} steps, "
                     f"{max(r['seeds'] for r in r18)} seed: untested at this scale (no claim is judged on it).")
    return lines + [""]


def verdict_grid(vs: Sequence[dict[str, Any]]) -> list[str]:
    """One row per architecture/loss: the verdict of each claim (and h0 source), then the figures."""
    cols = (("A", "minibatch"), ("A", "probe"), ("B", "minibatch"), ("B", "probe"), ("C", "minibatch"), ("D", "-"))
    grid: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
    figs: dict[tuple[str, str], set[str]] = {}
    for v in vs:
        key = (v["arch"], v["loss"])
        grid.setdefault(key, {})[(v["claim"][0], v["h0"])] = v["verdict"].split(" (")[0]
        figs.setdefault(key, set()).update(f for f in v["figures"].split(", ") if f)
    order = lambda f: (re.sub(r"\d", "", f), int(re.sub(r"\D", "", f) or 0))
    return _table(("arch", "loss", "A mini-batch", "A probe", "B mini-batch", "B probe", "C", "D", "figures"),
                  [[a, l, *(g.get(c, "—") for c in cols), ", ".join(sorted(figs[(a, l)], key=order))]
                   for (a, l), g in sorted(grid.items())])


def _side_text(r: dict[str, Any], source: str) -> str:
    """``2.84 → B``, or for a run not placed its side and why: ``2.36 (B; not settled: 3 late estimates < 10)``."""
    v = r.get(f"alpha_h0_{source}", math.nan)
    if not math.isfinite(v):
        return "—"
    label = ab_label(r, source)
    if label in SIDES:
        return f"{v:.3g} → {label}"
    why = "settling not measured" if NOT_MEASURED in label else label.replace(" (", ": ", 1).rstrip(")")
    return f"{v:.3g} ({ab_side(v)}; {why})"


def outcome_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The compact outcome table of one data set: final training loss, validation accuracy, divergence, late
    α·h0 on the mini-batch and the probe batch (median over seeds, with the A/B label), per run."""
    out = []
    for r in rows:
        if r["schedule"] == "spectrum":
            continue
        div = [d for d in r["diverged_at"] if d is not None]
        labels = [_side_text(r, source) if r["schedule"] in ("constant", "cyclic")
                  else _fmt(r.get(f"alpha_h0_{source}", math.nan)) for source in PREFIXES]
        out.append([r["name"], r["seeds"], _fmt(r["loss_late"]), _fmt(r["val_acc"]),
                    ", ".join(map(str, div)) + f" ({len(div)}/{r['seeds']})" if div else "—", *labels])
    return _table(("run", "seeds", "late train loss", "val acc", "diverged at (seeds)", "late α·h0 mini-batch",
                   "late α·h0 probe"), out)


def gpt_section(path: str | Path) -> list[str]:
    """The results page's section beyond the paper: the byte-level GPT's run (``benchmarks/results/gpt_training.md``,
    AdamW with both monitors), its table quoted as committed and one computed sentence on ``pre_stability`` and λ
    after the first window (the range of the logged values; no number typed by hand)."""
    path = Path(path)
    head = ["## Beyond the paper: a byte-level GPT with AdamW", ""]
    if not path.is_file():
        return [*head, f"`{path.name}` is not in this checkout: `python benchmarks/gpt_training.py` writes it.", ""]
    text = path.read_text().splitlines()
    table = [line for line in text if line.startswith("|")]
    if len(table) < 3:
        return [*head, f"`{path.name}` has no table.", ""]
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]

    def column(prefix: str) -> list[float]:
        i = next(j for j, c in enumerate(columns) if c.startswith(prefix))
        # After the first window: at step 0 Adam's P is |g| + ε (no v yet) and λ's window is the initial transient.
        values = [float(r[i]) for r in rows[1:]]
        return [v for v in values if math.isfinite(v)]

    pre, lam = column("pre_stability"), column("λ")
    run = next((line for line in text if " steps in " in line and "wall-clock" in line), "")
    said = []
    if pre and lam:
        inside = "inside the edge" if max(pre) < 2 else "reaching the edge"
        said = [f"From step {rows[1][0]} on, `pre_stability` (AdamW's preconditioned α·h0, scaled so that its edge of "
                f"stability is at 2) stays between {min(pre):.3g} and {max(pre):.3g}, {inside}, and λ over each "
                f"10-step window between {min(lam):.3g} and {max(lam):.3g}. Beyond the paper, whose experiments stop "
                "at ResNet-18 and SGD: no claim of it is judged on this run.", ""]
    return [*head,
            f"`configs/gpt/adamw_monitors.yaml` ({run.split(' (')[0] if run else 'see the file'}; "
            f"[`benchmarks/results/gpt_training.md`](../benchmarks/results/gpt_training.md), "
            "`python benchmarks/gpt_training.py`):", "", *table, "", *said]


def lr_free_rows(path: str | Path, data: str) -> list[str]:
    """The rows of ``benchmarks/results/lr_free.md``'s final-loss table for ``data``, as a markdown table (the
    header it has), or a line saying the file is missing."""
    path = Path(path)
    if not path.is_file():
        return [f"`{path.name}` is not in this checkout: `python benchmarks/lr_free.py` writes it."]
    text = path.read_text().splitlines()
    try:
        start = next(i for i, line in enumerate(text) if line.startswith("## Final training loss"))
    except StopIteration:
        return [f"`{path.name}` has no final-loss table."]
    table = []
    for line in text[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            table.append(line)
    head, rule, body = table[0], table[1], [x for x in table[2:] if x.split("|")[1].strip().startswith(data)]
    intro = next((x for x in text if x.startswith(("100 steps", "Produced"))), "")
    return [head, rule, *body] if body else [f"`{path.name}` has no row for {data}."]


def render_results_page(summary_dir: str | Path, figures_dir: str | Path, out: str | Path,
                        datasets: Sequence[str] = ("synthetic", "digits", "cifar"), intro: str = "", *,
                        figures: dict[str, dict[str, Any]] | None = None, figure_of: dict[str, str] | None = None,
                        lr_free: str | Path | None = None, limitations: Sequence[str] = (),
                        gpt: str | Path | None = None) -> Path:
    """Write the results page from the committed summaries: the verdict in words per claim and data set, then
    the data, scale and limitations, the criteria, and per data set the outcome table, the verdict table, QN
    against tuned SGD and the LR-free optimisers (``lr_free``), and the figures with the paper's claim and the
    observed result under each. Only computed text: every sentence that states a result is generated from the
    summaries, recomputed with this code's rules from their per-seed records (:func:`payload_rows`).

    Args:
        figures: figure name -> ``{"caption": the paper's caption, "runs": [run names]}`` (captions under images).
        figure_of: run name -> the figures showing it (the verdict table's pointers).
        lr_free: ``benchmarks/results/lr_free.md``.
        limitations: fixed sentences of the limitations list (no result in them).
        gpt: ``benchmarks/results/gpt_training.md``, quoted in a section beyond the paper (:func:`gpt_section`).
    """
    # Resolved, so that a relative page path and an absolute figures path still give a relative image link.
    summary_dir, figures_dir, out = Path(summary_dir).resolve(), Path(figures_dir).resolve(), Path(out).resolve()
    figures = figures or {}
    loaded = {}
    for data in datasets:
        path = summary_dir / f"summary_{data}.json"
        if path.is_file():
            payload = json.loads(path.read_text())
            rows = payload_rows(payload)
            loaded[data] = (payload, rows, verdicts(rows, figure_of))
    lines = ["<!-- Generated by figures/make_figures.py from docs/results/summary_<data>.json; do not edit. -->",
             "# Results: the paper's figures and claims, computed from our logs", "", "## Verdict", "",
             "Generated from the summaries with the rules under *Criteria*; a run that diverged, did not train or "
             "did not settle is counted apart, never as evidence for or against a claim.", ""]
    for data in datasets:
        if data in loaded:
            lines += verdict_paragraph(data, *loaded[data])
        else:
            lines += [f"### {data}", "", NOT_RUN.format(data=data), ""]
    lines += ["## Data, scale and limitations", "", intro.strip(), ""]
    lines += [f"- {x}" for x in (*limitations, LAMBDA_NOTE)] + [""]
    t = THRESHOLDS
    b = t["ab_boundary"]
    lines += ["## Criteria", "",
              f"- **A / B**: the late median α·h0 (median over seeds) sides with the nearer target on a log scale: "
              f"A (≈ 1) from 1/√2 = {1 / b:.3g} to √2 = {b:.3g}, B (≈ 2) from √2 to 2√2 = {2 * b:.3g}; below or "
              "above those it sides with neither. Beside each median: its range over seeds, its q10–q90 over the "
              "late window, and the fewest late estimates of any seed (n).",
              f"- **not settled**: fewer than {t['min_late_estimates']} late estimates, or a late 1/h0 whose "
              f"second-half median differs from its first-half one by more than {100 * t['settle_drift']:.0f} %.",
              f"- **did not train**: final validation accuracy within {100 * t['chance_margin']:.0f} points of "
              f"chance, or an h0 constant to {t['h0_constant_rtol']:g} over the run.",
              f"- **diverged**: the loss non-finite or above {t['diverge_factor']:g} × its first value; listed with "
              "its step.",
              f"- **C**: |median late λ| ≤ {t['lambda_zero']:g} per step, from ≥ {t['min_late_estimates']} late "
              "estimates.",
              f"- **D**: no divergence and no rise of the full-training-set loss between epochs above "
              f"{100 * t['rise_tolerance']:g} % of the loss, over ≥ {t['min_full_loss_points']} values; the size "
              "of QN's largest rise stands beside the constant-α runs'.",
              f"- late window: the last {100 * t['late_fraction']:.0f} % of logged steps.",
              "- per architecture/loss: *agrees* (every placed run), *partly* (some), *disagrees* (none), "
              "*not settled* (no run could be placed), *no data*.", ""]
    for data in datasets:
        lines += [f"## Data set: {data}", ""]
        if data not in loaded:
            lines += [NOT_RUN.format(data=data), ""]
            continue
        payload, rows, vs = loaded[data]
        meta = payload.get("meta", {})
        if meta:
            lines += [", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
        lines += ["### Outcomes", ""] + outcome_table(rows) + [""]
        older = (" That file was written by older code with other thresholds: its verdict table predates these "
                 "rules, which this page applies to its per-seed records." if payload.get("thresholds") != THRESHOLDS
                 else "")
        lines += ["### Verdicts per architecture and loss", "",
                  f"Evidence per run (medians, spreads, reasons): [`docs/results/summary_{data}.md`]"
                  f"(results/summary_{data}.md) (machine-readable: `summary_{data}.json`, `summary_{data}.csv`)."
                  + older, ""]
        lines += verdict_grid(vs)
        lines += ["", "### Quasi-Newton against tuned SGD and learning-rate-free optimisers", "",
                  "Final training loss (mean over seeds) from `benchmarks/results/lr_free.md` (`python "
                  "benchmarks/lr_free.py`; its own scale: 100 steps at batch 32):", ""]
        lines += (lr_free_rows(lr_free, data) if lr_free is not None else ["not given."]) + [""]
        figs = sorted(figures_dir.glob(f"{data}/*.png"), key=lambda p: [int(x) if x.isdigit() else x
                                                                         for x in re.split(r"(\d+)", p.name)])
        by_name = {r["name"]: r for r in rows}
        if figs:
            lines += ["### Figures", ""]
        for fig in figs:
            rel = fig.relative_to(out.parent) if fig.is_relative_to(out.parent) else fig
            lines += [f"![{fig.stem}]({rel.as_posix()})", ""]
            spec = figures.get(fig.stem)
            if spec:
                lines += [f"*Claim (paper's caption, abridged):* {spec.get('caption', '')}. "
                          f"*Observed:* {observed(spec.get('runs', []), by_name)}", ""]
    if gpt is not None:
        lines += gpt_section(gpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out


def observed(names: Sequence[str], by_name: dict[str, dict[str, Any]]) -> str:
    """The observed result of a figure's runs in one line: per run its A/B side (mini-batch and probe), D label,
    control value, or why it is counted apart."""
    parts = []
    for name in names:
        r = by_name.get(name)
        if r is None:
            continue
        short = name.split("/", 1)[1] if name.count("/") else name
        if r["schedule"] in ("constant", "cyclic"):
            apart = _apart(r)
            if apart:
                parts.append(f"{short}: {_why_apart(r, apart)}")
            else:
                parts.append(f"{short}: α·h0 {_side_text(r, 'minibatch')}, probe {_side_text(r, 'probe')}")
        elif r["schedule"] == "quasi_newton":
            parts.append(f"{short}: D {d_label(r).split(' (')[0]}, largest full-loss rise {_pct(r['full_loss_max_rise'])}")
        elif r["schedule"] == "control_gd":
            parts.append(f"{short}: late α·h0 {_fmt(r['alpha_h0_minibatch'])} (known: 2)")
        elif r["schedule"] in ("control_adam", "adamw"):
            parts.append(f"{short}: late pre_stability "
                         f"{_fmt(r['pre_stability']) if r.get('pre_stability_measured') else NOT_MEASURED}"
                         + (" (known: about 2)" if r["schedule"] == "control_adam" else ""))
        elif r["schedule"] == "spectrum":
            parts.append(f"{short}: {int(r['steps'])} steps")
    return ("; ".join(parts) + ".") if parts else "no run of this figure in the summary."
