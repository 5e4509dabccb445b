"""Wall-clock overhead of the curvature monitors on a real ``trainer.fit``, and the accuracy of the logged h0.

Two models, each fitted with plain SGD (lr 0.1) for ``--steps`` optimiser steps (default 200; ``--quick``: 60),
with no validation, no checkpointing, no progress bar, no model summary and ``logger=False`` for every variant:

- ``small``: MLP 64-256-256-10 (85,002 parameters) on scikit-learn's 8×8 digits (flat 64 features), batch 64,
  a training step of ~1.5 ms on an idle core, where the monitors' per-estimate fixed costs show;
- ``readme``: MLP 3072-512-512-2 (1,837,058 parameters) on the synthetic two-class CIFAR stand-in, batch 128,
  the model of the README's table.

Only ``trainer.fit`` is timed (model and trainer construction are not). Variants:

- ``baseline``: no callback;
- ``h0 / 10`` and ``h0 / 50``: :class:`HessianEigenvalueMonitor` with ``every_n_steps`` 10 or 50 at its defaults
  (warm-started Lanczos, ``tol=1e-2``, the current batch);
- ``h0 / 10, fixed`` and ``h0 / 50, fixed``: the same on the fixed probe batch at its default size;
- ``h0 / 10, gap_safety 1`` and ``h0 / 50, gap_safety 1``: the current batch with the gap rule's safety factor 1
  instead of the default 10 (an estimate stops once ``residual²/gap ≤ tol·|h0|``): fewer HVPs, with the error it
  reaches in the accuracy columns;
- ``λ window 1 / 10``: :class:`LyapunovExponentMonitor` with ``window=1, every_n_steps=10``;
- ``λ continuous`` and ``λ continuous, finite diff.``: ``window=20``, ``every_n_steps=None``, exact or
  finite-difference products;
- ``..., operator``: the two exact λ variants with ``reuse_training_graph=False`` (each product evaluates the
  loss again through ``HessianOperator`` instead of using the training step's graph), side by side.

The ratio is the median fit time over the baseline's median (repetitions interleaved, the order rotating); beside
it, the range of each repetition's fit time over that repetition's baseline, the noise a verdict has to be read with.

Accuracy: one more (untimed) fit per ``h0`` variant with two small callbacks around the monitor — one placed
*before* it stores the weights and batch of every measured step, one placed *after* it reads the logged
``hessian/h0`` — then a cold Lanczos (``tol=1e-6``, ``max_iter=150``, random start) at those weights and on the
batch the monitor measured (the step's batch, or the probe batch for ``batch="fixed"``) is the reference; the
table prints the largest relative error and the HVPs per estimate. The same run times the monitor's own hook
and splits the overhead into its parts (graph build, HVPs, solver bookkeeping, logging). The "before" callback
also stores what the monitor's solve will start from (``EigenTracker.start_vectors()``: the last two Ritz
vectors); from it, an oracle count (:func:`_oracle_hvps`) gives the fewest HVPs after which a Lanczos Ritz value
is within 1e-2 of the reference: what a perfect stopping rule would spend.

Targets from the issue: ``h0`` ≤ 1.5× at every 10 steps, ≤ 1.1× at every 50 steps, each estimate within 1e-2;
``λ window 1 / 10`` ≤ 1.15×; continuous ≤ 2× with finite differences, ≤ 2.5× exact.

A full run (not ``--quick``) also writes its tables, with the machine's ``uptime`` load before and after, to
``benchmarks/results/monitor_overhead.md`` (``--out FILE`` elsewhere).

Run: ``python benchmarks/monitor_overhead.py [--quick] [--threads 2] [--steps N] [--models small,readme] [--out FILE]``.
"""

from __future__ import annotations

import statistics
import time
import warnings

import _common as C
import torch

#: Targets of the issue: ratio of fit wall-clock with / without the monitor, and accuracy of each estimate.
TARGETS = {"h0 / 10": 1.5, "h0 / 50": 1.1, "h0 / 10, fixed": 1.5, "h0 / 50, fixed": 1.1,
           "h0 / 10, gap_safety 1": 1.5, "h0 / 50, gap_safety 1": 1.1,
           "λ window 1 / 10": 1.15, "λ continuous": 2.5, "λ continuous, finite diff.": 2.0}
ACCURACY = 1e-2
LR = 0.1

MODELS = C.MODELS


def _data(which: str, seed: int):
    return C.model_data(which, seed)


def _model(which: str, seed: int):
    return C.model_module(which, seed, lr=LR)


