"""``QuasiNewtonLR``'s re-estimates every 10 steps against ``every_n_steps="auto"`` on the ``lr_free`` tasks.

The tasks, data, models, batches, seeds and plain PyTorch loop are ``benchmarks/lr_free.py``'s (its ``fit``), and
both rows are its ``QN newton+trig`` rule (``QuasiNewtonRule`` with ``QuasiNewtonLR``'s defaults: warm-up at the
initial weights, α = 1/h0, the loss trigger, the 2× growth limit): re-estimated every 10 steps, or on the adaptive
cadence (``drift_tol=0.05``, intervals of 10 to 200 steps from the rate of change of h0). Per task: the mean final
training loss over the seeds (on the whole training subset) of each row and their ratio (target: ``auto`` within
2 % of every 10 steps), the estimates and HVPs of each, and the loop's time of ``auto`` over every 10 steps (median
over the seeds; target below 1). Seeds give both rows the same initial weights and batches.

Run: ``python benchmarks/qn_cadence.py [--quick] [--threads 1] [--steps N] [--seeds N] [--models ...]
[--losses ...] [--data ...] [--out FILE]`` (default: lr_free's 16 tasks at its 100 steps, 3 seeds; writes
``benchmarks/results/qn_cadence.md``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Optional

import _common as C
import torch

import lr_free as L

ROWS = ("QN newton+trig", "QN newton+trig auto")
TARGET_LOSS = 1.02
DEFAULT_OUT = C.results_path("qn_cadence.md")


def compare(data: dict, model_name: str, loss: str, steps: int, batch_size: int, seeds: int) -> dict[str, list]:
    """``{row: [Fit per seed]}`` of the two rows on one task."""
    out: dict[str, list] = {row: [] for row in ROWS}
    for seed in range(seeds):
        seq = L.batches(data["train"], batch_size, steps, seed)

        def new_model():
            torch.manual_seed(seed)
            return L.build_model(model_name, data["num_classes"], loss)

        initial = L.evaluate(new_model(), data["train"])[0]
        for row in ROWS:
            out[row].append(L.fit(row, new_model(), data, seq, None, initial))
    return out


def task_line(task: str, fits: dict[str, list]) -> tuple[str, float, float]:
    """The table line of one task, the loss ratio and the time ratio (auto over every 10)."""
    every, auto = fits[ROWS[0]], fits[ROWS[1]]
    loss_every, loss_auto = L._mean_loss(every), L._mean_loss(auto)
    ratio = loss_auto / loss_every if loss_every == loss_every and loss_every > 0 else float("nan")
    time_ratio = statistics.median(a.seconds / e.seconds for a, e in zip(auto, every))
    div = [sum(f.diverged for f in fits[r]) for r in ROWS]

    def mean(fs, key):
        return statistics.fmean(f.extra[key] for f in fs)

    line = (f"| {task} | {L._fmt(loss_every)} | {L._fmt(loss_auto)} | {ratio:.3f} | {mean(every, 'estimates'):.1f} / "
            f"{mean(auto, 'estimates'):.1f} | {mean(every, 'hvps'):.0f} / {mean(auto, 'hvps'):.0f} | {time_ratio:.2f} "
            f"| {div[0]} / {div[1]} |")
    return line, ratio, time_ratio


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: mlp, digits, CE, 30 steps, 1 seed")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimiser steps per fit (default {L.DEFAULT_STEPS})")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per task (default 3)")
    parser.add_argument("--models", default=None, help="comma list of linear,mlp,lenet1,tinyresnet")
    parser.add_argument("--losses", default=None, help="comma list of ce,mse")
    parser.add_argument("--data", default=None, help="comma list of synthetic,digits")
    parser.add_argument("--out", default=None, help=f"write the markdown here (default run: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick
    steps = args.steps or (30 if quick else L.DEFAULT_STEPS)
    seeds = args.seeds or (1 if quick else 3)
    models = (args.models or ("mlp" if quick else "linear,mlp,lenet1,tinyresnet")).split(",")
    losses = (args.losses or ("ce" if quick else "ce,mse")).split(",")
    data_sets = (args.data or ("digits" if quick else "synthetic,digits")).split(",")
    train_size, val_size = (512, 256) if quick else (L.DEFAULT_TRAIN_SIZE, L.DEFAULT_VAL_SIZE)
    out = args.out if args.out is not None else (None if quick else DEFAULT_OUT)
    warnings.filterwarnings("ignore", category=UserWarning)
    wall, load_before = time.perf_counter(), C.uptime()
    lines = ["| task | final loss, every 10 | final loss, auto | auto / every 10 | estimates (every 10 / auto) "
             "| HVPs (every 10 / auto) | loop time auto / every 10 | diverged (every 10 / auto) |",
             "|---|---|---|---|---|---|---|---|"]
    ratios, times = [], []
    for model_name in models:
        for data_name in data_sets:
            data = L.load_data(data_name, train_size, val_size)
            if data is None:
                continue
            for loss in losses:
                task = f"{data_name} {model_name} {loss}"
                print(f"[{time.strftime('%H:%M:%S')}] {task}", file=sys.stderr, flush=True)
                line, ratio, time_ratio = task_line(task, compare(data, model_name, loss, steps,
                                                                  L.DEFAULT_BATCH_SIZE, seeds))
                lines.append(line)
                ratios.append(ratio)
                times.append(time_ratio)
    within = sum(r <= TARGET_LOSS for r in ratios if r == r)
    cheaper = sum(t < 1.0 for t in times)
    header = (f"{steps} steps at batch {L.DEFAULT_BATCH_SIZE}, {train_size} training images, {seeds} seed(s); torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads. Wall time {(time.perf_counter() - wall) / 60:.1f} "
              f"min. Load before: `{load_before}`; after: `{C.uptime()}`.")
    summary = (f"`auto` within {TARGET_LOSS - 1:.0%} of every 10 steps' final loss on {within} of {len(ratios)} tasks "
               f"(ratio median {statistics.median(ratios):.3f}, worst {max(ratios):.3f}); its loop is faster on "
               f"{cheaper} of {len(times)} (time ratio median {statistics.median(times):.2f}, range "
               f"{min(times):.2f}–{max(times):.2f}).")
    text = "\n".join([header, "", *lines, "", summary]) + "\n"
    print(text)
    if out:
        C.write_results(out, "qn_cadence.py", argv, "QuasiNewtonLR: every 10 steps against the adaptive cadence", text)
    return text


if __name__ == "__main__":
    main()
