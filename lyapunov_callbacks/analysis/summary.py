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
    "run_stats",
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
    # α·h0 "≈ target" when target / 1.5 <= median α·h0 <= target * 1.5 (a factor 1.5 either side)
    "ratio_factor": 1.5,
    # λ "≈ 0" when |median λ| <= 0.05 per step (a perturbation grows or shrinks by at most 5 % a step)
    "lambda_zero": 0.05,
    # a run diverged at the first logged step whose loss is non-finite or > 10 x the first logged loss
    "diverge_factor": 10.0,
}

SCHEDULES = ("constant", "cyclic", "quasi_newton", "spectrum", "adamw")
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


def run_stats(scalars: dict[str, Scalar], late_fraction: float = THRESHOLDS["late_fraction"]) -> dict[str, Any]:
    """Statistics of one run's scalars (the columns of the summary table).

    Keys: ``steps`` (last logged training step), ``diverged_at`` (:func:`divergence_step` or ``None``),
    ``loss_first``, ``loss_late`` (median of ``train/loss`` over the late window), ``val_acc``; per h0 source
    ``s`` in ``minibatch`` / ``probe``: ``alpha_h0_{s}`` (median α·h0, late window), ``inv_h0_{s}`` (median
    1/h0), ``n_h0_{s}`` (estimates in the window); ``alpha`` (median α, late window); ``lambda_median``,
    ``lambda_q10``, ``lambda_q90``, ``lambda_pos_frac``, ``lambda_n``, ``lambda_values`` (all λ estimates before
    divergence);
    ``loss_rise_frac`` (fraction of consecutive logged mini-batch losses that rose); ``full_loss`` (the
    ``train_full/loss`` series, one value per epoch) and ``full_loss_rises`` (how many times it rose).

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
        inv = _late(scalars.get(f"{prefix}/inv_h0"), start, stop)
        if inv.size == 0 and h0 is not None:
            inv = 1.0 / _late(h0, start, stop)
        out[f"alpha_h0_{source}"] = _median(ratio)
        out[f"inv_h0_{source}"] = _median(inv)
        out[f"n_h0_{source}"] = int(ratio.size)
    lam = scalars.get("lyapunov/lambda")
    lam_v = _late(lam, 0, stop)
    out["lambda_median"] = _median(lam_v)
    out["lambda_q10"] = float(np.quantile(lam_v, 0.1)) if lam_v.size else nan
    out["lambda_q90"] = float(np.quantile(lam_v, 0.9)) if lam_v.size else nan
    out["lambda_pos_frac"] = float((lam_v > 0).mean()) if lam_v.size else nan
    out["lambda_n"] = int(lam_v.size)
    out["lambda_values"] = [float(v) for v in lam_v]
    full = scalars.get("train_full/loss")
    out["full_loss"] = [float(v) for v in full.values] if full is not None else []
    out["full_loss_steps"] = [int(s) for s in full.steps] if full is not None else []
    fv = np.asarray(out["full_loss"])
    out["full_loss_rises"] = int(sum(not b <= a for a, b in zip(fv, fv[1:]))) if fv.size > 1 else None
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
           "loss_rise_frac")


def aggregate(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per run name: the median over seeds of every :data:`NUMERIC` statistic, with min and max over seeds
    for α·h0, the number of seeds, and the divergence steps and full-loss rises of each seed."""
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
            if key.startswith("alpha_h0"):
                row[key + "_min"] = float(v.min()) if v.size else math.nan
                row[key + "_max"] = float(v.max()) if v.size else math.nan
        row["diverged_at"] = [r.stats.get("diverged_at") for r in recs]
        row["full_loss_rises"] = [r.stats.get("full_loss_rises") for r in recs]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ verdicts


def _band(value: float, target: float) -> str:
    f = THRESHOLDS["ratio_factor"]
    if not math.isfinite(value):
        return "n/a"
    if value < target / f:
        return "below"
    if value > target * f:
        return "above"
    return "agrees"


def _summarise(labels: list[str]) -> str:
    real = [x for x in labels if x != "n/a"]
    if not real:
        return "no data"
    if all(x == "agrees" for x in real):
        return "agrees"
    if any(x == "agrees" for x in real):
        return "partly"
    return "disagrees"