def _fit(trainer, which: str, seed: int, model) -> float:
    dm, loader = _data(which, seed)
    start = time.perf_counter()
    if dm is not None:
        trainer.fit(model, datamodule=dm)
    else:
        trainer.fit(model, train_dataloaders=loader)
    return time.perf_counter() - start


def _trainer(steps: int, callbacks: list):
    import lightning as L

    return L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks, deterministic=False,
    )


#: ``name -> (callback factory, h0 period or None, HessianEigenvalueMonitor kwargs)``. The ``gap_safety 1`` rows
#: trade solver accuracy (still checked against the cold reference) for fewer HVPs.
def _variants() -> dict:
    from lyapunov_callbacks.callbacks.hessian_monitor import HessianEigenvalueMonitor
    from lyapunov_callbacks.callbacks.lyapunov_monitor import LyapunovExponentMonitor

    def h0(every: int, **kw):
        return (lambda: [HessianEigenvalueMonitor(every_n_steps=every, **kw)], every, kw)

    return {
        "baseline": (lambda: [], None, {}),
        "h0 / 10": h0(10),
        "h0 / 50": h0(50),
        "h0 / 10, fixed": h0(10, batch="fixed"),
        "h0 / 50, fixed": h0(50, batch="fixed"),
        # the gap rule trusting the gap it sees (safety factor 1 instead of 10): fewer HVPs, error measured
        "h0 / 10, gap_safety 1": h0(10, gap_safety=1.0),
        "h0 / 50, gap_safety 1": h0(50, gap_safety=1.0),
        "λ window 1 / 10": (lambda: [LyapunovExponentMonitor(window=1, every_n_steps=10)], None, {}),
        "λ window 1 / 10, operator": (
            lambda: [LyapunovExponentMonitor(window=1, every_n_steps=10, reuse_training_graph=False)], None, {}
        ),
        "λ continuous": (lambda: [LyapunovExponentMonitor(window=20)], None, {}),
        # the same products through the operator (the loss evaluated again) instead of the training graph
        "λ continuous, operator": (
            lambda: [LyapunovExponentMonitor(window=20, reuse_training_graph=False)], None, {}
        ),
        # the paper's perturbed trajectory: finite differences reusing the training step's gradient
        "λ continuous, finite diff.": (
            lambda: [LyapunovExponentMonitor(window=20, hvp="finite_difference")], None, {}
        ),
    }


def _fit_seconds(which: str, steps: int, callbacks: list, seed: int) -> float:
    model = _model(which, seed)
    return _fit(_trainer(steps, callbacks), which, seed, model)


