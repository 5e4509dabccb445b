"""Train every figure's configs at a reduced scale in one process, then draw the paper's figures from their logs.

The plan lives in ``figures/figures.yaml``: which runs make which figure, and the reduced scale (batch, steps,
epoch length, monitor frequencies) per architecture. Each run is one ``lyapunov-cli fit --config configs/<run>.yaml``
command line with the scale's overrides appended, executed in-process by :func:`lyapunov_callbacks.cli.main`
(sequentially: ``import torch, lightning`` is paid once, and every config's ``seed_everything`` reseeds), logging
to ``<logs>/<run>/<data>``. The figures are drawn by :func:`lyapunov_callbacks.plotting.plot_figure` into
``<out>/<figure>.png``, and a table of numbers read from the logs goes to ``<logs>/summary_<data>.md``.

Usage::

    python figures/make_figures.py --list                      # print the planned runs and figures, train nothing
    python figures/make_figures.py --data synthetic            # what `make figures DATA=synthetic` runs
    python figures/make_figures.py --data cifar --data-dir data
    python figures/make_figures.py --only fig2 fig3            # those figures' runs, then those figures
    python figures/make_figures.py --plot-only                 # redraw from the existing logs
    python figures/make_figures.py --only fig4 --runs constant/lenet1_mse_lr0.3   # retrain one run, redraw fig4
    python figures/make_figures.py --include-optional          # also figure 10 (ResNet-18, tiny scale)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = Path(__file__).resolve().parent / "figures.yaml"
CONFIG_DIR = ROOT / "configs"
DATA_CHOICES = ("synthetic", "cifar")
SCALE_KEYS = ("batch_size", "max_steps", "epoch_batches", "val_batches", "log_every", "hessian_every",
              "lyapunov_window", "lyapunov_every")
#: Optional scale key: QuasiNewtonLR.every_n_steps, for runs too short for their config's re-estimate period.
QN_EVERY = "quasi_newton_every"
RUN_KEYS = {"config", "hessian_k", QN_EVERY, *SCALE_KEYS}
FIGURE_KEYS = {"title", "rows", "cols", "runs", "kind", "k", "first_epoch_steps", "optional"}
#: Short class names of the curvature callbacks as they appear in the configs' ``class_path``.
QUASI_NEWTON = "QuasiNewtonLR"
HESSIAN = "HessianEigenvalueMonitor"
LYAPUNOV = "LyapunovExponentMonitor"
#: The final loss of a run is the mean of this many last logged points (one batch is noisy).
TAIL_POINTS = 5


@dataclass
class Run:
    """One training run: the config it starts from and the reduced-scale settings it is trained at."""

    name: str
    config: str
    scale: dict[str, Any]
    hessian_k: int = 1
    figures: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / f"{self.config}.yaml"

    @property
    def arch(self) -> str:
        return arch_of(self.config)


def arch_of(config: str) -> str:
    """The architecture of a config name: ``constant/mlp_ce_lr0.1`` -> ``mlp``; ``resnet18_comparison/*`` -> resnet18."""
    group, _, base = config.partition("/")
    if group == "resnet18_comparison":
        return "resnet18"
    return base.split("_", 1)[0]


# ------------------------------------------------------------------------------------------------ the plan


def load_spec(path: str | Path = SPEC_PATH) -> dict[str, Any]:
    """Read and validate ``figures.yaml``.

    Raises:
        ValueError: an unknown key, a figure whose ``runs`` is not ``rows x cols``, a run without a scale, or a
            run whose config file does not exist under ``configs/``.
    """
    with open(path) as fh:
        spec = yaml.safe_load(fh)
    for key in ("scales", "figures"):
        if not isinstance(spec.get(key), dict) or not spec[key]:
            raise ValueError(f"{path}: needs a non-empty mapping {key!r}.")
    spec.setdefault("runs", {})
    for arch, scale in spec["scales"].items():
        missing = [k for k in SCALE_KEYS if k not in scale]
        unknown = sorted(set(scale) - set(SCALE_KEYS) - {QN_EVERY})
        if missing or unknown:
            raise ValueError(f"{path}: scales.{arch} lacks {missing} / has unknown keys {unknown}; "
                             f"the keys are {list(SCALE_KEYS)} and optionally {QN_EVERY!r}.")
    for name, run in spec["runs"].items():
        unknown = sorted(set(run) - RUN_KEYS)
        if unknown or "config" not in run:
            raise ValueError(f"{path}: runs.{name} must have 'config' and only keys {sorted(RUN_KEYS)}; got {sorted(run)}.")
    for fig, fspec in spec["figures"].items():
        unknown = sorted(set(fspec) - FIGURE_KEYS)
        if unknown:
            raise ValueError(f"{path}: figures.{fig} has unknown key(s) {unknown}; allowed: {sorted(FIGURE_KEYS)}.")
        rows, cols, runs = fspec.get("rows"), fspec.get("cols"), fspec.get("runs")
        if not rows or not cols or not runs or len(runs) != len(rows) or any(len(r) != len(cols) for r in runs):
            raise ValueError(f"{path}: figures.{fig}.runs must be len(rows) x len(cols) = {len(rows or [])} x "
                             f"{len(cols or [])}.")
    for run in plan_runs(spec, list(spec["figures"])):
        if not run.config_path.is_file():
            raise ValueError(f"{path}: run {run.name!r} needs {run.config_path.relative_to(ROOT)}, which does not exist.")
    return spec


def selected_figures(spec: dict[str, Any], only: Sequence[str] | None, include_optional: bool) -> list[str]:
    """The figures to make: ``only`` (in spec order), else every figure not marked ``optional`` (unless included)."""
    names = list(spec["figures"])
    if only:
        unknown = [f for f in only if f not in spec["figures"]]
        if unknown:
            raise ValueError(f"--only {' '.join(unknown)}: no such figure; the figures are {', '.join(names)}.")
        return [f for f in names if f in only]
    return [f for f in names if include_optional or not spec["figures"][f].get("optional", False)]


def plan_runs(spec: dict[str, Any], figures: Sequence[str]) -> list[Run]:
    """The distinct runs the figures need, in first-use order, each with its scale."""
    runs: dict[str, Run] = {}
    for fig in figures:
        for row in spec["figures"][fig]["runs"]:
            for name in row:
                if name is None:
                    continue
                if name not in runs:
                    extra = dict(spec["runs"].get(name, {}))
                    config = extra.pop("config", name)
                    arch = arch_of(config)
                    if arch not in spec["scales"]:
                        raise ValueError(f"run {name!r}: no scale for architecture {arch!r} in figures.yaml scales.")
                    k = int(extra.pop("hessian_k", 1))
                    runs[name] = Run(name, config, {**spec["scales"][arch], **extra}, hessian_k=k)
                runs[name].figures.append(fig)
    return list(runs.values())


# ------------------------------------------------------------------------------------------------ command lines


def _load_yaml(path: Path) -> Any:
    with open(path) as fh:
        return yaml.safe_load(fh)


def config_value(path: Path, key: str) -> tuple[Any, Path] | None:
    """The value of ``trainer.callbacks``-style ``key`` in a run file, following its ``config:`` includes.

    Looks for the dotted key itself, then the nested form (``trainer: {callbacks: ...}``, or ``trainer`` given as a
    file), then the included file. Returns ``(value, the file that set it)`` or ``None``.
    """
    cfg = _load_yaml(path) or {}
    if key in cfg:
        return cfg[key], path
    head, _, rest = key.partition(".")
    if rest and head in cfg:
        group = cfg[head]
        if isinstance(group, str):  # the group given as a file path
            group_path = (path.parent / group).resolve()
            group = _load_yaml(group_path) or {}
            if isinstance(group, dict) and rest in group:
                return group[rest], group_path
        elif isinstance(group, dict) and rest in group:
            return group[rest], path
    if isinstance(cfg.get("config"), str):
        return config_value((path.parent / cfg["config"]).resolve(), key)
    return None


def config_callbacks(path: Path) -> list[dict[str, Any]]:
    """``trainer.callbacks`` of a run file (a list, or the path of a yaml file holding the list)."""
    found = config_value(path, "trainer.callbacks")
    if found is None:
        return []
    value, where = found
    if isinstance(value, str):
        value = _load_yaml((where.parent / value).resolve())
    return [cb if isinstance(cb, dict) else {"class_path": cb} for cb in (value or [])]


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def reduced_callbacks(run: Run) -> list[dict[str, Any]]:
    """The config's callbacks with the monitors set to the reduced scale, and the missing monitors added.

    QuasiNewtonLR keeps its config's settings (it logs 1/h0 and α itself) except ``every_n_steps`` where the scale
    sets ``quasi_newton_every``; a HessianEigenvalueMonitor (for 1/h0
    and α·h0) is added to runs without QuasiNewtonLR, and a LyapunovExponentMonitor (λ) to every run whose
    ``lyapunov_window`` is not null (null removes it).
    """
    scale = run.scale
    callbacks = [json.loads(json.dumps(cb)) for cb in config_callbacks(run.config_path)]  # deep copy
    names = [_short(cb["class_path"]) for cb in callbacks]
    if QUASI_NEWTON not in names and HESSIAN not in names:
        callbacks.append({"class_path": f"lyapunov_callbacks.{HESSIAN}", "init_args": {}})
    if scale["lyapunov_window"] is None:  # a run that does not need λ (the spectrum runs) skips its cost
        callbacks = [cb for cb in callbacks if _short(cb["class_path"]) != LYAPUNOV]
    elif LYAPUNOV not in names:
        callbacks.append({"class_path": f"lyapunov_callbacks.{LYAPUNOV}", "init_args": {}})
    for cb in callbacks:
        args = cb.setdefault("init_args", {})
        if _short(cb["class_path"]) == QUASI_NEWTON and scale.get(QN_EVERY) is not None:
            args.update(every_n_steps=scale[QN_EVERY])
        elif _short(cb["class_path"]) == HESSIAN:
            args.update(every_n_steps=scale["hessian_every"], k=run.hessian_k)
        elif _short(cb["class_path"]) == LYAPUNOV:
            args.update(window=scale["lyapunov_window"], every_n_steps=scale["lyapunov_every"])
    return callbacks


def fit_args(run: Run, data: str, data_dir: str, logs: Path) -> list[str]:
    """The ``lyapunov-cli`` command line (without the program name) that trains ``run`` at its reduced scale."""
    s = run.scale
    args = [
        "fit", "--config", os.path.relpath(run.config_path),
        f"--trainer.max_steps={s['max_steps']}",
        f"--trainer.max_epochs={math.ceil(s['max_steps'] / s['epoch_batches']) + 1}",
        f"--trainer.limit_train_batches={s['epoch_batches']}",
        f"--trainer.limit_val_batches={s['val_batches']}",
        f"--trainer.log_every_n_steps={s['log_every']}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={os.path.relpath(logs)}",
        f"--trainer.logger.init_args.name={run.name}",
        f"--trainer.logger.init_args.version={data}",
        f"--data.init_args.batch_size={s['batch_size']}",
        f"--trainer.callbacks={json.dumps(reduced_callbacks(run))}",
    ]
    if data == "synthetic":
        args.append("--data.init_args.synthetic=true")
    else:
        args.append(f"--data.init_args.data_dir={data_dir}")
    if _uses_cyclic(run.config_path):
        args.append(f"--lr_scheduler.init_args.step_size_up={s['epoch_batches']}")
    return args


def _uses_cyclic(path: Path) -> bool:
    """Whether the run file's ``lr_scheduler`` is a ``CyclicLR`` (its step_size_up must shrink with the epoch)."""
    found = config_value(path, "lr_scheduler")
    if found is None:
        return False
    value, where = found
    if isinstance(value, str):
        value = _load_yaml((where.parent / value).resolve())
    return isinstance(value, dict) and str(value.get("class_path", "")).endswith("CyclicLR")


def run_dir(run: Run, data: str, logs: Path) -> Path:
    return logs / run.name / data


# ------------------------------------------------------------------------------------------------ numbers


def run_numbers(path: Path) -> dict[str, float]:
    """Numbers of one run read from its logs: first/final loss, val accuracy, median α·h0, λ statistics."""
    import numpy as np

    from lyapunov_callbacks._tb_reader import read_scalars

    s = read_scalars(path)
    out: dict[str, float] = {}
    nan = float("nan")
    loss = s.get("train/loss")
    if loss is not None and loss.values.size:
        out["loss_first"] = float(loss.values[0])
        out["loss_final"] = float(np.mean(loss.values[-TAIL_POINTS:]))
        out["loss_min"] = float(np.nanmin(loss.values)) if np.isfinite(loss.values).any() else nan
        # epochs whose mean logged training loss rose above the previous epoch's (0: monotone decrease by epoch)
        epoch = s.get("epoch")
        if epoch is not None and epoch.values.size:
            ep = np.interp(loss.steps, epoch.steps, epoch.values).round()
            means = [loss.values[ep == e].mean() for e in np.unique(ep)]
            # the first epoch is compared with the first logged loss; a non-finite mean after a finite one
            # (divergence) counts as an increase, and nothing is counted after it
            chain = [loss.values[0], *means]
            out["epoch_loss_increases"] = float(sum(not b <= a for a, b in zip(chain, chain[1:]) if np.isfinite(a)))
            out["epochs"] = float(len(means))
    acc = s.get("val/acc")
    out["val_acc_final"] = float(acc.values[-1]) if acc is not None and acc.values.size else nan
    if "hessian/stability" in s:
        stab = s["hessian/stability"].values
    elif "hessian/h0" in s and "quasi_newton/lr" in s:
        h0, lr = s["hessian/h0"], s["quasi_newton/lr"]
        common = np.intersect1d(h0.steps, lr.steps)
        stab = h0.values[np.isin(h0.steps, common)] * lr.values[np.isin(lr.steps, common)]
    else:
        stab = np.empty(0)
    stab = stab[np.isfinite(stab)]
    out["median_alpha_h0"] = float(np.median(stab)) if stab.size else nan
    lam = s.get("lyapunov/lambda")
    lam_v = lam.values[np.isfinite(lam.values)] if lam is not None else np.empty(0)
    out["lambda_mean"] = float(lam_v.mean()) if lam_v.size else nan
    out["lambda_pos_frac"] = float((lam_v > 0).mean()) if lam_v.size else nan
    return out


def write_summary(runs: Sequence[Run], data: str, logs: Path, timings: dict[str, float]) -> Path:
    """A markdown table of :func:`run_numbers` for every run that has logs; returns its path."""
    cols = ["loss_first", "loss_final", "loss_min", "epoch_loss_increases", "epochs", "val_acc_final",
            "median_alpha_h0", "lambda_mean", "lambda_pos_frac"]
    lines = [f"# Numbers read from the logs (data: {data})", "",
             "| run | " + " | ".join(cols) + " | time (s) |", "|---" * (len(cols) + 2) + "|"]
    for run in runs:
        path = run_dir(run, data, logs)
        if not path.is_dir():
            continue
        try:
            nums = run_numbers(path)
        except (FileNotFoundError, ValueError) as err:
            lines.append(f"| {run.name} | unreadable: {err} |")
            continue
        cells = [f"{nums.get(c, float('nan')):.4g}" for c in cols]
        t = timings.get(run.name)
        lines.append(f"| {run.name} | " + " | ".join(cells) + f" | {'' if t is None else f'{t:.1f}'} |")
    out = logs / f"summary_{data}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


# ------------------------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_figures.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=DATA_CHOICES, default="synthetic",
                   help="synthetic: the offline CIFAR-shaped stand-in; cifar: the CIFAR-10 files in --data-dir")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py (with --data cifar)")
    p.add_argument("--only", nargs="+", metavar="FIG", help="make only these figures (e.g. fig1 fig3)")
    p.add_argument("--include-optional", action="store_true", help="also the optional figures (ResNet-18)")
    p.add_argument("--list", action="store_true", help="print the planned runs and figures; train nothing")
    p.add_argument("--plot-only", action="store_true", help="draw the figures from existing logs; train nothing")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="train only these of the planned runs (then draw)")
    p.add_argument("--out", default=os.path.relpath(ROOT / "figures"), help="folder of the figure files (default figures/)")
    p.add_argument("--logs", default=os.path.relpath(ROOT / "figures" / "logs"), help="folder of the runs' logs")
    p.add_argument("--dpi", type=float, default=90.0)
    p.add_argument("--spec", default=os.path.relpath(SPEC_PATH), help="the plan (default figures/figures.yaml)")
    return p


def _print_plan(spec: dict[str, Any], figures: list[str], runs: list[Run], args: argparse.Namespace) -> None:
    logs = Path(args.logs)
    print(f"{len(runs)} runs, data={args.data}, logs under {logs}:")
    for i, run in enumerate(runs, 1):
        s = run.scale
        print(f"[{i:2d}] {run.name}  (figures {', '.join(run.figures)}; batch {s['batch_size']}, "
              f"{s['max_steps']} steps, {s['epoch_batches']} batches/epoch)")
        print("     lyapunov-cli " + " ".join(_quote(a) for a in fit_args(run, args.data, args.data_dir, logs)))
    print(f"{len(figures)} figures:")
    for fig in figures:
        fspec = spec["figures"][fig]
        print(f"  {Path(args.out) / (fig + '.png')}: {fspec.get('title', '')} "
              f"({len(fspec['rows'])} x {len(fspec['cols'])}, {fspec.get('kind', 'run')})")


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " \"{}[]") else arg


def _prepare_cifar(data_dir: str) -> None:
    """Check (or download, where the network allows) CIFAR-10 once, rather than failing in every run."""
    from datamodules import CIFAR10DataModule

    CIFAR10DataModule(data_dir=data_dir, download=True).prepare_data()


def _train(runs: list[Run], args: argparse.Namespace) -> tuple[dict[str, float], list[str]]:
    import logging

    import torch

    from lyapunov_callbacks.cli import main as cli_main

    # Lightning's per-run INFO lines (seed, accelerator, tips) would bury the timing lines.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    logs = Path(args.logs)
    timings: dict[str, float] = {}
    failed: list[str] = []
    total = time.perf_counter()
    for i, run in enumerate(runs, 1):
        target = run_dir(run, args.data, logs)
        if target.exists():  # a rerun replaces the old logs rather than merging event files
            shutil.rmtree(target)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # per-run Lightning chatter (e.g. few batches per epoch)
                cli_main(fit_args(run, args.data, args.data_dir, logs))
        except (Exception, SystemExit) as err:  # one broken run must not lose the others' 30 minutes
            failed.append(run.name)
            print(f"[{i:2d}/{len(runs)}] {run.name}: FAILED ({type(err).__name__}: {err})", flush=True)
            continue
        finally:
            torch.set_grad_enabled(True)
        timings[run.name] = time.perf_counter() - start
        final = ""
        try:
            final = f", final train loss {run_numbers(target)['loss_final']:.4g}"
        except (FileNotFoundError, ValueError, KeyError):
            pass
        print(f"[{i:2d}/{len(runs)}] {run.name}: {timings[run.name]:.1f} s{final}", flush=True)
    print(f"trained {len(runs) - len(failed)}/{len(runs)} runs in {time.perf_counter() - total:.1f} s", flush=True)
    return timings, failed


def _plot(spec: dict[str, Any], figures: list[str], args: argparse.Namespace) -> list[str]:
    from lyapunov_callbacks.plotting import MissingTagsWarning, plot_figure

    logs, out = Path(args.logs), Path(args.out)
    failed = []
    for fig in figures:
        fspec = {k: v for k, v in spec["figures"][fig].items() if k != "optional"}
        cells = [[None if name is None else logs / name / args.data for name in row] for row in fspec["runs"]]
        absent = [str(c) for row in cells for c in row if c is not None and not c.is_dir()]
        for path in absent:
            print(f"{fig}: no logs at {path}; leaving its cell empty", file=sys.stderr)
        fspec["runs"] = [[c if c is not None and c.is_dir() else None for c in row] for row in cells]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", MissingTagsWarning)
                result = plot_figure(fspec, out / f"{fig}.png", dpi=args.dpi)
            for w in caught:
                if issubclass(w.category, MissingTagsWarning):
                    print(f"{fig}: warning: {w.message}", file=sys.stderr)
        except (FileNotFoundError, ValueError) as err:
            failed.append(fig)
            print(f"{fig}: FAILED ({err})", file=sys.stderr)
            continue
        print(f"{fig}: {', '.join(str(p) for p in result.paths)}", flush=True)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the plan; returns 0 when every run trained and every figure was drawn, else 1 (2: bad arguments)."""
    args = _parser().parse_args(argv)
    try:
        spec = load_spec(args.spec)
        figures = selected_figures(spec, args.only, args.include_optional)
        runs = plan_runs(spec, figures)
    except ValueError as err:
        print(f"make_figures.py: error: {err}", file=sys.stderr)
        return 2
    if args.list:
        _print_plan(spec, figures, runs, args)
        return 0
    timings: dict[str, float] = {}
    failed_runs: list[str] = []
    if not args.plot_only:
        if args.data == "cifar":
            try:
                _prepare_cifar(args.data_dir)
            except (OSError, RuntimeError) as err:
                print(f"make_figures.py: error: {err}\n(or run with --data synthetic, i.e. make figures "
                      "DATA=synthetic)", file=sys.stderr)
                return 2
        if args.runs:
            unknown = sorted(set(args.runs) - {r.name for r in runs})
            if unknown:
                print(f"make_figures.py: error: --runs {' '.join(unknown)}: not in the plan (see --list)", file=sys.stderr)
                return 2
        timings, failed_runs = _train([r for r in runs if not args.runs or r.name in args.runs], args)
    summary = write_summary(runs, args.data, Path(args.logs), timings)
    print(f"numbers: {summary}")
    failed_figs = _plot(spec, figures, args)
    if failed_runs or failed_figs:
        print(f"failed runs: {failed_runs or 'none'}; failed figures: {failed_figs or 'none'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
