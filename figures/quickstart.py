"""The run behind the README's "What you should see": ``make train DATA=synthetic``, timed, summarised, drawn.

Runs the README's offline command as a user types it (``make train DATA=synthetic``; its logs go to a temporary
folder instead of ``logs/``), then writes

- ``docs/results/quickstart_synthetic.md``: the command, the machine and its load, wall and CPU time, the lines
  the run printed about its data and its summary, and the statistics of the curves read from its TensorBoard
  logs (h0, α, λ, the loss, the validation accuracy, the quasi-Newton counters);
- ``docs/figures/quickstart/curves.png``: ``lyapunov-cli plot`` of the run, at a small size.

Every number the README quotes about this run comes from the results file, and ``tests/test_docs.py`` checks it.

Usage (from the repository root, after ``make install``)::

    .venv/bin/python figures/quickstart.py          # the full run: 10 epochs of the main job on the stand-in
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "quickstart_synthetic.md"
FIGURE = ROOT / "docs" / "figures" / "quickstart" / "curves.png"
RUN_SUBDIR = Path("quasi_newton") / "mlp_ce" / "synthetic" / "version_0"
#: Lines of the run's output quoted in the results file: the data banner and the CLI's fit summary.
QUOTED = re.compile(r"^(==> make train|final validation accuracy|last h0|quasi_newton:)")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def curve_stats(run_dir: Path) -> list[tuple[str, str]]:
    """(quantity, value) rows of the run's curves, read from its TensorBoard event files."""
    from lyapunov_callbacks.analysis.tb_reader import read_scalars

    s = read_scalars(run_dir)

    def first(tag: str) -> float:
        return float(s[tag].values[0])

    def last(tag: str) -> float:
        return float(s[tag].values[-1])

    (ckpt,) = (run_dir / "checkpoints").glob("*.ckpt")
    steps = int(re.search(r"step=(\d+)", ckpt.name).group(1))
    h0, lr, lam = s["quasi_newton/h0"].values, s["quasi_newton/lr"].values, s["lyapunov/lambda"].values
    rows = [
        ("optimiser steps (the checkpoint's step count)", f"{steps}"),
        ("h0 estimates logged (the warm-up's counted once)", f"{h0.size}"),
        ("h0 at the first estimate", f"{h0[0]:.3g}"),
        ("h0 at the last estimate", f"{h0[-1]:.3g}"),
        ("h0 largest", f"{np.nanmax(h0):.3g}"),
        ("α = 1/h0 at the first estimate", f"{lr[0]:.3g}"),
        ("α at the last estimate", f"{lr[-1]:.3g}"),
        ("α smallest / largest", f"{lr.min():.3g} / {lr.max():.3g}"),
        ("largest relative gap between α and 1/h0", f"{np.nanmax(np.abs(lr * h0 - 1.0)):.1e}"),
        ("λ windows logged", f"{lam.size}"),
        ("largest absolute λ", f"{np.abs(lam).max():.1e}"),
        ("train/loss, first logged step", f"{first('train/loss'):.3g}"),
        ("train/loss, last logged step", f"{last('train/loss'):.3g}"),
        ("val/acc, last epoch", f"{last('val/acc'):.3f}"),
        ("clamped / triggered / rejected estimates at the end",
         f"{last('quasi_newton/clamped_estimates'):.0f} / {last('quasi_newton/triggered_estimates'):.0f} / "
         f"{last('quasi_newton/rejected_estimates'):.0f}"),
    ]
    return rows


def write_results(path: Path, command: str, epochs: int, wall: float, cpu: float, loads: tuple[str, str],
                  quoted: list[str], rows: list[tuple[str, str]]) -> None:
    import torch

    text = [
        "# `make train DATA=synthetic`: the README's quick-start run",
        "",
        f"Produced by `python figures/quickstart.py`, which runs `{command}` (the logs in a temporary folder) and "
        f"reads its TensorBoard logs; the figure is `lyapunov-cli plot` of the same run "
        f"([docs/figures/quickstart/curves.png](../figures/quickstart/curves.png)).",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads. Load average (1, 5, 15 min) before: {loads[0]}; "
        f"after: {loads[1]}.",
        "",
        "| measured | value |",
        "|---|---|",
        f"| epochs | {epochs} |",
        f"| wall time of the command (install already done) | {wall:.0f} s |",
        f"| CPU time of the command (user + system, all threads) | {cpu:.0f} s |",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        "What the run printed about its data and, at the end, its summary:",
        "",
        "```text",
        *quoted,
        "```",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="results file to write")
    p.add_argument("--figure", default=str(FIGURE), help="figure to write")
    p.add_argument("--args", default="", help="extra lyapunov-cli arguments (ARGS of make train), for a short run")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="quickstart_") as tmp:
        extra = f"--trainer.logger.init_args.save_dir {tmp} --trainer.enable_progress_bar false {args.args}".strip()
        cmd = ["make", "train", "DATA=synthetic", f"ARGS={extra}"]
        load_before = _load()
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = _load()
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-5000:])
            print(f"quickstart.py: `{shlex.join(cmd)}` failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
        run_dir = Path(tmp) / RUN_SUBDIR
        epochs = int(yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_epochs"])
        quoted = [line.replace(tmp, "<logs>") for line in proc.stdout.splitlines() if QUOTED.match(line)]
        rows = curve_stats(run_dir)
        from lyapunov_callbacks.analysis.plotting import main as plot_main

        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        status = plot_main([str(run_dir), "--out", args.figure, "--dpi", "80"])
        if status:
            return int(status)
    shown = "make train DATA=synthetic" + (f' ARGS="{args.args}"' if args.args else "")
    write_results(Path(args.results), shown, epochs, wall, cpu, (load_before, load_after), quoted, rows)
    print(f"results: {os.path.relpath(args.results)}\nfigure: {os.path.relpath(args.figure)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
