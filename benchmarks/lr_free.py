"""The quasi-Newton LR against a tuned constant LR, a cyclic LR and learning-rate-free optimisers.

Tasks: ``linear``, ``mlp``, ``lenet1``, ``tinyresnet`` × ``ce``, ``mse`` on two data sets, the two-class
synthetic CIFAR stand-in (``CIFAR10DataModule(synthetic=True, classes=[3, 5])``) and scikit-learn's bundled
digits (``lyapunov_callbacks.datamodules.digits.DigitsDataModule``, ten classes, 3×32×32; skipped with a note while that module is
missing). Every fit is a plain PyTorch loop (no Lightning: one cost model for every row) of the same number of
steps on the same seeded batch sequence from the same initial weights, for each of ``--seeds`` seeds.

Rows, per task:

- ``SGD best``: plain SGD at the LR of the grid {0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1} with the lowest
  validation loss on seed 0 among the LRs whose fit did not diverge (if every LR diverged: the smallest); chosen
  once per task, then run on every seed. The chosen LR is shown. The issue's grid {0.01, ..., 1} is extended
  down by 0.001 and 0.003 because on the realistic stand-in the linear model's h0 is a few hundred, where every
  LR of that grid diverges.
- ``cyclic``: plain SGD with ``CyclicLR`` triangular 0.05 ↔ 0.3 (the paper's configs), two cycles per run.
- ``Prodigy`` (``prodigyopt.Prodigy(lr=1)``), ``D-Adapt SGD`` (``dadaptation.DAdaptSGD(lr=1)``): LR-free.
- ``SF-SGD``: ``schedulefree.SGDScheduleFree`` (momentum 0.9) at the tuned SGD LR: schedule-free, not LR-free,
  so it gets the tuning SGD got. ``optimizer.train()`` before training, ``optimizer.eval()`` before evaluation
  (BatchNorm statistics are recomputed at the evaluation weights, as its authors prescribe).
- The quasi-Newton rows run :class:`~lyapunov_callbacks.core.quasi_newton_rule.QuasiNewtonRule`, the object
  ``QuasiNewtonLR`` delegates every decision to, in the plain loop, with ``QuasiNewtonLR``'s defaults: warm-up
  at the initial weights (tol 1e-3, ≤ 200 HVPs), re-estimates every 10 steps on the current batch (Lanczos,
  tol 1e-2, warm start), the LR raised by at most 2× per estimate, clamps [1e-5, 10]. The timed loop holds every
  HVP and decision; it leaves out what only the callback adds (logging and the state guard of each estimate).

  * ``QN newton``: α = 1/h0 with no trigger (scheduled estimates only).
  * ``QN newton+trig``: α = 1/h0 with the loss trigger (``QuasiNewtonLR``'s default: an estimate at once when
    the loss doubles over its recent mean; free).
  * ``QN newton+trig /40``: the same with scheduled re-estimates every 40 steps instead of 10 (the loss trigger
    still answers a sharpening at once): the cadence that the cost target of ≤ 1.3× a constant-LR fit asks for.
  * ``QN edge 1.8``: the edge-of-stability rule α·h0 = 1.8 with the loss trigger.

  Each QN row's name shows the last LR, the HVPs, estimates, loss-triggered estimates and clamped estimates
  (means over seeds).

Columns: final training loss on the whole training subset (eval mode), validation accuracy, diverged (a
non-finite loss during training, or a final training loss above 10× the one at initialisation: the results
page's criterion, ``lyapunov_callbacks.analysis.summary.THRESHOLDS["diverge_factor"]``) as "k/seeds", and the fit's wall
time over the ``SGD best`` fit of the same task and seed (only the training loop is timed: batches are
pre-drawn tensors, evaluation is outside; h0 estimates are inside). Means over seeds (± the standard deviation
for the loss), except the time ratio: the median over seeds (millisecond fits have outliers).

Default size: 100 steps at batch 32 (1.6 epochs of the subset), 2,048 training and 1,000 validation images per
data set (digits has 1,797 images in all, so fewer), 3 seeds, both data sets: 16 tasks × 33 fits (7 grid fits on
seed 0, 2 more SGD fits, 3 × 8 other rows). Measured wall time with ``--threads 1`` on this project's 2-core
machine: 24.9 min (22.4 of it TinyResNet) and 25.1 min in a later run. The table's header states the measured wall time of the run that
produced it. Cut it with
``--models``/``--data``/``--losses``/``--seeds``; lengthen it with ``--steps``. ``--quick``: linear on the
synthetic data, CE, 10 steps, 1 seed, 512/256 images, a grid of two LRs (about 10 s of CPU).

Usage::

    python benchmarks/lr_free.py [--quick] [--threads N] [--steps 100] [--batch-size 32] [--seeds 3]
        [--models linear,mlp,lenet1,tinyresnet] [--losses ce,mse] [--data synthetic,digits]
        [--train-size 2048] [--val-size 1000] [--out benchmarks/results/lr_free.md]

``--out`` defaults to ``benchmarks/results/lr_free.md`` for a non-quick run (the file the README quotes).
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

import _common as C  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lyapunov_callbacks import top_hessian_eigenvalues  # noqa: E402
from lyapunov_callbacks.core.quasi_newton_rule import QuasiNewtonRule  # noqa: E402
from lyapunov_callbacks.analysis.summary import THRESHOLDS  # noqa: E402

#: The issue's grid {0.01, ..., 1} extended down by 0.001 and 0.003: on the realistic stand-in the linear model's
#: h0 is a few hundred, so every LR of the issue's grid diverges there.
SGD_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
QUICK_GRID = (0.003, 0.03)
#: The paper's cyclic schedule (configs/lr_scheduler/cyclic_cifar2.yaml), with two full cycles per run here.
CYCLIC = (0.05, 0.3)
#: Re-estimate tolerance and cap, warm-up tolerance and cap: QuasiNewtonLR's defaults.
QN_TOL, QN_MAX_ITER, QN_WARMUP_TOL, QN_WARMUP_HVPS = 1e-2, 50, 1e-3, 200
DEFAULT_STEPS, DEFAULT_BATCH_SIZE, DEFAULT_TRAIN_SIZE, DEFAULT_VAL_SIZE = 100, 32, 2048, 1000
DEFAULT_OUT = C.results_path("lr_free.md")


# ---------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------
def _stack(loader: DataLoader, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys, n = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        n += len(y)
        if n >= limit:
            break
    return torch.cat(xs)[:limit].contiguous(), torch.cat(ys)[:limit].contiguous()


def load_data(name: str, train_size: int, val_size: int) -> Optional[dict[str, Any]]:
    """``{"train": (x, y), "val": (x, y), "num_classes": k}`` of the first images of each split, or ``None``."""
    if name == "synthetic":
        from lyapunov_callbacks.datamodules import CIFAR10DataModule

        dm = CIFAR10DataModule(synthetic=True, classes=[3, 5], batch_size=1024, download=False)
        num_classes = 2
    elif name == "digits":
        try:
            from lyapunov_callbacks.datamodules.digits import DigitsDataModule
        except ImportError:
            return None
        dm = DigitsDataModule(batch_size=1024)
        num_classes = int(getattr(dm, "num_classes", 10))
    else:
        raise ValueError(f"unknown data set {name!r}; use synthetic or digits")
    dm.prepare_data()
    dm.setup("fit")
    train = _stack(dm.train_dataloader(), train_size)
    val = _stack(dm.val_dataloader(), val_size)
    return {"train": train, "val": val, "num_classes": num_classes}


def build_model(name: str, num_classes: int, loss: str) -> nn.Module:
    from lyapunov_callbacks.models import MLP, LeNet1, LinearModel, TinyResNet

    classes = {"linear": LinearModel, "mlp": MLP, "lenet1": LeNet1, "tinyresnet": TinyResNet}
    return classes[name](num_classes=num_classes, loss=loss)


def _loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    return model.training_loss(batch)


def batches(train: tuple[torch.Tensor, torch.Tensor], batch_size: int, steps: int, seed: int) -> list:
    """The seeded batch sequence (reshuffled every epoch), the same for every row of one seed."""
    gen = torch.Generator().manual_seed(1000 + seed)
    x, y = train
    out, order = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(order) < batch_size:
            order = torch.randperm(len(y), generator=gen)
        idx, order = order[:batch_size], order[batch_size:]
        out.append((x[idx], y[idx]))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(mean loss, accuracy) over ``data`` in eval mode."""
    was_training = model.training
    model.eval()
    x, y = data
    total, correct = 0.0, 0
    for i in range(0, len(y), 512):
        xb, yb = x[i : i + 512], y[i : i + 512]
        logits = model(xb)
        total += float(model.loss_from_logits(logits, yb)) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return total / len(y), correct / len(y)


