"""The greedy step along the optimiser's direction (``rule="batch_sharpness"``) against tuned constants, long runs.

Tasks: scikit-learn's digits (``DigitsDataModule``: 1,797 images in all, 3×32×32; ``--data synthetic``: the
CIFAR-shaped two-class stand-in instead) × ``mlp``, ``lenet1``,
``tinyresnet`` × ``ce``, ``mse``, each under three optimiser families: plain SGD (``sgd``), SGD with momentum
0.9 (``momentum``) and AdamW (``adamw``, weight decay 0.01). Every fit is a plain PyTorch loop (the package's
core, no Lightning) of ``--steps`` steps on the same seeded batch sequence from the same initial weights
(``benchmarks/lr_free.py``'s data, models and batches).

Rows, per task and family:

- ``<family> best``: the constant LR of the family's 7-value grid with the lowest final training loss on seed 0
  among the fits that did not diverge, then run on every seed (the target compares final training losses, so
  the grid is tuned on that). Grids: SGD {0.001, …, 1}; momentum 0.9 {0.0003, …, 0.3} (the effective step
  α/(1−μ) of the SGD grid); AdamW {1e-4, …, 0.1}.
- ``QN newton``: α = c/h0 (``QuasiNewtonLR``'s default rule: Lanczos every 10 steps, warm-up, loss trigger),
  c = 1 (SGD) or the heavy-ball factor 1 + μ (momentum); not run for AdamW here (its rule needs the
  preconditioned operator, a separate loop).
- ``QN sharpness``: ``rule="batch_sharpness"``, one measurement per step (one HVP on the step's batch along the
  optimiser's own direction, finite differences with the step's gradient reused), EMA 0.9.
- ``QN sharpness /5``: a measurement every 5 steps, no dense warm-up.
- ``QN sharpness /5 wu50``: every step for the first 50 steps, then every 5.
- ``QN sharpness autograd``: as ``QN sharpness`` with the exact double-backward product (cost comparison).
- ``QN sharpness /10 wu50``: every step for the first 50 steps, then every 10 (half the measurements' cost).
- ``QN sharpness ×2 /5 wu50``: as ``QN sharpness /5 wu50`` with ``scale=2``: α·s = 2, the step that the batch's
  quadratic model along d puts at the edge of stability (the loss level it starts from) instead of its
  minimum, as a constant LR's run holds α·h0 near 2.
- ``Prodigy``, ``D-Adapt SGD``, ``SF-SGD`` (schedule-free SGD, momentum 0.9, at the tuned SGD LR): the
  learning-rate-free baselines, in the ``sgd`` family only.

Columns (fit times are CPU times of the training loop, ``time.process_time``, so that a loaded machine
does not distort the ratios; probes are left out): final training loss on the whole training subset (eval mode), its ratio to ``<family> best``,
diverged (non-finite, or above 10× the initial loss), the fit's time over the ``best`` constant fit of the same
task and seed, the whole cost over the grid search it replaces (its time over the sum of the 7 grid fits of
seed 0), the last LR and the HVPs. Each curvature row whose loss is above 1.25× the best constant is named in
"Losing tasks" with α·h0 and α·s (s the step's directional sharpness, the batch sharpness for plain SGD)
measured along the best constant's own fit every ``--probe-every`` steps: the reason a rule that aims at
α·s = 1 lands where it does.

Usage::

    python benchmarks/lr_free_long.py [--quick] [--threads N] [--steps 1000] [--batch-size 64] [--seeds 3]
        [--models mlp,lenet1,tinyresnet] [--losses ce,mse] [--families sgd,momentum,adamw] [--out PATH]

``--quick``: MLP, CE, plain SGD, 20 steps, 1 seed, 256/128 images, grids of two LRs (seconds). A full run
writes ``benchmarks/results/lr_free_long.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _common as C  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import lr_free as LF  # noqa: E402
from lyapunov_callbacks import top_hessian_eigenvalues  # noqa: E402
from lyapunov_callbacks.core.quasi_newton_rule import QuasiNewtonRule  # noqa: E402
from lyapunov_callbacks.core.step_direction import measure_directional_sharpness  # noqa: E402
from lyapunov_callbacks.analysis.summary import THRESHOLDS  # noqa: E402

MOMENTUM = 0.9
ADAMW_DECAY = 0.01
GRIDS = {
    "sgd": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
    "momentum": (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
}
QUICK_GRIDS = {"sgd": (0.03, 0.3), "momentum": (0.003, 0.03), "adamw": (1e-3, 1e-2)}
#: The curvature rows of each family (the LR-free baselines are added to ``sgd``).
QN_ROWS = {
    "sgd": ("QN newton", "QN sharpness", "QN sharpness /5", "QN sharpness /5 wu50", "QN sharpness /10 wu50",
            "QN sharpness ×2 /5 wu50", "QN sharpness autograd"),
    "momentum": ("QN newton", "QN sharpness", "QN sharpness /5", "QN sharpness /5 wu50", "QN sharpness /10 wu50",
                 "QN sharpness ×2 /5 wu50"),
    "adamw": ("QN sharpness", "QN sharpness /5 wu50", "QN sharpness /10 wu50", "QN sharpness ×2 /5 wu50"),
}
LR_FREE = ("Prodigy", "D-Adapt SGD", "SF-SGD")
#: The tolerance of the target (final loss ≤ 1.25× the best constant).
TARGET_RATIO = 1.25
DEFAULT_OUT = C.results_path("lr_free_long.md")


def make_optimizer(family: str, params: list, lr: float) -> torch.optim.Optimizer:
    if family == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if family == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    if family == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=ADAMW_DECAY)
    raise ValueError(f"unknown family {family!r}; use sgd, momentum or adamw")


def qn_rule(row: str, family: str) -> tuple[QuasiNewtonRule, str]:
    """The rule of a QN row and the HVP backend of its measurement."""
    if row == "QN newton":
        factor = 1.0 + MOMENTUM if family == "momentum" else 1.0
        return QuasiNewtonRule(stability_factor=factor, warmup_tol=LF.QN_WARMUP_TOL,
                               warmup_max_hvps=LF.QN_WARMUP_HVPS, every_n_steps=10), "autograd"
    every, warmup, scale = {"QN sharpness": (1, 0, 1.0), "QN sharpness autograd": (1, 0, 1.0),
                            "QN sharpness /5": (5, 0, 1.0), "QN sharpness /5 wu50": (5, 50, 1.0),
                            "QN sharpness /10 wu50": (10, 50, 1.0),
                            "QN sharpness ×2 /5 wu50": (5, 50, 2.0)}[row]
    backend = "autograd" if row.endswith("autograd") else "finite_difference"
    return QuasiNewtonRule(rule="batch_sharpness", scale=scale, every_n_steps=every, warmup_steps=warmup), backend


@dataclass
class Fit:
    train_loss: float
    diverged: bool
    seconds: float
    extra: dict = field(default_factory=dict)


def fit(family: str, row: str, model: nn.Module, data: dict, train_batches: list, lr: Optional[float],
        initial_loss: float, probe_every: int = 0) -> Fit:
    """One fit of ``row`` (a constant LR, a QN rule or an LR-free optimiser) on ``train_batches``.

    ``probe_every > 0`` (constant LR only) also measures α·h0 and α·s every that many steps, outside the timing.
    """
    params = list(model.parameters())
    rule, backend, sf = None, None, False
    if row == "constant":
        opt = make_optimizer(family, params, lr)
    elif row == "Prodigy":
        from prodigyopt import Prodigy

        opt = Prodigy(params, lr=1.0)
    elif row == "D-Adapt SGD":
        from dadaptation import DAdaptSGD

        opt = DAdaptSGD(params, lr=1.0)
    elif row == "SF-SGD":
        from schedulefree import SGDScheduleFree

        opt, sf = SGDScheduleFree(params, lr=lr), True
    else:
        rule, backend = qn_rule(row, family)
        initial = 0.1 if family != "adamw" else 1e-3
        opt = make_optimizer(family, params, initial)
        rule.reset(initial_lr=initial)
    diverged, vec, hvps, probes, probe_seconds = False, None, 0, [], 0.0
    model.train()
    if sf:
        opt.train()
    start = time.process_time()
    for step, batch in enumerate(train_batches):
        loss = model.training_loss(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = True
            break
        needs = False
        if rule is not None and rule.rule != "batch_sharpness":
            while rule.needs_estimate(step, loss=value):
                tol, cap = ((LF.QN_WARMUP_TOL, rule.warmup_hvps_left) if not rule.warmup_done
                            else (LF.QN_TOL, LF.QN_MAX_ITER))
                res = top_hessian_eigenvalues(model, LF._loss_fn, batch, tol=tol, max_iter=cap, init=vec)
                vec, hvps = res.eigenvectors, hvps + res.num_hvps
                rule.update(float(res.eigenvalues[0]), step, hvps=res.num_hvps)
        elif rule is not None:
            needs = rule.needs_estimate(step, loss=value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if needs:
            res = measure_directional_sharpness(model, LF._loss_fn, batch, opt, backend=backend)
            hvps += res.num_hvps
            rule.update(res.sharpness, step, hvps=res.num_hvps)
        if rule is not None:
            for group in opt.param_groups:
                group["lr"] = rule.lr
        if probe_every and step % probe_every == 0:
            t0 = time.process_time()
            probes.append(_probe(model, batch, opt, lr))
            probe_seconds += time.process_time() - t0
        opt.step()
    seconds = time.process_time() - start - probe_seconds
    if sf:
        opt.eval()
        if LF._has_batchnorm(model):
            LF._recompute_bn(model, train_batches)
    train_loss, _ = LF.evaluate(model, data["train"])
    if diverged or not math.isfinite(train_loss):
        diverged, train_loss = True, float("nan")
    elif train_loss > THRESHOLDS["diverge_factor"] * initial_loss:
        diverged = True
    extra: dict[str, Any] = {}
    if rule is not None:
        extra = {"lr": rule.lr, "hvps": hvps, "rejected": rule.rejected_estimates}
    if probes:
        extra["probes"] = probes
    return Fit(train_loss, diverged, seconds, extra)


def _probe(model: nn.Module, batch: Any, opt: torch.optim.Optimizer, lr: float) -> tuple[float, float]:
    """(α·h0, α·s) at the current weights on the step's batch (after its backward, before its step)."""
    h0 = float(top_hessian_eigenvalues(model, LF._loss_fn, batch, tol=1e-2, max_iter=50).eigenvalues[0])
    s = measure_directional_sharpness(model, LF._loss_fn, batch, opt, backend="autograd").sharpness
    return lr * h0, lr * s


