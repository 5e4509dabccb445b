"""The GPT run file trained to the end: its loss, h0, pre_stability and λ over training, and how long it took.

Runs ``lyapunov-cli fit --config configs/gpt/adamw_monitors.yaml`` in this process (the byte-level GPT on the
standard library's text, AdamW lr 1e-3, HessianEigenvalueMonitor every 10 steps with pre_h0 and batch sharpness,
LyapunovExponentMonitor windows of 10 every 50; 400 steps, validation once per epoch), logging to a temporary
directory, then reads the TensorBoard scalars back and prints, every 50 steps: the training loss, hessian/h0,
hessian/pre_h0, hessian/pre_stability (AdamW's edge of stability is at 2) and the λ of the window that ended
there, plus the last validation loss in bits per byte, the fit's wall-clock and CPU time and the machine's load.
Torch runs on one thread unless ``--threads N``. Writes ``benchmarks/results/gpt_training.md`` for a full run.

Run: ``python benchmarks/gpt_training.py [--quick] [--threads N] [--steps N]``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path

import _common as C
import torch

RUN_FILE = Path(__file__).resolve().parents[1] / "configs" / "gpt" / "adamw_monitors.yaml"
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
        print("\npre_h0 and pre_stability start at step 10: at step 0 AdamW has no second-moment estimate yet.")
        val = scalars.get("val/bpb")
        if val is not None and len(val.values):
            print(f"\nValidation: {float(val.values[-1]):.3g} bits per byte at step {int(val.steps[-1])} "
                  "(8 for a uniform guess).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