# ---------------------------------------------------------------------------------------------------------------
# One fit
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Fit:
    train_loss: float
    val_loss: float
    val_acc: float
    diverged: bool
    seconds: float
    extra: dict = field(default_factory=dict)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def _recompute_bn(model: nn.Module, train_batches: list, count: int = 20) -> None:
    """BatchNorm running statistics at the current weights (schedule-free evaluates at other weights)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    model.train()
    for x, _ in train_batches[:count]:
        model(x)


def fit(
    row: str, model: nn.Module, data: dict, train_batches: list, lr: Optional[float], initial_loss: float
) -> Fit:
    """Train ``model`` with the optimiser of ``row`` on ``train_batches``; evaluate on the whole subsets.

    ``initial_loss`` is the training loss at the initial weights (the divergence criterion)."""
    params = list(model.parameters())
    steps = len(train_batches)
    scheduler, rule, sf = None, None, False
    if row == "SGD" or row == "SGD best":
        opt = torch.optim.SGD(params, lr=lr)
    elif row == "cyclic":
        opt = torch.optim.SGD(params, lr=CYCLIC[0])
        scheduler = torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=CYCLIC[0], max_lr=CYCLIC[1], step_size_up=max(1, steps // 4), mode="triangular",
            cycle_momentum=False,
        )
    elif row == "Prodigy":
        from prodigyopt import Prodigy

        opt = Prodigy(params, lr=1.0)
    elif row == "D-Adapt SGD":
        from dadaptation import DAdaptSGD

        opt = DAdaptSGD(params, lr=1.0)
    elif row == "SF-SGD":
        from schedulefree import SGDScheduleFree

        opt, sf = SGDScheduleFree(params, lr=lr), True
    elif row.startswith("QN"):
        opt = torch.optim.SGD(params, lr=0.1)
        settings = {
            "QN newton": dict(loss_rise=None),
            "QN newton+trig": dict(),
            "QN newton+trig /40": dict(every_n_steps=40),
            "QN newton+trig auto": dict(every_n_steps="auto"),  # benchmarks/qn_cadence.py's row
            "QN edge 1.8": dict(rule="edge", edge=1.8),
        }[row]
        settings.setdefault("every_n_steps", 10)
        rule = QuasiNewtonRule(warmup_tol=QN_WARMUP_TOL, warmup_max_hvps=QN_WARMUP_HVPS, **settings)
        rule.reset(initial_lr=0.1)
    else:
        raise ValueError(f"unknown row {row!r}")

    diverged, vec, hvps, clamped = False, None, 0, 0
    model.train()
    if sf:
        opt.train()
    start = time.perf_counter()
    for step, batch in enumerate(train_batches):
        loss = model.training_loss(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = True
            break
        if rule is not None:
            while rule.needs_estimate(step, loss=value):
                tol, cap = (QN_WARMUP_TOL, rule.warmup_hvps_left) if not rule.warmup_done else (QN_TOL, QN_MAX_ITER)
                res = top_hessian_eigenvalues(model, _loss_fn, batch, tol=tol, max_iter=cap, init=vec)
                vec, hvps = res.eigenvectors, hvps + res.num_hvps
                rule.update(float(res.eigenvalues[0]), step, hvps=res.num_hvps)
                clamped += int(rule.clamped)
            for group in opt.param_groups:
                group["lr"] = rule.lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    seconds = time.perf_counter() - start
    if sf:
        opt.eval()
        if _has_batchnorm(model):
            _recompute_bn(model, train_batches)
    train_loss, _ = evaluate(model, data["train"])
    val_loss, val_acc = evaluate(model, data["val"])
    if diverged or not math.isfinite(train_loss):
        diverged, train_loss = True, float("nan")
        val_loss = float("inf")
    elif train_loss > THRESHOLDS["diverge_factor"] * initial_loss:
        diverged = True
    extra = {}
    if rule is not None:
        extra = {
            "lr": rule.lr,
            "hvps": hvps,
            "triggers": rule.triggers.get("loss", 0),
            "estimates": rule.num_estimates,
            "clamped": clamped,
        }
    return Fit(train_loss, val_loss, val_acc, diverged, seconds, extra)


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------
ROWS = (
    "SGD best", "cyclic", "Prodigy", "D-Adapt SGD", "SF-SGD", "QN newton", "QN newton+trig", "QN newton+trig /40",
    "QN edge 1.8",
)


def run_task(
    data: dict, model_name: str, loss: str, steps: int, batch_size: int, seeds: int, grid: tuple, progress: Callable
) -> tuple[float, dict[str, list[Fit]]]:
    """The tuned LR and every row's fits (one per seed) of one task."""

    def new_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(model_name, data["num_classes"], loss)

    seq = {s: batches(data["train"], batch_size, steps, s) for s in range(seeds)}
    initial = {s: evaluate(new_model(s), data["train"])[0] for s in range(seeds)}
    grid_fits = {lr: fit("SGD", new_model(0), data, seq[0], lr, initial[0]) for lr in grid}
    # The best LR among the fits that did not diverge (lowest validation loss); if every LR diverged, the smallest.
    stable = [lr for lr in grid if not grid_fits[lr].diverged]
    best_lr = min(stable, key=lambda lr: (grid_fits[lr].val_loss, lr)) if stable else min(grid)
    progress(f"  SGD grid " + ", ".join(f"{lr:g}: val {f.val_loss:.4g}{' (diverged)' if f.diverged else ''}" for lr, f in grid_fits.items()) + f" -> {best_lr:g}")
    results: dict[str, list[Fit]] = {}
    for row in ROWS:
        fits = []
        for s in range(seeds):
            if row == "SGD best" and s == 0:
                fits.append(grid_fits[best_lr])
                continue
            fits.append(fit(row, new_model(s), data, seq[s], best_lr, initial[s]))
        results[row] = fits
    return best_lr, results