def run_task(data: dict, model_name: str, loss: str, family: str, steps: int, batch_size: int, seeds: int,
             grid: tuple, probe_every: int, progress: Callable, keep: Optional[set] = None) -> dict[str, Any]:
    """The tuned constant and every row's fits (one per seed) of one task and family."""

    def new_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return LF.build_model(model_name, data["num_classes"], loss)

    seq = {s: LF.batches(data["train"], batch_size, steps, s) for s in range(seeds)}
    initial = {s: LF.evaluate(new_model(s), data["train"])[0] for s in range(seeds)}
    grid_fits = {lr: fit(family, "constant", new_model(0), data, seq[0], lr, initial[0]) for lr in grid}
    stable = [lr for lr in grid if not grid_fits[lr].diverged]
    best_lr = min(stable, key=lambda lr: (grid_fits[lr].train_loss, lr)) if stable else min(grid)
    progress("  grid " + ", ".join(f"{lr:g}: {f.train_loss:.4g}{' (div.)' if f.diverged else ''}"
                                   for lr, f in grid_fits.items()) + f" -> {best_lr:g}")
    rows: dict[str, list[Fit]] = {"best": [grid_fits[best_lr]] + [
        fit(family, "constant", new_model(s), data, seq[s], best_lr, initial[s]) for s in range(1, seeds)]}
    names = [n for n in QN_ROWS[family] + (LR_FREE if family == "sgd" else ()) if keep is None or n in keep]
    for row in names:
        rows[row] = [fit(family, row, new_model(s), data, seq[s], best_lr, initial[s]) for s in range(seeds)]
        progress(f"  {row}: " + ", ".join(f"{f.train_loss:.4g}" for f in rows[row]))
    best = _mean(rows["best"])
    losing = [r for r in QN_ROWS[family] if r in rows and (not (_mean(rows[r]) <= TARGET_RATIO * best)
                                                           or any(f.diverged for f in rows[r]))]
    probes = None
    if losing and probe_every:
        probes = fit(family, "constant", new_model(0), data, seq[0], best_lr, initial[0],
                     probe_every=probe_every).extra.get("probes")
    return {"best_lr": best_lr, "rows": rows, "grid_seconds": sum(f.seconds for f in grid_fits.values()),
            "losing": losing, "probes": probes}