def verdicts(rows: Sequence[dict[str, Any]], figure_of: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A verdict per claim (A, B, C, D) and per architecture/loss, each with its evidence.

    A/B: each non-diverged constant-LR or cyclic run is ``agrees`` / ``below`` / ``above`` the band
    ``target / ratio_factor .. target * ratio_factor`` (target 1 for A, 2 for B) on its median late α·h0 (median
    over seeds), per h0 source; the architecture/loss verdict is ``agrees`` (every run in the band), ``partly``
    (some), ``disagrees`` (none) or ``no data``. A run with a diverged seed is left out of A/B/C and listed as
    diverged, with how many of its seeds diverged and at which steps (it disagrees with a caption that says the
    run trains, and is evidence of α·h0 > 2 at some point).
    C: ``agrees`` when |median λ| <= ``lambda_zero`` in every non-diverged run, per run as in A.
    D: for each quasi-Newton run, ``agrees`` when it did not diverge and its full-training-set loss never rose
    between epochs; ``singles QN out`` says whether its fraction of rising mini-batch losses is below that of
    every constant-LR run of the same architecture/loss.

    Args:
        rows: :func:`aggregate` rows.
        figure_of: run name -> the figures showing it (evidence pointers).
    """
    figure_of = figure_of or {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["schedule"] != "spectrum":
            groups.setdefault((row["arch"], row["loss"]), []).append(row)
    out = []
    for (arch, loss), grp in sorted(groups.items()):
        sgd = [r for r in grp if r["schedule"] in ("constant", "cyclic")]
        diverged = [r for r in sgd if any(d is not None for d in r["diverged_at"])]
        stable = [r for r in sgd if r not in diverged]
        ev_div = "; ".join(_divergence(r) for r in diverged)
        for claim, target in (("A: α·h0 ≈ 1 (paper)", 1.0), ("B: α·h0 ≈ 2 (edge of stability)", 2.0)):
            for source in PREFIXES:
                per = [(r, _band(r[f"alpha_h0_{source}"], target)) for r in stable]
                ev = "; ".join(f"{r['name']} {r[f'alpha_h0_{source}']:.3g} ({b})" for r, b in per
                               if b != "n/a")
                out.append(_verdict(claim, arch, loss, source, _summarise([b for _, b in per]),
                                    ev or "no h0 logged", ev_div, [r["name"] for r, _ in per], figure_of))
        per = []
        for r in stable:
            lam = r["lambda_median"]
            per.append((r, "n/a" if not math.isfinite(lam) else
                        "agrees" if abs(lam) <= THRESHOLDS["lambda_zero"] else "below" if lam < 0 else "above"))
        ev = "; ".join(f"{r['name']} median λ {r['lambda_median']:.3g}, λ>0 in "
                       f"{100 * r['lambda_pos_frac']:.0f} %" for r, b in per if b != "n/a")
        out.append(_verdict("C: λ ≈ 0 (edge of chaos)", arch, loss, "minibatch", _summarise([b for _, b in per]),
                            ev or "no λ logged", ev_div, [r["name"] for r, _ in per], figure_of))
        const_rise = [r["loss_rise_frac"] for r in grp if r["schedule"] == "constant"
                      and math.isfinite(r["loss_rise_frac"])]
        for r in (r for r in grp if r["schedule"] == "quasi_newton"):
            div = [d for d in r["diverged_at"] if d is not None]
            rises = [x for x in r["full_loss_rises"] if x is not None]
            if div:
                label = "disagrees"
            elif not rises:
                label = "no data"
            else:
                label = "agrees" if max(rises) == 0 else "disagrees"
            single = ("n/a" if not const_rise or not math.isfinite(r["loss_rise_frac"]) else
                      "yes" if r["loss_rise_frac"] < min(const_rise) else "no")
            ev = (f"{r['name']}: full-train loss rose {rises} time(s) per seed; mini-batch loss rose at "
                  f"{100 * r['loss_rise_frac']:.0f} % of logged steps vs {', '.join(f'{100 * x:.0f}' for x in const_rise)}"
                  f" % for constant α; singles QN out: {single}")
            out.append(_verdict("D: QN loss decreases monotonically", arch, loss, "-", label, ev,
                                _divergence(r) if div else "", [r["name"]], figure_of))
    return out


def _divergence(row: dict[str, Any]) -> str:
    """How a run diverged: its step, or with several seeds how many diverged and where (a run that diverges in
    one seed of three near the edge of stability is not one that diverges in all three)."""
    steps = sorted(d for d in row["diverged_at"] if d is not None)
    if len(row["diverged_at"]) == 1:
        return f"{row['name']} diverged at step {steps[0]}"
    return (f"{row['name']} diverged in {len(steps)} of {len(row['diverged_at'])} seeds, at step"
            f"{'s' if len(steps) > 1 else ''} {', '.join(str(d) for d in steps)}")


def _verdict(claim, arch, loss, source, label, evidence, diverged, names, figure_of) -> dict[str, Any]:
    figs = sorted({f for n in names for f in figure_of.get(n, "").split(",") if f},
                  key=lambda f: int(re.sub(r"\D", "", f) or 0))
    return {"claim": claim, "arch": arch, "loss": loss, "h0": source, "verdict": label, "evidence": evidence,
            "diverged": diverged, "figures": ", ".join(figs)}


# ------------------------------------------------------------------------------------------------ files


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if not math.isfinite(v) else f"{v:.3g}"
    if isinstance(v, list):
        return ",".join("—" if x is None else str(x) for x in v)
    return str(v)


TABLE_COLUMNS = ("name", "seeds", "steps", "alpha", "alpha_h0_minibatch", "alpha_h0_probe", "inv_h0_minibatch",
                 "inv_h0_probe", "lambda_median", "lambda_pos_frac", "loss_first", "loss_late", "loss_rise_frac",
                 "full_loss_rises", "val_acc", "diverged_at")


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
    lines += [f"Late window: last {100 * t['late_fraction']:.0f} % of the logged steps. Band: target / "
              f"{t['ratio_factor']:g} .. target × {t['ratio_factor']:g}. λ ≈ 0: |median λ| ≤ {t['lambda_zero']:g}. "
              f"Diverged: loss non-finite or > {t['diverge_factor']:g} × its first value. Values are medians "
              "over seeds.", "", "## Verdicts", ""]
    lines += _table(("claim", "arch", "loss", "h0", "verdict", "evidence", "diverged", "figures"),
                    [[v[k] for k in ("claim", "arch", "loss", "h0", "verdict", "evidence", "diverged", "figures")]
                     for v in payload["verdicts"]])
    lines += ["", "## Runs", ""]
    lines += _table(TABLE_COLUMNS, [[row.get(c) for c in TABLE_COLUMNS] for row in payload["runs"]])
    return "\n".join(lines) + "\n"


NOT_RUN = ("**Not run: no `docs/results/summary_{data}.json`. `make figures DATA={data}` trains the runs and "
           "writes this section.**")


def render_results_page(summary_dir: str | Path, figures_dir: str | Path, out: str | Path,
                        datasets: Sequence[str] = ("synthetic", "digits", "cifar"), intro: str = "") -> Path:
    """Write the results page from the committed summaries: per data set the verdict table, the run table and
    the figures, or a line saying it was not run where a data set has no summary yet. Only computed text: every
    sentence that states a result is generated from a summary row."""
    # Resolved, so that a relative page path and an absolute figures path still give a relative image link.
    summary_dir, figures_dir, out = Path(summary_dir).resolve(), Path(figures_dir).resolve(), Path(out).resolve()
    lines = ["<!-- Generated by figures/make_figures.py from docs/results/summary_<data>.json; do not edit. -->",
             "# Results: the paper's figures and claims, computed from our logs", "", intro.strip(), ""]
    t = THRESHOLDS
    lines += ["## Criteria", "",
              f"- **A (paper)**: late-training median α·h0 within a factor {t['ratio_factor']:g} of 1.",
              f"- **B (edge of stability)**: the same within a factor {t['ratio_factor']:g} of 2.",
              f"- **C (edge of chaos)**: |median λ| ≤ {t['lambda_zero']:g} per step.",
              "- **D (quasi-Newton monotone)**: no divergence and the full-training-set loss never rises between "
              "epochs; *singles QN out* compares its fraction of rising mini-batch losses with the constant-LR runs. "
              "How low QN's final loss is, against tuned constant SGD and learning-rate-free optimisers, is not "
              "this claim: `benchmarks/lr_free.py` measures it (`benchmarks/results/lr_free.md`, README "
              "'Benchmarks').",
              f"- late window: the last {100 * t['late_fraction']:.0f} % of logged steps; a run diverged where its "
              f"loss is non-finite or above {t['diverge_factor']:g} × its first logged value.",
              "- per architecture/loss: *agrees* (every run), *partly* (some), *disagrees* (none), *no data*.", ""]
    for data in datasets:
        path = summary_dir / f"summary_{data}.json"
        lines += [f"## Data set: {data}", ""]
        if not path.is_file():
            lines += [NOT_RUN.format(data=data), ""]
            continue
        payload = json.loads(path.read_text())
        meta = payload.get("meta", {})
        if meta:
            lines += [", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
        counts: dict[str, dict[str, int]] = {}
        for v in payload["verdicts"]:
            key = f"{v['claim']} [{v['h0']}]" if v["h0"] != "-" else v["claim"]
            counts.setdefault(key, {}).setdefault(v["verdict"], 0)
            counts[key][v["verdict"]] += 1
        lines += ["Architecture/loss pairs per verdict (computed):", ""]
        lines += _table(("claim", "agrees", "partly", "disagrees", "no data"),
                        [[k, c.get("agrees", 0), c.get("partly", 0), c.get("disagrees", 0), c.get("no data", 0)]
                         for k, c in counts.items()])
        lines += ["", f"Full tables: [`docs/results/summary_{data}.md`](results/summary_{data}.md) "
                      f"(machine-readable: `summary_{data}.json`, `summary_{data}.csv`).", ""]
        lines += _table(("claim", "arch", "loss", "h0", "verdict", "evidence", "diverged", "figures"),
                        [[v[k] for k in ("claim", "arch", "loss", "h0", "verdict", "evidence", "diverged", "figures")]
                         for v in payload["verdicts"]])
        lines.append("")
        figs = sorted(figures_dir.glob(f"{data}/*.png"), key=lambda p: [int(x) if x.isdigit() else x
                                                                         for x in re.split(r"(\d+)", p.name)])
        for fig in figs:
            rel = fig.relative_to(out.parent) if fig.is_relative_to(out.parent) else fig
            lines += [f"![{fig.stem}]({rel.as_posix()})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out