def _fmt(x: float, digits: int = 3) -> str:
    if x != x:
        return "nan"
    return f"{x:.{digits}g}"


def task_rows(task: str, best_lr: float, results: dict[str, list[Fit]]) -> list[str]:
    base = results["SGD best"]
    lines = []
    for row, fits in results.items():
        finite = [f.train_loss for f in fits if f.train_loss == f.train_loss]
        mean = _mean_loss(fits)
        spread = statistics.pstdev(finite) if len(finite) > 1 else 0.0
        acc = statistics.fmean(f.val_acc for f in fits)
        div = sum(f.diverged for f in fits)
        ratio = statistics.median(f.seconds / b.seconds for f, b in zip(fits, base))
        name = f"SGD best (lr {best_lr:g})" if row == "SGD best" else row
        if row in ("SF-SGD",):
            name += f" (lr {best_lr:g})"
        if fits[0].extra:
            extra = {k: statistics.fmean(f.extra[k] for f in fits) for k in ("lr", "hvps", "estimates", "clamped", "triggers")}
            name += (
                f" (last lr {_fmt(extra['lr'])}, {extra['hvps']:.0f} HVPs, {extra['estimates']:.0f} estimates, "
                f"{extra['triggers']:.0f} loss-triggered, {extra['clamped']:.0f} clamped)"
            )
        lines.append(
            f"| {task} | {name} | {_fmt(mean)} ± {_fmt(spread, 2)} | {acc:.3f} | {div}/{len(fits)} | {ratio:.2f} |"
        )
    return lines