def _mean(fits: list[Fit]) -> float:
    finite = [f.train_loss for f in fits if f.train_loss == f.train_loss]
    return statistics.fmean(finite) if finite and not any(f.diverged for f in fits) else float("nan")


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if x != x else f"{x:.{digits}g}"


def task_lines(task: str, res: dict) -> list[str]:
    rows, base = res["rows"], res["rows"]["best"]
    best = _mean(base)
    out = []
    for name, fits in rows.items():
        mean = _mean(fits)
        div = sum(f.diverged for f in fits)
        time_ratio = statistics.median(f.seconds / b.seconds for f, b in zip(fits, base))
        grid_ratio = statistics.median(f.seconds for f in fits) / res["grid_seconds"]
        label = f"best (lr {res['best_lr']:g})" if name == "best" else name
        if name == "SF-SGD":
            label += f" (lr {res['best_lr']:g})"
        extra = ""
        if "lr" in fits[0].extra:
            extra = (f"{_fmt(statistics.fmean(f.extra['lr'] for f in fits))} | "
                     f"{statistics.fmean(f.extra['hvps'] for f in fits):.0f}")
        else:
            extra = " | "
        out.append(f"| {task} | {label} | {_fmt(mean)} | {_fmt(mean / best, 3)} | {div}/{len(fits)} | "
                   f"{time_ratio:.2f} | {grid_ratio:.3f} | {extra} |")
    return out


