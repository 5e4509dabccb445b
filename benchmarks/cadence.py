"""Tracking accuracy against cost of the h0 monitor's cadence: fixed ``every_n_steps`` against ``"auto"``.

Two models, each fitted with plain SGD (lr 0.1) for ``--steps`` optimiser steps (default 1000; ``--quick``: 60, the
small model only) with no validation, checkpointing, logger or progress bar (``_common.MODELS``):

- ``small``: MLP 64-256-256-10 ReLU (85,002 parameters) on scikit-learn's 8×8 digits, batch 64;
- ``readme``: MLP 3072-512-512-2 ReLU (1,837,058 parameters) on the synthetic two-class CIFAR stand-in, batch 128,
  the model of the README.

h0 is measured on the monitor's fixed probe batch (``batch="fixed"``, 64 samples), whose Hessian moves only with
the weights.

- **Reference**: a separate fit with ``HessianEigenvalueMonitor(every_n_steps=5, tol=1e-3, batch="fixed")``.
  The monitors leave training bit-identical (checked here: every fit's final weights equal the plain fit's), so
  every variant measures along the same trajectory. The reference is smoothed by a centred running median over
  ``--window`` steps (default 45, i.e. 9 reference points): the trend a dashboard shows; the step-to-step
  edge-of-stability oscillation of h0 is not trackable by any cadence above 1.
- **Variants**: ``HessianEigenvalueMonitor(batch="fixed")`` at its defaults (``tol=1e-2``) with
  ``every_n_steps`` 10, 50, 100, and ``"auto"`` at two ``drift_tol`` (default ``min_every``/``max_every``).
  A third ``"auto"`` row adds the loss trigger (``loss_rise=1``, off by default in the monitor).
  Each variant's tracked curve is the linear interpolation between its estimates (held flat after the last one);
  at every reference step its relative error against the smoothed reference is taken; the table gives the
  median and the 90th percentile over the run, the number of estimates, the mean HVPs per estimate, and the
  fit-time ratio over a plain fit (median over ``--repeats`` interleaved repetitions, the order rotating; wall
  clock and the process's CPU time, the latter less sensitive to a shared machine).

Targets (issue 25): ``"auto"`` at the default ``drift_tol``: median error ≤ 0.05 and 90th percentile ≤ 0.20 at
≤ 1.2× a plain fit on both models, and never worse in error than the fixed cadence of the same cost.

A full run (not ``--quick``) writes its tables, with ``uptime`` before and after, to
``benchmarks/results/cadence.md`` (``--out FILE`` elsewhere).

Run: ``python benchmarks/cadence.py [--quick] [--threads 1] [--steps N] [--repeats N] [--models small,readme]
[--out FILE]``.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings

import _common as C
import torch

LR = 0.1
#: ``name -> HessianEigenvalueMonitor keyword arguments`` of the compared cadences (all on the probe batch).
VARIANTS = {
    "every 10": dict(every_n_steps=10),
    "every 50": dict(every_n_steps=50),
    "every 100": dict(every_n_steps=100),
    "auto, drift_tol 0.05": dict(every_n_steps="auto", drift_tol=0.05),
    "auto, drift_tol 0.1": dict(every_n_steps="auto", drift_tol=0.1),
    "auto, drift_tol 0.05, loss_rise 1": dict(every_n_steps="auto", drift_tol=0.05, loss_rise=1.0),
}
REFERENCE = dict(every_n_steps=5, tol=1e-3)
TARGET_MEDIAN, TARGET_P90, TARGET_RATIO = 0.05, 0.20, 1.2
DEFAULT_AUTO = "auto, drift_tol 0.05"


def _trainer(steps: int, callbacks: list):
    import lightning as L

    return L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks, deterministic=False,
    )


def _recorder(monitor):
    """A callback after ``monitor`` that stores ``{step: h0}`` of every estimate it logs."""
    from lightning.pytorch.callbacks import Callback

    class Record(Callback):
        def __init__(self) -> None:
            self.h0: dict[int, float] = {}
            self.hvps: dict[int, float] = {}
            self.every: dict[int, float] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            step = trainer.global_step
            if monitor._last_step == step and step not in self.h0:
                self.h0[step] = monitor.last_metrics["hessian/h0"]
                self.hvps[step] = monitor.last_metrics["hessian/num_hvps"]
                if "hessian/every_n_steps" in monitor.last_metrics:
                    self.every[step] = monitor.last_metrics["hessian/every_n_steps"]

    return Record()


def fit(which: str, steps: int, seed: int, monitor_kwargs: dict | None) -> dict:
    """One fit of the model ``which``: wall and CPU seconds of ``trainer.fit``, the final weights, and the logged h0
    per step."""
    from lyapunov_callbacks.callbacks.hessian_monitor import HessianEigenvalueMonitor

    callbacks, record, monitor = [], None, None
    if monitor_kwargs is not None:
        monitor = HessianEigenvalueMonitor(batch="fixed", **monitor_kwargs)
        record = _recorder(monitor)
        callbacks = [monitor, record]
    model = C.model_module(which, seed, lr=LR)
    trainer = _trainer(steps, callbacks)
    wall, cpu = time.perf_counter(), time.process_time()
    C.fit_model(trainer, which, seed, model)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "wall": wall,
        "cpu": cpu,
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "h0": {} if record is None else dict(record.h0),
        "hvps": {} if record is None else dict(record.hvps),
        "every": {} if record is None else dict(record.every),
        "loss_triggers": 0 if monitor is None or monitor._cadence is None else monitor._cadence.loss_triggers,
    }


def running_median(values: list[float], half: int) -> list[float]:
    """Centred running median with ``half`` points each side (fewer at the ends, where the window is cut)."""
    return [statistics.median(values[max(0, i - half): i + half + 1]) for i in range(len(values))]


def interpolate(points: dict[int, float], steps: list[int]) -> list[float]:
    """Linear interpolation of ``{step: value}`` at ``steps`` (held flat before the first and after the last)."""
    known = sorted(points)
    out, j = [], 0
    for s in steps:
        while j + 1 < len(known) and known[j + 1] <= s:
            j += 1
        a = known[j]
        if s <= a or j + 1 == len(known):
            out.append(points[a])
            continue
        b = known[j + 1]
        w = (s - a) / (b - a)
        out.append((1.0 - w) * points[a] + w * points[b])
    return out


def tracking_errors(variant: dict[int, float], ref_steps: list[int], smoothed: list[float]) -> list[float]:
    """Relative error of ``variant``'s interpolated curve against the smoothed reference at every reference step."""
    tracked = interpolate(variant, ref_steps)
    return [abs(t - r) / abs(r) for t, r in zip(tracked, smoothed)]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` with linear interpolation between order statistics."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def best_placement(values: list[float], smoothed: list[float], count: int) -> list[int]:
    """Indices of ``count`` of ``values`` (the first included) whose interpolated curve has the least total relative
    error against ``smoothed``: dynamic programming over every placement.

    With ``values = smoothed`` this is the placement error alone: ``count`` estimates free of noise, placed knowing
    the whole trend, the least any cadence of ``count`` estimates can reach before its estimates' own scatter
    (the noise floor) is added.
    """
    m = len(values)
    count = max(1, min(count, m))
    rel = [abs(s) for s in smoothed]
    # seg[a][b]: error over the reference steps a..b-1 of the line from values[a] to values[b]; tail[a]: held flat.
    seg = [[0.0] * m for _ in range(m)]
    for a in range(m):
        for b in range(a + 1, m):
            seg[a][b] = sum(abs(values[a] + (values[b] - values[a]) * (j - a) / (b - a) - smoothed[j]) / rel[j]
                            for j in range(a, b))
    tail = [sum(abs(values[a] - smoothed[j]) / rel[j] for j in range(a, m)) for a in range(m)]
    inf = float("inf")
    cost = [inf] * m
    cost[0] = 0.0
    back: list[list[int]] = []
    for _ in range(count - 1):
        new, parent = [inf] * m, [-1] * m
        for b in range(1, m):
            for a in range(b):
                if cost[a] + seg[a][b] < new[b]:
                    new[b], parent[b] = cost[a] + seg[a][b], a
        cost = new
        back.append(parent)
    last = min(range(m), key=lambda b: cost[b] + tail[b])
    chosen = [last]
    for parent in reversed(back):
        chosen.append(parent[chosen[-1]])
    return sorted(chosen)


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--steps", type=int, default=None, help="optimiser steps per fit (default 1000; quick 60)")
        p.add_argument("--window", type=int, default=45, help="steps of the reference's centred running median")
        p.add_argument("--models", default=None, help="comma-separated: small, readme (default both; quick: small)")
        p.add_argument("--floor", action="store_true",
                       help="only the reference fits: noise floor and placement error (deterministic; "
                            "writes cadence_floor.md)")
        C.add_out_argument(p, "cadence.md")

    args = C.parse_args("Tracking accuracy against cost of the h0 monitor's cadence.", argv, extra=extra)
    steps = args.steps or (60 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 2)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    models = (args.models or ("small" if args.quick else "small,readme")).split(",")
    result = {}
    if args.floor:
        with C.recorded(C.out_path(args, "cadence_floor.md"), "cadence.py", argv,
                        "Cadence: what any cadence is up against (noise floor and placement error)"):
            for which in models:
                C.header(f"Reference run of HessianEigenvalueMonitor(batch=\"fixed\"): {C.MODELS[which]}, {steps} "
                         "steps", args)
                result[which] = floor(which, steps, args.seed, args.window)
                print()
        return result
    with C.recorded(C.out_path(args, "cadence.md"), "cadence.py", argv, "Cadence: tracking accuracy against cost"):
        for which in models:
            C.header(f"Cadence of HessianEigenvalueMonitor(batch=\"fixed\"): {C.MODELS[which]}, {steps} steps", args)
            result[which] = _run(which, steps, repeats, args.seed, args.window)
            print()
    return result


def _reference(which: str, steps: int, seed: int, window: int) -> tuple[dict, list[int], list[float]]:
    """The dense reference fit, its estimate steps and its smoothed trend."""
    C.progress(f"cadence, {which}: reference fit (every 5 steps, tol 1e-3)")
    reference = fit(which, steps, seed, REFERENCE)
    ref_steps = sorted(reference["h0"])
    smoothed = running_median([reference["h0"][s] for s in ref_steps], (window // REFERENCE["every_n_steps"]) // 2)
    return reference, ref_steps, smoothed


def floor(which: str, steps: int, seed: int, window: int) -> dict:
    """What any cadence is up against on the reference run, from its estimates alone (no timing: deterministic).

    The noise floor: the relative scatter of the reference's own estimates (tol 1e-3, every 5 steps) about
    their smoothed trend, which a cadence reporting single estimates carries into its curve. The placement error:
    ``steps // 100`` and ``steps // 50`` estimates (as many as every 100 and every 50 steps) equal to the trend
    and placed knowing the whole run (:func:`best_placement`), the least a cadence of that many estimates can
    reach before its noise is added.
    """
    reference, ref_steps, smoothed = _reference(which, steps, seed, window)
    raw = [reference["h0"][s] for s in ref_steps]
    noise = [abs(v - r) / abs(r) for v, r in zip(raw, smoothed)]
    result = {"noise": {"median": statistics.median(noise), "p90": percentile(noise, 0.9)}, "placement": {}}
    print(f"Reference: {len(ref_steps)} estimates (every {REFERENCE['every_n_steps']} steps, tol "
          f"{REFERENCE['tol']:g}), h0 from {min(raw):.3g} to {max(raw):.3g}, smoothed by a centred running median "
          f"over {window} steps.\n")
    print("| what | estimates | median error | p90 error |")
    print("|---|---|---|---|")
    print(f"| noise floor: the reference's own estimates against the trend | {len(raw)} | "
          f"{result['noise']['median']:.3f} | {result['noise']['p90']:.3f} |")
    for every in (100, 50):
        count = max(1, steps // every)
        chosen = best_placement(smoothed, smoothed, count)
        errors = tracking_errors({ref_steps[i]: smoothed[i] for i in chosen}, ref_steps, smoothed)
        result["placement"][count] = {"median": statistics.median(errors), "p90": percentile(errors, 0.9),
                                      "steps": [ref_steps[i] for i in chosen]}
        print(f"| placement error alone: the trend at the best {count} steps (as many as every {every}) | {count} | "
              f"{result['placement'][count]['median']:.3f} | {result['placement'][count]['p90']:.3f} |")
    steps_10 = result["placement"][max(1, steps // 100)]["steps"]
    print(f"\nThe best {len(steps_10)} steps: {', '.join(map(str, steps_10))}.")
    return result


def _run(which: str, steps: int, repeats: int, seed: int, window: int) -> dict:
    fit(which, min(steps, 20), seed, None)  # warm-up: imports, allocator, first-call costs
    reference, ref_steps, smoothed = _reference(which, steps, seed, window)

    names = ["plain fit", *VARIANTS]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            C.progress(f"cadence, {which}: repetition {r + 1}/{repeats}, {name}")
            runs[name].append(fit(which, steps, seed, None if name == "plain fit" else VARIANTS[name]))

    plain = runs["plain fit"]
    identical = all(torch.equal(run["weights"], reference["weights"]) for rs in runs.values() for run in rs)
    wall = {name: statistics.median(run["wall"] / base["wall"] for run, base in zip(rs, plain))
            for name, rs in runs.items()}
    cpu = {name: statistics.median(run["cpu"] / base["cpu"] for run, base in zip(rs, plain))
           for name, rs in runs.items()}

    print(f"Reference: {len(ref_steps)} estimates (every {REFERENCE['every_n_steps']} steps, tol "
          f"{REFERENCE['tol']:g}), h0 from {min(reference['h0'].values()):.3g} to {max(reference['h0'].values()):.3g}, "
          f"smoothed by a centred running median over {window} steps; reference fit "
          f"{reference['wall'] / statistics.median(b['wall'] for b in plain):.2f}× a plain fit (wall).")
    print(f"Every fit trains bit-identical weights to the plain fit: {'yes' if identical else 'NO'}.")
    print(f"Plain fit: {statistics.median(b['wall'] for b in plain):.2f} s wall, "
          f"{statistics.median(b['cpu'] for b in plain):.2f} s CPU (median of {repeats}).\n")
    print("| cadence | estimates (loss-triggered) | mean interval | HVPs / estimate | median error | p90 error "
          "| max error | fit time (wall) | fit time (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    table = {}
    for name in VARIANTS:
        rec = runs[name][0]
        est = sorted(rec["h0"])
        errors = tracking_errors(rec["h0"], ref_steps, smoothed)
        row = {
            "estimates": len(est),
            "mean_interval": statistics.mean(b - a for a, b in zip(est, est[1:])) if len(est) > 1 else float("nan"),
            "hvps": statistics.mean(rec["hvps"].values()),
            "median": statistics.median(errors),
            "p90": percentile(errors, 0.9),
            "max": max(errors),
            "wall": wall[name],
            "cpu": cpu[name],
            "steps": est,
            "same_steps": all(sorted(r["h0"]) == est for r in runs[name]),
        }
        table[name] = row
        print(f"| {name} | {row['estimates']} ({rec['loss_triggers']}) | {row['mean_interval']:.1f} | "
              f"{row['hvps']:.1f} | "
              f"{row['median']:.3f} | {row['p90']:.3f} | {row['max']:.3f} | {row['wall']:.2f}× | {row['cpu']:.2f}× |")

    auto = table[DEFAULT_AUTO]
    print(f"\nSteps of `{DEFAULT_AUTO}` (the same in every repetition: "
          f"{'yes' if all(r['same_steps'] for r in table.values()) else 'NO'}): "
          f"{', '.join(map(str, auto['steps']))}.\n")
    met = {
        f"median error ≤ {TARGET_MEDIAN}": auto["median"] <= TARGET_MEDIAN,
        f"p90 error ≤ {TARGET_P90}": auto["p90"] <= TARGET_P90,
        f"fit time ≤ {TARGET_RATIO}× (wall)": auto["wall"] <= TARGET_RATIO,
        f"fit time ≤ {TARGET_RATIO}× (CPU)": auto["cpu"] <= TARGET_RATIO,
    }
    # "never worse in error than the fixed cadence of the same cost": the fixed cadences that cost as much or more
    costlier = [n for n in VARIANTS if n.startswith("every") and table[n]["cpu"] >= auto["cpu"]]
    cheaper_or_equal = [n for n in VARIANTS if n.startswith("every") and table[n]["cpu"] <= auto["cpu"]]
    print(f"Targets of `{DEFAULT_AUTO}`: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in met.items())
          + ".")
    if cheaper_or_equal:
        best = min(cheaper_or_equal, key=lambda n: table[n]["median"])
        print(f"Against the fixed cadences at most its CPU cost ({', '.join(cheaper_or_equal)}): best median error "
              f"{table[best]['median']:.3f} ({best}), p90 {table[best]['p90']:.3f}, against auto's "
              f"{auto['median']:.3f} and {auto['p90']:.3f}.")
    if costlier:
        print(f"Fixed cadences costing at least as much: {', '.join(costlier)}.")
    return {"table": table, "identical": identical, "reference_steps": ref_steps, "smoothed": smoothed, "met": met}


if __name__ == "__main__":
    main()
