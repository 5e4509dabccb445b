"""The GPT run file trained to the end: its loss, h0, pre_stability and λ over training, and how long it took.

Runs ``lyapunov-cli fit --config configs/gpt/adamw_monitors.yaml`` in this process (the byte-level GPT on the
standard library's text, AdamW lr 1e-3, HessianEigenvalueMonitor every 10 steps with pre_h0 and batch sharpness,
LyapunovExponentMonitor windows of 10 every 50; 400 steps, validation once per epoch), logging to a temporary
directory, then reads the TensorBoard scalars back and prints, every 50 steps: the training loss, hessian/h0,
hessian/pre_h0, hessian/pre_stability (AdamW's edge of stability is at 2) and the λ of the window that ended
there, plus the last validation loss in bits per byte, the fit's wall-clock and CPU time and the machine's load.
Torch runs on one thread unless ``--threads N``. Writes ``benchmarks/results/gpt_training.md`` and the figure
``docs/figures/gpt/adamw_monitors.png`` (training loss, ``pre_stability`` against its edge at 2, and λ of every
window, over the steps) for a full run (``--figure`` elsewhere).

Run: ``python benchmarks/gpt_training.py [--quick] [--threads N] [--steps N] [--figure PATH]``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path

import _common as C
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN_FILE = ROOT / "configs" / "gpt" / "adamw_monitors.yaml"
FIGURE = ROOT / "docs" / "figures" / "gpt" / "adamw_monitors.png"
#: Every how many steps a row is printed: the λ window ends at 50k + 9, the h0 estimates are at multiples of 10.
ROW_EVERY = 50
TAGS = ("train/loss", "hessian/h0", "hessian/pre_h0", "hessian/pre_stability")


def _value_at(series, step: int, exact: bool = True) -> float:
    """The value logged at ``step`` (``exact``) or the last one logged at or before it; ``nan`` if none."""
    if series is None:
        return float("nan")
    steps, values = list(series.steps), list(series.values)
    if exact:
        return float(values[steps.index(step)]) if step in steps else float("nan")
    before = [v for s, v in zip(steps, values) if s <= step]
    return float(before[-1]) if before else float("nan")


def main(argv=None) -> int:
    def extra(parser):
        C.add_out_argument(parser, "gpt_training.md")
        parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the run file's, 400)")
        parser.add_argument("--figure", default=None,
                            help=f"where to draw the figure (default: {FIGURE.relative_to(ROOT)} for a full run, "
                                 "none for --quick)")

    args = C.parse_args(__doc__.splitlines()[0], argv, extra)
    if args.threads is None:
        torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from lyapunov_callbacks.analysis.tb_reader import find_runs, read_scalars
    from lyapunov_callbacks.cli import run_cli

    steps = args.steps or (60 if args.quick else None)
    with tempfile.TemporaryDirectory() as tmp, C.recorded(
        C.out_path(args, "gpt_training.md"), "gpt_training.py", argv, "GPT run file trained to the end"
    ):
        C.header("configs/gpt/adamw_monitors.yaml: GPT on the standard library's text, AdamW + monitors", args)
        overrides = ["--trainer.logger.init_args.save_dir", tmp, "--trainer.default_root_dir", tmp,
                     "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
                     "--seed_everything", str(args.seed)]
        if steps is not None:
            overrides += ["--trainer.max_steps", str(steps)]
        wall, cpu = time.perf_counter(), time.process_time()
        cli = run_cli(["fit", "--config", str(RUN_FILE), *overrides])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        total = cli.trainer.global_step
        (run,) = find_runs(tmp)
        scalars = read_scalars(run)
        params = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
        print(f"GPT of {params:,} trainable parameters.")
        print(f"{total} steps in {wall:.0f} s wall-clock, {cpu:.0f} s CPU ({cpu / total * 1e3:.0f} ms CPU per step, "
              "validation and the monitors included).\n")
        rows = []
        for step in range(0, total, ROW_EVERY):
            end = step + 9  # the λ window that starts at `step` ends (and is logged) 9 steps later
            rows.append([step, _value_at(scalars.get("train/loss"), end, exact=False),
                         *(_value_at(scalars.get(tag), step) for tag in TAGS[1:]),
                         _value_at(scalars.get("lyapunov/lambda"), end)])
        print(C.table(["step", "train loss (last logged by step + 9)", "h0", "pre_h0", "pre_stability",
                       "λ (window step .. step + 9)"], rows))
        first_pre = rows[0][4] if rows else float("nan")
        if first_pre == first_pre:
            print("\nAt step 0, before AdamW's first step, P is |g| + ε, what that step divides by (the step is "
                  "lr·g/(|g| + ε), about lr·sign(g)); from step 10 on P is √v̂ + ε.")
        else:
            print("\npre_h0 and pre_stability start at step 10: at step 0 AdamW has no second-moment estimate yet.")
        figure = args.figure or (None if args.quick else FIGURE)
        if figure is not None:
            draw(scalars, Path(figure))
            print(f"\nFigure: {Path(figure).resolve().relative_to(ROOT) if Path(figure).resolve().is_relative_to(ROOT) else figure}")
        val = scalars.get("val/bpb")
        if val is not None and len(val.values):
            print(f"\nValidation: {float(val.values[-1]):.3g} bits per byte at step {int(val.steps[-1])} "
                  "(8 for a uniform guess).")
    return 0


def draw(scalars, path: Path) -> None:
    """Three panels over the steps: the training loss, ``pre_stability`` with AdamW's edge at 2, and λ per window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), constrained_layout=True)
    panels = [("train/loss", "training loss", "linear"), ("hessian/pre_stability", "pre_stability (log scale)", "log"),
              ("lyapunov/lambda", "λ (window of 10 steps; symlog)", "symlog")]
    for ax, (tag, label, scale) in zip(axes, panels):
        series = scalars.get(tag)
        if series is not None:
            ax.plot(list(series.steps), list(series.values), marker="." if tag != "train/loss" else None, lw=1)
        ax.set_yscale(scale, **({"linthresh": 1e-3} if scale == "symlog" else {}))
        ax.set_title(label)
        ax.set_xlabel("step")
    axes[1].axhline(2.0, color="tab:red", ls="--", lw=1, label="edge of stability (2)")
    axes[1].legend(loc="center right", fontsize=8)
    axes[2].axhline(0.0, color="grey", lw=0.8)
    fig.suptitle("Byte-level GPT (220,544 parameters) on the standard library's text, AdamW lr 1e-3 "
                 "(configs/gpt/adamw_monitors.yaml)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