def _accuracy_run(which: str, steps: int, every: int, seed: int, monitor_kwargs: dict, references: dict) -> dict:
    """Untimed fit with capture callbacks: max relative error of the logged h0 and the monitor's cost split."""
    from lightning.pytorch.callbacks import Callback

    from lyapunov_callbacks.core.eigen import top_hessian_eigenvalues
    from lyapunov_callbacks.callbacks.hessian_monitor import HessianEigenvalueMonitor

    monitor = HessianEigenvalueMonitor(every_n_steps=every, **monitor_kwargs)
    captured: dict[int, dict] = {}

    class Before(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step % every == 0 and trainer.global_step not in captured:
                warm = monitor._estimates.tracker.start_vectors()  # the start the monitor's solve will use
                captured[trainer.global_step] = {
                    "state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "batch": [t.clone() for t in batch],
                    "init": None if warm is None else warm.detach().clone(),
                }

    class After(Callback):
        # The monitor measures in on_before_optimizer_step; global_step has advanced by batch end.
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step - 1
            if step in captured and "h0" not in captured[step]:
                captured[step]["h0"] = monitor.last_metrics["hessian/h0"]
                captured[step]["hvps"] = monitor.last_metrics["hessian/num_hvps"]

    # Time the monitor's own measurement, and its parts, by wrapping (instance attributes only).
    parts = {"measure": 0.0, "build": 0.0, "hvp": 0.0, "log": 0.0}
    measure = monitor._measure

    def timed_measure(*a, **k):
        t = time.perf_counter()
        out = measure(*a, **k)
        parts["measure"] += time.perf_counter() - t
        return out

    monitor._measure = timed_measure
    from lyapunov_callbacks.core import hessian as hessian_mod

    Op = hessian_mod.HessianOperator
    orig_init, orig_matmat, orig_matvec = Op.__init__, Op.matmat, Op.matvec

    def init(self, *a, **k):
        t = time.perf_counter()
        orig_init(self, *a, **k)
        parts["build"] += time.perf_counter() - t

    def matmat(self, V):
        t = time.perf_counter()
        out = orig_matmat(self, V)
        parts["hvp"] += time.perf_counter() - t
        return out

    def matvec(self, v):
        t = time.perf_counter()
        out = orig_matvec(self, v)
        parts["hvp"] += time.perf_counter() - t
        return out

    import lyapunov_callbacks.callbacks.hessian_monitor as hm

    orig_log = hm.log_measurements

    def log(*a, **k):
        t = time.perf_counter()
        orig_log(*a, **k)
        parts["log"] += time.perf_counter() - t

    Op.__init__, Op.matmat, Op.matvec = init, matmat, matvec
    hm.log_measurements = log
    try:
        trainer = _trainer(steps, [Before(), monitor, After()])
        fit_seconds = _fit(trainer, which, seed, _model(which, seed))
    finally:
        Op.__init__, Op.matmat, Op.matvec = orig_init, orig_matmat, orig_matvec
        hm.log_measurements = orig_log

    errors, hvps, oracle = [], [], []
    ref_model = _model(which, seed)
    fixed = monitor._probe is not None
    for step, rec in sorted(captured.items()):
        # Measurement is side-effect free, so every variant trains along the same trajectory: the reference
        # at a step (and batch kind) is shared (cached) between variants.
        key = (step, "fixed" if fixed else "current")
        if key not in references:
            ref_model.load_state_dict(rec["state"])
            ref_model.train()
            batch = monitor._probe._batch if fixed else tuple(rec["batch"])
            references[key] = float(top_hessian_eigenvalues(
                ref_model, C.loss_fn, batch, k=1, tol=1e-6, max_iter=150, seed=12345,
            ).eigenvalues[0])
        ref = references[key]
        errors.append((step, abs(rec["h0"] - ref) / abs(ref), rec["h0"], ref))
        hvps.append(rec["hvps"])
        if rec["init"] is not None:
            ref_model.load_state_dict(rec["state"])
            batch = monitor._probe._batch if fixed else tuple(rec["batch"])
            oracle.append((_oracle_hvps(ref_model, batch, rec["init"], ref, int(rec["hvps"])), rec["hvps"], step))
    n = len(errors)
    return {
        "max_err": max(e[1] for e in errors),
        "median_err": statistics.median(e[1] for e in errors),
        "worst": max(errors, key=lambda e: e[1]),
        "n": n,
        "hvps_first": hvps[0],
        "hvps_mean_warm": statistics.mean(hvps[1:]) if n > 1 else float("nan"),
        "per_estimate_ms": {k: 1e3 * v / n for k, v in parts.items()},
        # (HVPs an oracle stopping rule needs from the same warm start, HVPs the monitor's rule took, step) per warm estimate
        "oracle": oracle,
        "fit_seconds": fit_seconds,
    }


def _oracle_hvps(model, batch, init: torch.Tensor, reference: float, cap: int) -> int | None:
    """HVPs an oracle stopping rule needs: the fewest Lanczos steps from ``init`` whose Ritz value is within
    ``ACCURACY`` (relative) of ``reference``, looked for up to ``cap + 4``; ``None`` if none is.

    Lanczos is deterministic, so the solve with ``max_iter=m`` and a tolerance it cannot meet gives the Ritz
    value after ``m`` steps (``m`` products, one more from the monitor's two-vector start): the value any
    stopping rule would return there. No rule can stop earlier and
    be within ``ACCURACY``; the gap between this count and the monitor's is what a better rule could save.
    """
    from lyapunov_callbacks.core.eigen import lanczos
    from lyapunov_callbacks.core.hessian import HessianOperator

    model.train()
    # The monitor's two-vector start [y0, y1] is a Rayleigh-Ritz start: its two products count.
    start = "rayleigh_ritz" if init.ndim == 2 and init.shape[1] > 1 else "first"
    with torch.enable_grad(), HessianOperator(model, C.loss_fn, batch) as op:
        for m in range(1, cap + 5):
            res = lanczos(op, k=1, tol=1e-12, max_iter=m, init=init, start=start)
            if abs(float(res.eigenvalues[0]) - reference) <= ACCURACY * abs(reference):
                return int(res.num_hvps)
    return None


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--steps", type=int, default=None, help="optimiser steps per fit")
        p.add_argument("--models", default="small,readme", help="comma-separated: small, readme")
        C.add_out_argument(p, "monitor_overhead.md")

    args = C.parse_args("Monitor overhead on trainer.fit and accuracy of logged h0.", argv, extra=extra)
    steps = args.steps or (60 if args.quick else 200)
    repeats = args.repeats or (2 if args.quick else 3)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out = {}
    with C.recorded(C.out_path(args, "monitor_overhead.md"), "monitor_overhead.py", argv, "Monitor overhead"):
        for which in args.models.split(","):
            C.header(f"Monitor overhead: trainer.fit of {MODELS[which]}, {steps} steps", args)
            out[which] = _one_model(which, steps, repeats, args.seed)
    return out


def _one_model(which: str, steps: int, repeats: int, seed: int) -> dict:
    variants = _variants()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    _fit_seconds(which, min(steps, 20), [], seed)  # warm-up: imports, allocator, first-call costs
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            C.progress(f"monitor_overhead {which}: repetition {r + 1}/{repeats}, {name}")
            times[name].append(_fit_seconds(which, steps, variants[name][0](), seed))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    references: dict = {}
    C.progress(f"monitor_overhead {which}: accuracy runs")
    acc = {name: _accuracy_run(which, steps, every, seed, kw, references)
           for name, (_, every, kw) in variants.items() if every is not None}
    rows = []
    for name in names:
        ratio = med[name] / med["baseline"]
        # each repetition's fit over the same repetition's baseline: how far one repetition's ratio strays
        spread = [t / b for t, b in zip(times[name], times["baseline"])]
        every = variants[name][1]
        target = TARGETS.get(name)
        rows.append([
            name, med[name], ratio, f"{min(spread):.2f}–{max(spread):.2f}",
            (C.met(ratio, target) + f" (≤ {target}×)") if target else "—",
            (f"{acc[name]['hvps_first']:.0f} / {acc[name]['hvps_mean_warm']:.1f}" if every else "—"),
            (acc[name]["max_err"] if every else "—"),
            (acc[name]["median_err"] if every else "—"),
            ((C.met(acc[name]["max_err"], ACCURACY) + f" (≤ {ACCURACY:g})") if every else "—"),
        ])
    print(C.table(["variant", "fit seconds (median)", "ratio to baseline", "per-repetition ratios (min–max)",
                   "overhead target met",
                   "HVPs first / mean warm", "max rel. error of logged h0 (vs cold Lanczos)", "median rel. error",
                   "accuracy target met"], rows))
    base_step_ms = 1e3 * med["baseline"] / steps
    print(f"\nModel: {MODELS[which]}. Medians of {repeats} interleaved repetitions; baseline "
          f"{base_step_ms:.1f} ms per training step. The target verdict is the median's; the per-repetition "
          "ratios show the machine's noise around it.")
    for name, a in acc.items():
        p = a["per_estimate_ms"]
        print(
            f"- {name}: {a['n']} estimates, HVPs: {a['hvps_first']:.0f} for the first (cold), "
            f"{a['hvps_mean_warm']:.1f} on average when warm-started; worst error {a['worst'][1]:.1e} at step "
            f"{a['worst'][0]} (logged {a['worst'][2]:.5g}, reference {a['worst'][3]:.5g}). Time per estimate "
            f"{p['measure']:.0f} ms = operator build {p['build']:.0f} ms + HVPs {p['hvp']:.0f} ms + logging "
            f"{p['log']:.1f} ms + solver vector work and the rest {p['measure'] - p['build'] - p['hvp'] - p['log']:.0f} ms "
            f"(= {p['measure'] / base_step_ms:.1f} training steps)."
        )
        found = [o for o, _, _ in a["oracle"] if o is not None]
        at_worst = [(o, h) for o, h, st in a["oracle"] if st == a["worst"][0]]
        if a["oracle"]:
            print(
                f"  Oracle stopping rule (the first Lanczos step within {ACCURACY:g} of the reference, same warm "
                f"start): {statistics.mean(found) if found else float('nan'):.1f} HVPs on average over "
                f"{len(found)} of {len(a['oracle'])} warm estimates (none within {ACCURACY:g} in "
                f"{len(a['oracle']) - len(found)}), against {statistics.mean(h for _, h, _ in a['oracle']):.1f} taken"
                + (f"; at the worst step {at_worst[0][1]:.0f} taken, oracle "
                   f"{'none within ' + str(int(at_worst[0][1]) + 4) if at_worst[0][0] is None else at_worst[0][0]}."
                   if at_worst else ".")
            )
    print()
    return {"medians": med, "accuracy": acc, "steps": steps}


if __name__ == "__main__":
    main()