def _mean_loss(fits: list[Fit]) -> float:
    finite = [f.train_loss for f in fits if f.train_loss == f.train_loss]
    return statistics.fmean(finite) if finite else float("nan")


def _beats(a: list[Fit], b: list[Fit]) -> bool:
    """``a`` beats ``b``: fewer divergences, or as many and a lower mean final training loss."""
    da, db = sum(f.diverged for f in a), sum(f.diverged for f in b)
    if da != db:
        return da < db
    la, lb = _mean_loss(a), _mean_loss(b)
    return la == la and (lb != lb or la < lb)


LR_FREE = ("Prodigy", "D-Adapt SGD", "SF-SGD")


def summary_lines(tasks: list[tuple[str, float, dict[str, list[Fit]]]]) -> list[str]:
    """The compact loss table (one row a task, one column an optimiser) and the issue's targets, each computed
    from the fits: the README quotes these lines."""
    rows = [r for r in ROWS if all(r in res for _, _, res in tasks)]
    lines = ["## Final training loss per task (mean over seeds; divergences marked)", "",
             "| task | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for task, best_lr, res in tasks:
        cells = []
        for r in rows:
            fits = res[r]
            div = sum(f.diverged for f in fits)
            cell = _fmt(_mean_loss(fits)) + (f" (lr {best_lr:g})" if r == "SGD best" else "")
            cells.append(cell + (f" **{div}/{len(fits)} div.**" if div else ""))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets, computed", "",
              "| QN row | no divergence, loss ≤ 1.5× SGD best | beats Prodigy | beats D-Adapt SGD | beats SF-SGD "
              "| time / SGD best, median (range) | same, linear tasks left out |", "|---|---|---|---|---|---|---|"]
    n = len(tasks)
    for r in (r for r in rows if r.startswith("QN")):
        ok = [t for t, _, res in tasks if not any(f.diverged for f in res[r])
              and _mean_loss(res[r]) <= 1.5 * _mean_loss(res["SGD best"])]
        beats = [sum(_beats(res[r], res[o]) for _, _, res in tasks) for o in LR_FREE]

        def ratios(keep: Callable[[str], bool]) -> str:
            v = [statistics.median(f.seconds / b.seconds for f, b in zip(res[r], res["SGD best"]))
                 for t, _, res in tasks if keep(t)]
            return f"{statistics.median(v):.2f}× ({min(v):.2f}–{max(v):.2f})" if v else "—"

        lines.append(f"| {r} | {len(ok)}/{n} | " + " | ".join(f"{b}/{n}" for b in beats)
                     + f" | {ratios(lambda t: True)} | {ratios(lambda t: ' linear ' not in t)} |")
    lines += ["", "\"beats\": fewer divergences, or as many and a lower mean final training loss. Targets: "
              "no divergence and ≤ 1.5× on every task; beating each LR-free optimiser on at least half; "
              "≤ 1.3× the time of a constant-LR fit (the linear tasks' fits take milliseconds, where the ratio "
              "measures fixed per-estimate costs more than HVPs)."]
    return lines


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: linear, synthetic, CE, 10 steps, 1 seed")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimiser steps per fit (default {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULT_BATCH_SIZE}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3)")
    parser.add_argument("--models", default=None, help="comma list of linear,mlp,lenet1,tinyresnet")
    parser.add_argument("--losses", default=None, help="comma list of ce,mse")
    parser.add_argument("--data", default=None, help="comma list of synthetic,digits")
    parser.add_argument("--train-size", type=int, default=None, help=f"default {DEFAULT_TRAIN_SIZE}")
    parser.add_argument("--val-size", type=int, default=None, help=f"default {DEFAULT_VAL_SIZE}")
    parser.add_argument("--out", default=None, help=f"write the markdown here (default run: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick
    steps = args.steps or (10 if quick else DEFAULT_STEPS)
    seeds = args.seeds or (1 if quick else 3)
    train_size = args.train_size or (512 if quick else DEFAULT_TRAIN_SIZE)
    val_size = args.val_size or (256 if quick else DEFAULT_VAL_SIZE)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    models = (args.models or ("linear" if quick else "linear,mlp,lenet1,tinyresnet")).split(",")
    losses = (args.losses or ("ce" if quick else "ce,mse")).split(",")
    data_sets = (args.data or ("synthetic" if quick else "synthetic,digits")).split(",")
    grid = QUICK_GRID if quick else SGD_GRID
    out = args.out if args.out is not None else (None if quick else DEFAULT_OUT)
    warnings.filterwarnings("ignore", category=UserWarning)

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    wall = time.perf_counter()
    lines = [
        "| task | optimiser | final train loss | val acc | diverged | time / SGD best |",
        "|---|---|---|---|---|---|",
    ]
    notes, finished = [], []
    done = 0

    def body() -> list[str]:
        return [*summary_lines(finished), "", "## Every row", "", *lines]

    loaded = {}
    for data_name in data_sets:
        data = load_data(data_name, train_size, val_size)
        if data is None:
            notes.append(f"{data_name}: skipped (lyapunov_callbacks.datamodules.digits.DigitsDataModule not available).")
        else:
            loaded[data_name] = data
    total = len(loaded) * len(models) * len(losses)
    # Model by model (the cheapest first), each on every data set: an interrupted run has whole models.
    for model_name in models:
        for data_name, data in loaded.items():
            for loss in losses:
                task = f"{data_name} {model_name} {loss}"
                progress(task)
                best_lr, results = run_task(data, model_name, loss, steps, batch_size, seeds, grid, progress)
                lines += task_rows(task, best_lr, results)
                finished.append((task, best_lr, results))
                done += 1
                if out and done < total:  # a partial table survives an interrupted run
                    partial = f"Partial: {done} of {total} tasks done.\n\n" + "\n".join(body()) + "\n"
                    C.write_results(out, "lr_free.py", argv, "Learning-rate-free benchmark", partial)
    seconds = time.perf_counter() - wall
    header = (
        f"{steps} steps at batch {batch_size}, {train_size} training / {val_size} validation images, "
        f"{seeds} seed(s), SGD grid {list(grid)}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs. Wall time of the whole run: {seconds / 60:.1f} min."
    )
    text = "\n".join([header, "", *body(), *([""] + notes if notes else [])]) + "\n"
    print(text)
    if out:
        C.write_results(out, "lr_free.py", argv, "Learning-rate-free benchmark", text)
    return text


if __name__ == "__main__":
    main()