def summary_lines(finished: list[tuple[str, str, dict]]) -> list[str]:
    lines = ["## Final loss over the best constant (targets: ≤ 1.25, no divergence)", ""]
    for family in ("sgd", "momentum", "adamw"):
        tasks = [(t, r) for t, f, r in finished if f == family]
        if not tasks:
            continue
        names = [n for n in QN_ROWS[family] + (LR_FREE if family == "sgd" else ()) if all(n in r["rows"] for _, r in tasks)]
        lines += [f"### {family}", "", "| task | best constant | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for task, res in tasks:
            best = _mean(res["rows"]["best"])
            cells = [_fmt(_mean(res["rows"][n]) / best) for n in names]
            lines.append(f"| {task} | {_fmt(best)} (lr {res['best_lr']:g}) | " + " | ".join(cells) + " |")
        lines.append("")
        for n in (n for n in names if n.startswith("QN")):
            ok = sum(_mean(r["rows"][n]) <= TARGET_RATIO * _mean(r["rows"]["best"]) for _, r in tasks)
            line = f"- {n}: within 1.25× on {ok}/{len(tasks)} tasks"
            for o in (o for o in LR_FREE if family == "sgd" and all(o in r["rows"] for _, r in tasks)):
                # "beats": a lower final loss, or the other diverged (NaN mean) while this did not.
                beats = sum(_mean(r["rows"][n]) < _mean(r["rows"][o])
                            or (_mean(r["rows"][o]) != _mean(r["rows"][o]) and _mean(r["rows"][n]) == _mean(r["rows"][n]))
                            for _, r in tasks)
                line += f"; beats {o} on {beats}/{len(tasks)}"
            lines.append(line + ".")
        lines.append("")
    losing = [(t, f, r) for t, f, r in finished if r["losing"]]
    lines += ["## Losing tasks (final loss above 1.25× the best constant, or a divergence)", ""]
    if not losing:
        lines.append("None.")
    for task, family, res in losing:
        probes = res["probes"] or []
        if probes:
            ah = [p[0] for p in probes]
            as_ = [p[1] for p in probes if p[1] == p[1]]
            reason = (f"at the best constant {res['best_lr']:g}: α·h0 median {statistics.median(ah):.2f} "
                      f"(max {max(ah):.2f}), α·s median {statistics.median(as_):.2f} (max {max(as_):.2f}) "
                      f"over {len(probes)} probes" if as_ else "no finite α·s probe")
        else:
            reason = "not probed (--probe-every 0)"
        lines.append(f"- {task} [{family}]: {', '.join(res['losing'])}; {reason}.")
    return lines


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: MLP, CE, SGD, 20 steps, 1 seed")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per fit (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3)")
    parser.add_argument("--models", default=None, help="comma list of mlp,lenet1,tinyresnet")
    parser.add_argument("--losses", default=None, help="comma list of ce,mse")
    parser.add_argument("--families", default=None, help="comma list of sgd,momentum,adamw")
    parser.add_argument("--rows", default=None, help="comma list of the QN / LR-free rows to run (default all)")
    parser.add_argument("--probe-every", type=int, default=None, help="α·h0/α·s probe cadence on losing tasks")
    parser.add_argument("--data", choices=("digits", "synthetic"), default="digits",
                        help="digits (default) or the CIFAR-shaped two-class stand-in (tasks the rows were not "
                             "chosen on)")
    parser.add_argument("--out", default=None, help=f"write the markdown here (default run: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick
    steps = args.steps or (20 if quick else 1000)
    seeds = args.seeds or (1 if quick else 3)
    train_size, val_size = (256, 128) if quick else (LF.DEFAULT_TRAIN_SIZE, LF.DEFAULT_VAL_SIZE)
    models = (args.models or ("mlp" if quick else "mlp,lenet1,tinyresnet")).split(",")
    losses = (args.losses or ("ce" if quick else "ce,mse")).split(",")
    families = (args.families or ("sgd" if quick else "sgd,momentum,adamw")).split(",")
    probe_every = args.probe_every if args.probe_every is not None else (5 if quick else 50)
    grids = QUICK_GRIDS if quick else GRIDS
    keep = None if args.rows is None else set(args.rows.split(","))
    out = args.out if args.out is not None else (None if quick else DEFAULT_OUT)
    warnings.filterwarnings("ignore", category=UserWarning)
    data = LF.load_data(args.data, train_size, val_size)
    if data is None:
        raise SystemExit("lyapunov_callbacks.datamodules.digits.DigitsDataModule is not available.")
    wall, cpu = time.perf_counter(), time.process_time()
    lines = ["| task | row | final train loss | / best | diverged | time / best fit | time / 7-fit grid "
             "| last lr | HVPs |", "|---|---|---|---|---|---|---|---|---|"]
    finished = []
    for model_name in models:
        for loss in losses:
            for family in families:
                task = f"{args.data} {model_name} {loss} {family}"
                C.progress(task)
                res = run_task(data, model_name, loss, family, steps, args.batch_size, seeds, grids[family],
                               probe_every, C.progress, keep)
                lines += task_lines(task, res)
                finished.append((task, family, res))
    header = (
        f"{steps} steps at batch {args.batch_size}, {train_size} training images "
        f"({'digits has 1,797' if args.data == 'digits' else 'the stand-in, two classes'}), {seeds} "
        f"seed(s); grids {', '.join(f'{f} {list(grids[f])}' for f in families)}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {C.uptime()}. Wall time "
        f"{(time.perf_counter() - wall) / 60:.1f} min, CPU time {(time.process_time() - cpu) / 60:.1f} min. "
        "Fit times are the process's CPU time (robust to the machine's load with one thread)."
    )
    text = "\n".join([header, "", *summary_lines(finished), "", "## Every row", "", *lines]) + "\n"
    print(text)
    if out:
        C.write_results(out, "lr_free_long.py", argv, "Greedy step along the optimiser's direction, long runs", text)
    return text


if __name__ == "__main__":
    main()
