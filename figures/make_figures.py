"""Train every run of the paper's figures, draw the figures, and compute the summary every quoted number comes from.

The plan lives in ``figures/figures.yaml``: which runs make which figure (numbered and paneled as the paper's
captions), the scale per architecture (``full``: what ``make figures`` runs; ``quick``: ``make figures QUICK=1``),
and the seeds. Each run is one ``lyapunov-cli fit --config configs/<run>.yaml`` command line with the scale's
overrides appended, executed in-process by :func:`lyapunov_callbacks.cli.main` (sequentially: ``import torch,
lightning`` is paid once), logging to ``<logs>/<run>/<data>/seed<k>``. Then:

- the figures are drawn by :func:`lyapunov_callbacks.analysis.plotting.plot_figure` into ``<out>/<figure>.png``;
- :mod:`lyapunov_callbacks.analysis.summary` reads every run's logs and writes ``summary_<data>.{md,json,csv}`` (per-run
  statistics, seed aggregates, a verdict per claim and architecture/loss);
- three analysis figures are drawn from the summary (1/h0 against α, the distribution of λ per run, the
  quasi-Newton loss beside the constant-LR runs);
- the results page is regenerated from the summaries.

Full mode writes to ``docs/figures/<data>/``, ``docs/results/`` and ``docs/results.md`` (committed); quick mode to
``figures/quick/`` (ignored by git), so a development run never overwrites the committed results.

Usage::

    python figures/make_figures.py --list                        # the planned runs and command lines
    python figures/make_figures.py --data synthetic              # make figures DATA=synthetic
    python figures/make_figures.py --data synthetic --quick      # make figures DATA=synthetic QUICK=1
    python figures/make_figures.py --data digits --only fig2     # that figure's runs, then that figure
    python figures/make_figures.py --plot-only                   # redraw and re-summarise from existing logs
    python figures/make_figures.py --page-only                   # rewrite docs/results.md from the summaries
    python figures/make_figures.py --runs constant/mlp_ce_lr0.3 --only fig6   # retrain one run, redraw
"""

from __future__ import annotations

import argparse
import inspect
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
if str(ROOT) not in sys.path:  # the runs import models/, datamodules/ and figures.epoch_loss by class path
    sys.path.insert(0, str(ROOT))
SPEC_PATH = Path(__file__).resolve().parent / "figures.yaml"
#: The paper's figure captions, beside the repository (``../shared/paper/`` from its root).
CAPTIONS_PATH = ROOT.parent / "shared" / "paper" / "figure-captions.txt"
CONFIG_DIR = ROOT / "configs"
DATA_CHOICES = ("synthetic", "digits", "cifar")
MODES = ("full", "quick")
SCALE_KEYS = ("batch_size", "max_steps", "epoch_batches", "val_batches", "log_every", "hessian_every",
              "probe_every", "probe_size", "lyapunov_window", "lyapunov_every", "seeds", "cyclic_half",
              "full_loss_batches")
#: The constants of the time prediction (``cost:`` in figures.yaml), see :func:`predict_seconds`.
COST_KEYS = ("hvps_per_estimate", "hvps_per_probe_estimate", "hvps_top_k", "run_overhead_s", "epoch_overhead_s")
#: Optional scale key: QuasiNewtonLR.every_n_steps, for runs too short for their config's re-estimate period.
QN_EVERY = "quasi_newton_every"
#: ``data_init``: per data set, ``--data`` init overrides of one run (a full-batch control on a smaller set).
#: ``sizes``: per data set, [training, validation] images of such a run (what ``--plan`` counts).
RUN_KEYS = {"config", "hessian_k", "max_epochs", "quick", "data_init", "sizes", QN_EVERY, *SCALE_KEYS}
FIGURE_KEYS = {"title", "caption", "rows", "cols", "runs", "kind", "k", "first_epoch_steps", "optional"}
#: Short class names of the curvature callbacks as they appear in the configs' ``class_path``.
QUASI_NEWTON = "QuasiNewtonLR"
HESSIAN = "HessianEigenvalueMonitor"
LYAPUNOV = "LyapunovExponentMonitor"
FULL_LOSS = "figures.epoch_loss.FullTrainLoss"
#: Prefix of the probe-batch h0 monitor's tags (hessian_probe/h0, ...).
PROBE_PREFIX = "hessian_probe"
#: Ten-class runs: the ResNet-18 runs (every other run is the two-class problem).
TEN_CLASS_ARCHS = {"resnet18"}


def probe_supported() -> bool:
    """Whether this checkout's HessianEigenvalueMonitor takes ``prefix`` (needed to run a probe monitor beside the
    mini-batch one without their tags colliding)."""
    from lyapunov_callbacks import HessianEigenvalueMonitor

    return "prefix" in inspect.signature(HessianEigenvalueMonitor.__init__).parameters


@dataclass
class Run:
    """One training run: the config it starts from, the scale it is trained at, and the figures showing it."""

    name: str
    config: str
    scale: dict[str, Any]
    hessian_k: int = 1
    max_epochs: int | None = None
    figures: list[str] = field(default_factory=list)
    data_init: dict[str, dict[str, Any]] = field(default_factory=dict)
    sizes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return CONFIG_DIR / f"{self.config}.yaml"

    @property
    def arch(self) -> str:
        return arch_of(self.config)

    @property
    def seeds(self) -> list[int]:
        return list(range(int(self.scale["seeds"])))


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
        ValueError: an unknown key, a figure whose ``runs`` is not ``rows x cols``, a scale lacking a key, a run
            without a scale, or a run whose config file does not exist under ``configs/``.
    """
    with open(path) as fh:
        spec = yaml.safe_load(fh)
    for key in ("scales", "figures", "datasets"):
        if not isinstance(spec.get(key), dict) or not spec[key]:
            raise ValueError(f"{path}: needs a non-empty mapping {key!r}.")
    spec.setdefault("runs", {})
    if sorted(spec["scales"]) != sorted(MODES):
        raise ValueError(f"{path}: scales must have exactly the modes {list(MODES)}; got {sorted(spec['scales'])}.")
    for mode, scales in spec["scales"].items():
        for arch, scale in scales.items():
            missing = [k for k in SCALE_KEYS if k not in scale]
            unknown = sorted(set(scale) - set(SCALE_KEYS) - {QN_EVERY})
            if missing or unknown:
                raise ValueError(f"{path}: scales.{mode}.{arch} lacks {missing} / has unknown keys {unknown}; "
                                 f"the keys are {list(SCALE_KEYS)} and optionally {QN_EVERY!r}.")
            if scale["seeds"] < 1:
                raise ValueError(f"{path}: scales.{mode}.{arch}.seeds must be >= 1.")
    missing_data = sorted(set(DATA_CHOICES) - set(spec["datasets"]))
    if missing_data:
        raise ValueError(f"{path}: datasets lacks {missing_data}.")
    for data, ds in spec["datasets"].items():
        sizes = ds.get("sizes") or {}
        if any(not isinstance(sizes.get(w), list) or len(sizes[w]) != 2 for w in ("two_class", "ten_class")):
            raise ValueError(f"{path}: datasets.{data}.sizes must give [training, validation] images for "
                             f"two_class and ten_class, e.g. {{two_class: [10000, 2000], ten_class: [50000, 10000]}}.")
    missing_cost = sorted(set(COST_KEYS) - set(spec.get("cost") or {}))
    if missing_cost:
        raise ValueError(f"{path}: cost lacks {missing_cost} (the constants of the time prediction).")
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
    for mode in MODES:
        for run in plan_runs(spec, list(spec["figures"]), mode):  # optional figures lacking run files are left out
            if not run.config_path.is_file():
                raise ValueError(f"{path}: run {run.name!r} needs {run.config_path.relative_to(ROOT)}, which does not exist.")
            aliased = cycle_aliasing(run)
            if aliased:
                raise ValueError(f"{path}: scales.{mode} / runs.{run.name}: {'; '.join(aliased)}. A period that "
                                 "shares a factor with the cycle samples the LR at a few phases only (every "
                                 "probe at the trough, say); choose a period coprime to the cycle, e.g. "
                                 f"{_coprime_near(run.scale['probe_every'] or 20, 2 * run.scale['cyclic_half'])}.")
    return spec


#: The monitors whose estimates are read at the LR of their step (a cyclic LR must not alias them).
CYCLE_CHECKED = {"hessian_every": "mini-batch h0", "probe_every": "probe h0", "lyapunov_every": "λ"}


def cycle_aliasing(run: Run) -> list[str]:
    """For a run on a cyclic LR (period ``2 * cyclic_half`` steps: CyclicLR's step_size_up, the same down), each
    monitor whose period shares a factor with the cycle: such a monitor measures at ``cycle / gcd`` phases of the
    cycle only (a probe every 100 steps on a 200-step cycle lands at two phases, the trough and the peak), so its
    late median is the value at those phases, not over the cycle. A period coprime to the cycle visits every
    phase, in steps of ``period mod cycle``. Runs without a cyclic LR: ``[]``."""
    if not _uses_cyclic(run.config_path):
        return []
    cycle = 2 * int(run.scale["cyclic_half"])
    out = []
    for key, what in CYCLE_CHECKED.items():
        period = run.scale.get(key)
        if key == "lyapunov_every" and not run.scale.get("lyapunov_window"):
            continue
        if period and math.gcd(int(period), cycle) != 1:
            out.append(f"{what} every {period} steps on a cycle of {cycle} steps (gcd {math.gcd(int(period), cycle)}: "
                       f"{cycle // math.gcd(int(period), cycle)} phase(s))")
    return out


def _coprime_near(period: int, cycle: int) -> int:
    """The smallest period >= ``period`` that is coprime to ``cycle`` (what the error message suggests)."""
    p = max(1, int(period))
    while math.gcd(p, cycle) != 1:
        p += 1
    return p


def selected_figures(spec: dict[str, Any], only: Sequence[str] | None) -> list[str]:
    """The figures to make: ``only`` (in spec order), else every figure."""
    names = list(spec["figures"])
    if only:
        unknown = [f for f in only if f not in spec["figures"]]
        if unknown:
            raise ValueError(f"--only {' '.join(unknown)}: no such figure; the figures are {', '.join(names)}.")
        return [f for f in names if f in only]
    return names


def _config_of(spec: dict[str, Any], name: str) -> Path:
    return CONFIG_DIR / f"{(spec['runs'].get(name) or {}).get('config', name)}.yaml"


def skipped_figures(spec: dict[str, Any], figures: Sequence[str]) -> dict[str, str]:
    """The ``optional`` figures among ``figures`` whose run files are not all in this checkout, each with the
    note saying why it is skipped (they are left out of the plan rather than failing it)."""
    notes = {}
    for fig in figures:
        fspec = spec["figures"][fig]
        if not fspec.get("optional"):
            continue
        missing = [_config_of(spec, n) for row in fspec["runs"] for n in row if n is not None]
        missing = [p for p in missing if not p.is_file()]
        if missing:
            notes[fig] = (f"{fig}: skipped: {fspec['optional']} are not in this checkout (missing: "
                          f"{', '.join(os.path.relpath(p, ROOT) for p in missing)}); it is drawn once they exist.")
    return notes


def plan_runs(spec: dict[str, Any], figures: Sequence[str], mode: str = "full") -> list[Run]:
    """The distinct runs the figures need, in first-use order, each with its scale in ``mode``; the figures of
    :func:`skipped_figures` contribute none."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}.")
    scales = spec["scales"][mode]
    runs: dict[str, Run] = {}
    skipped = skipped_figures(spec, figures)
    for fig in figures:
        if fig in skipped:
            continue
        for row in spec["figures"][fig]["runs"]:
            for name in row:
                if name is None:
                    continue
                if name not in runs:
                    extra = dict(spec["runs"].get(name, {}))
                    quick = extra.pop("quick", None) or {}
                    if mode == "quick":  # the run's overrides of the quick scale
                        extra.update(quick)
                    config = extra.pop("config", name)
                    arch = arch_of(config)
                    if arch not in scales:
                        raise ValueError(f"run {name!r}: no scale for architecture {arch!r} in scales.{mode}.")
                    k = int(extra.pop("hessian_k", 1))
                    max_epochs = extra.pop("max_epochs", None)
                    data_init = extra.pop("data_init", None) or {}
                    sizes = extra.pop("sizes", None) or {}
                    runs[name] = Run(name, config, {**scales[arch], **extra}, hessian_k=k, max_epochs=max_epochs,
                                     data_init=data_init, sizes=sizes)
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


def figure_callbacks(run: Run, with_probe: bool = True) -> list[dict[str, Any]]:
    """The config's callbacks at the run's scale, with the monitors the figures need added.

    - QuasiNewtonLR keeps its config's settings (it logs 1/h0 and α itself) except ``every_n_steps`` where the
      scale sets ``quasi_newton_every``.
    - A mini-batch HessianEigenvalueMonitor (1/h0, α·h0; ``k = hessian_k``) is on every run without
      QuasiNewtonLR, every ``hessian_every`` steps.
    - A probe HessianEigenvalueMonitor (``batch="fixed"``, ``probe_size``, prefix ``hessian_probe``) every
      ``probe_every`` steps on every run, quasi-Newton included, when ``probe_every`` is set and ``with_probe``.
    - A LyapunovExponentMonitor (λ) unless ``lyapunov_window`` is null (which removes it).
    - FullTrainLoss (the per-epoch full-training-set loss) on every run.
    """
    scale = run.scale
    callbacks = [json.loads(json.dumps(cb)) for cb in config_callbacks(run.config_path)]  # deep copy
    names = [_short(cb["class_path"]) for cb in callbacks]
    if QUASI_NEWTON not in names and HESSIAN not in names:
        callbacks.append({"class_path": f"lyapunov_callbacks.{HESSIAN}", "init_args": {}})
    if scale["lyapunov_window"] is None:
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
    if with_probe and scale["probe_every"] is not None:
        callbacks.append({"class_path": f"lyapunov_callbacks.{HESSIAN}",
                          "init_args": {"every_n_steps": scale["probe_every"], "batch": "fixed",
                                        "probe_size": scale["probe_size"], "prefix": PROBE_PREFIX}})
    callbacks.append({"class_path": FULL_LOSS, "init_args": {"max_batches": scale["full_loss_batches"]}})
    return callbacks


def run_dir(run: Run, data: str, logs: Path, seed: int | None = None) -> Path:
    """``<logs>/<run>/<data>`` (the cell of a figure: every seed below it), or one seed's ``.../seed<k>``."""
    base = logs / run.name / data
    return base if seed is None else base / f"seed{seed}"


def data_args(run: Run, data: str, data_dir: str, datasets: dict[str, Any]) -> list[str]:
    """The ``--data`` overrides selecting the data set (two-class or ten-class by architecture)."""
    ds = datasets[data]
    which = "ten_class" if run.arch in TEN_CLASS_ARCHS else "two_class"
    init = {**(ds.get(which) or {}), **(run.data_init.get(data) or {})}
    if data == "cifar":
        init["data_dir"] = data_dir
    if ds.get("class_path"):
        init.setdefault("batch_size", run.scale["batch_size"])
        return [f"--data={json.dumps({'class_path': ds['class_path'], 'init_args': init})}"]
    return [f"--data.init_args.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in init.items()]


def fit_args(run: Run, data: str, data_dir: str, logs: Path, seed: int = 0, *,
             datasets: dict[str, Any] | None = None, with_probe: bool = True) -> list[str]:
    """The ``lyapunov-cli`` command line (without the program name) that trains one seed of ``run``."""
    s = run.scale
    datasets = datasets if datasets is not None else load_spec()["datasets"]
    max_epochs = run.max_epochs if run.max_epochs is not None else 100_000  # max_steps stops the run
    args = [
        "fit", "--config", os.path.relpath(run.config_path),
        f"--seed_everything={seed}",
        f"--trainer.max_steps={-1 if run.max_epochs is not None else s['max_steps']}",
        f"--trainer.max_epochs={max_epochs}",
        f"--trainer.limit_train_batches={s['epoch_batches'] if s['epoch_batches'] is not None else 1.0}",
        f"--trainer.limit_val_batches={s['val_batches'] if s['val_batches'] is not None else 1.0}",
        f"--trainer.log_every_n_steps={s['log_every']}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={os.path.relpath(logs)}",
        f"--trainer.logger.init_args.name={run.name}/{data}",
        f"--trainer.logger.init_args.version=seed{seed}",
        *data_args(run, data, data_dir, datasets),
        f"--data.init_args.batch_size={s['batch_size']}",
        f"--trainer.callbacks={json.dumps(figure_callbacks(run, with_probe))}",
    ]
    if _uses_cyclic(run.config_path):
        args.append(f"--lr_scheduler.init_args.step_size_up={s['cyclic_half']}")
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


# ------------------------------------------------------------------------------------------------ cost


RATES_PATH = Path(__file__).resolve().parent / "rates.json"
#: What figures/rates.py measures per architecture (CPU seconds, one thread).
RATE_KEYS = ("batch", "probe", "step_cpu_s", "fwd_sample_cpu_s", "hvp_batch_cpu_s", "hvp_probe_cpu_s")


def load_rates(path: str | Path = RATES_PATH) -> dict[str, dict[str, float]]:
    """The measured per-architecture costs of ``figures/rates.py`` (``{}`` when not measured yet)."""
    path = Path(path)
    return json.loads(path.read_text()).get("archs", {}) if path.is_file() else {}


def _qn_every(run: Run) -> int | None:
    """QuasiNewtonLR.every_n_steps of a run (the scale's override, else its config's), None without QuasiNewtonLR."""
    for cb in config_callbacks(run.config_path):
        if _short(cb["class_path"]) == QUASI_NEWTON:
            return int(run.scale.get(QN_EVERY) or (cb.get("init_args") or {}).get("every_n_steps", 10))
    return None


def probe_hvp_seconds(r: dict[str, float], n: int) -> float:
    """CPU seconds of one HVP on ``n`` samples from the two measured sizes (``batch`` and ``probe``): affine in
    ``n`` between and beyond them (a fixed cost per product plus a cost per sample), proportional below the
    batch. A probe of the batch's size then costs what a mini-batch HVP costs, not the 1,024-sample rate scaled
    down (which for TinyResNet is 2.4x the measured mini-batch HVP at 128)."""
    b, p, hb, hp = r["batch"], r["probe"], r["hvp_batch_cpu_s"], r["hvp_probe_cpu_s"]
    if n <= b:
        return hb * n / b
    return hb + (hp - hb) * (n - b) / (p - b)


def predict_seconds(run: Run, data: str, rates: dict[str, dict[str, float]], spec: dict[str, Any] | None = None,
                    with_probe: bool = True) -> dict[str, float]:
    """Predicted single-threaded CPU seconds of one seed of ``run`` on ``data``, by part, from measured rates.

    The parts: training steps (``step_cpu_s``, scaled by batch / measured batch); mini-batch h0 estimates (every
    ``hessian_every`` steps, or QuasiNewtonLR's period, ``cost.hvps_per_estimate`` HVPs each; ``cost.hvps_top_k``
    for a top-14 spectrum); probe h0 estimates (``cost.hvps_per_probe_estimate`` HVPs on the probe batch);
    Lyapunov windows (one HVP per step of a window); the per-epoch full-training-set loss and validation (forward
    passes); ``cost.run_overhead_s`` per run and ``cost.epoch_overhead_s`` per epoch. Returns ``{}`` for an
    architecture without measured rates, else the parts and their sum ``cpu_s``.
    """
    spec = spec or load_spec()
    r = rates.get(run.arch)
    if not r or any(k not in r for k in RATE_KEYS):
        return {}
    cost, s = spec["cost"], run.scale
    sizes = run.sizes.get(data) or spec["datasets"][data]["sizes"]["ten_class" if run.arch in TEN_CLASS_ARCHS
                                                                   else "two_class"]
    n_train, n_val = int(sizes[0]), int(sizes[1])
    per_epoch = s["epoch_batches"] or math.ceil(n_train / s["batch_size"])
    steps = per_epoch * run.max_epochs if run.max_epochs else s["max_steps"]
    epochs = math.ceil(steps / per_epoch)
    b = s["batch_size"] / r["batch"]
    hvp, fwd = r["hvp_batch_cpu_s"] * b, r["fwd_sample_cpu_s"]
    qn = _qn_every(run)
    est_every = qn if qn is not None else s["hessian_every"]
    hvps = cost["hvps_top_k"] if run.hessian_k > 1 else cost["hvps_per_estimate"]
    out = {"steps": steps, "epochs": epochs,
           "train": steps * r["step_cpu_s"] * b,
           "hessian": math.ceil(steps / est_every) * hvps * hvp}
    out["probe"] = (math.ceil(steps / s["probe_every"]) * cost["hvps_per_probe_estimate"]
                    * probe_hvp_seconds(r, min(s["probe_size"], n_train)) if with_probe and s["probe_every"] else 0.0)
    if not s["lyapunov_window"]:
        out["lyapunov"] = 0.0
    elif s["lyapunov_every"] is None:  # back-to-back windows: one HVP every step
        out["lyapunov"] = steps * hvp
    else:
        out["lyapunov"] = math.ceil(steps / s["lyapunov_every"]) * s["lyapunov_window"] * hvp
    full = n_train if s["full_loss_batches"] is None else min(n_train, 512 * s["full_loss_batches"])
    val = n_val if s["val_batches"] is None else min(n_val, s["val_batches"] * s["batch_size"])
    out["full_loss"] = (epochs + 1) * full * fwd
    out["validation"] = epochs * val * fwd
    out["overhead"] = cost["run_overhead_s"] + epochs * cost["epoch_overhead_s"]
    out["cpu_s"] = sum(v for k, v in out.items() if k not in ("steps", "epochs"))
    return out


def predict_plan(runs: Sequence[Run], data: str, rates: dict[str, dict[str, float]], spec: dict[str, Any],
                 jobs: int) -> dict[str, Any]:
    """Predicted CPU seconds per run (all seeds) and wall seconds of the plan with ``jobs`` single-threaded
    workers: the longest-first greedy packing of the seeded runs on ``jobs`` workers (no slow-down from sharing
    memory bandwidth is assumed). Runs of architectures without measured rates are listed in ``unmeasured``."""
    per_run, unmeasured, tasks = {}, [], []
    for run in runs:
        p = predict_seconds(run, data, rates, spec)
        if not p:
            unmeasured.append(run.name)
            continue
        per_run[run.name] = {**p, "seeds": len(run.seeds), "cpu_all_seeds": p["cpu_s"] * len(run.seeds)}
        tasks += [p["cpu_s"]] * len(run.seeds)
    workers = [0.0] * max(1, jobs)
    for t in sorted(tasks, reverse=True):
        workers[workers.index(min(workers))] += t
    return {"runs": per_run, "unmeasured": unmeasured, "cpu_s": sum(tasks), "wall_s": max(workers),
            "jobs": max(1, jobs)}


def _print_prediction(runs: Sequence[Run], args: argparse.Namespace, spec: dict[str, Any]) -> None:
    rates = load_rates()
    plan = predict_plan(runs, args.data, rates, spec, args.jobs)
    by_arch: dict[str, list[float]] = {}
    print(f"predicted cost, data={args.data}, mode={'quick' if args.quick else 'full'} "
          f"(rates: {os.path.relpath(RATES_PATH)}, single-threaded CPU seconds):")
    print(f"  {'run':40s} seeds  steps  train  h0-mb  probe    λ  fullL  val  other   CPU s/seed")
    for name, p in plan["runs"].items():
        run = next(r for r in runs if r.name == name)
        by_arch.setdefault(run.arch, [0.0, 0])
        by_arch[run.arch][0] += p["cpu_all_seeds"]
        by_arch[run.arch][1] += p["seeds"]
        print(f"  {name:40s} {p['seeds']:5d} {p['steps']:6d} {p['train']:6.0f} {p['hessian']:6.0f} "
              f"{p['probe']:6.0f} {p['lyapunov']:4.0f} {p['full_loss']:6.0f} {p['validation']:4.0f} "
              f"{p['overhead']:5.0f} {p['cpu_s']:9.0f}")
    for arch, (cpu, n) in by_arch.items():
        r = rates[arch]
        print(f"  {arch}: {n} seeded runs, {cpu:.0f} CPU s (rates measured {r.get('measured')}, load "
              f"{r.get('load_1min')}: step {1e3 * r['step_cpu_s']:.1f} ms, HVP {1e3 * r['hvp_batch_cpu_s']:.1f} ms "
              f"at batch {r['batch']}, {1e3 * r['hvp_probe_cpu_s']:.0f} ms at {r['probe']})")
    if plan["unmeasured"]:
        print(f"  no rates for: {', '.join(plan['unmeasured'])} (run figures/rates.py)")
    print(f"predicted total: {plan['cpu_s'] / 60:.1f} CPU min; wall {plan['wall_s'] / 60:.1f} min with "
          f"--jobs {plan['jobs']} (budget of `make figures`: 120 min)")


# ------------------------------------------------------------------------------------------------ outputs


def default_paths(data: str, quick: bool) -> dict[str, Path]:
    """Where a mode writes: logs, figures, summary and results page (quick mode: all under figures/quick/)."""
    if quick:
        base = ROOT / "figures" / "quick"
        return {"logs": base / "logs", "out": base / data, "summary": base, "page": base / "results.md",
                "figures_root": base}
    return {"logs": ROOT / "figures" / "logs", "out": ROOT / "docs" / "figures" / data,
            "summary": ROOT / "docs" / "results", "page": ROOT / "docs" / "results.md",
            "figures_root": ROOT / "docs" / "figures"}


def figure_title(spec: dict[str, Any], fig: str, runs: list[Run], data: str) -> str:
    """The figure's title with the data set and the step count(s) of its runs."""
    by_name = {r.name: r for r in runs}
    names = [n for row in spec["figures"][fig]["runs"] for n in row if n is not None]
    steps = sorted({("1 epoch" if by_name[n].max_epochs else f"{by_name[n].scale['max_steps']} steps")
                    + f" × batch {by_name[n].scale['batch_size']}" for n in names if n in by_name})
    seeds = sorted({by_name[n].scale["seeds"] for n in names if n in by_name and not by_name[n].max_epochs})
    seed_txt = f", {'/'.join(map(str, seeds))} seed(s)" if seeds else ""
    return f"{spec['figures'][fig]['title']}\ndata: {data}; {'; '.join(steps)}{seed_txt}"


def figure_of(runs: Sequence[Run]) -> dict[str, str]:
    return {r.name: ",".join(r.figures) for r in runs}


# ------------------------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_figures.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=DATA_CHOICES, default="synthetic",
                   help="synthetic: the offline CIFAR-shaped stand-in; digits: scikit-learn's digits; "
                        "cifar: the CIFAR-10 files in --data-dir")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py (with --data cifar)")
    p.add_argument("--quick", action="store_true", help="the quick scale (one seed, short runs; output under figures/quick/)")
    p.add_argument("--only", nargs="+", metavar="FIG", help="make only these figures (e.g. fig1 fig3)")
    p.add_argument("--list", action="store_true", help="print the planned runs and figures; train nothing")
    p.add_argument("--plot-only", action="store_true", help="draw and summarise from existing logs; train nothing")
    p.add_argument("--page-only", action="store_true",
                   help="regenerate the results page from the summaries in --summary-dir (after a change to the "
                        "page's text); train, draw and summarise nothing")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="train only these of the planned runs (then draw)")
    p.add_argument("--out", default=None, help="folder of the figure files (default docs/figures/<data>/)")
    p.add_argument("--logs", default=None, help="folder of the runs' logs (default figures/logs/)")
    p.add_argument("--summary-dir", default=None, help="folder of summary_<data>.* (default docs/results/)")
    p.add_argument("--page", default=None, help="the results page to regenerate (default docs/results.md)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="cap every run at N optimiser steps (a smoke test of the scale's settings; not for results)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="train only the first N seeds of every run")
    p.add_argument("--plan", action="store_true",
                   help="print the predicted CPU and wall time of every run from figures/rates.json; train nothing")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs trained at a time (default: the number of cores), each in its own process")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default 1 with --jobs > 1, torch's default with --jobs 1)")
    p.add_argument("--dpi", type=float, default=80.0)
    p.add_argument("--spec", default=os.path.relpath(SPEC_PATH), help="the plan (default figures/figures.yaml)")
    return p


def _print_plan(spec: dict[str, Any], figures: list[str], runs: list[Run], args: argparse.Namespace) -> None:
    logs = Path(args.logs)
    n = sum(len(r.seeds) for r in runs)
    print(f"{len(runs)} runs ({n} with seeds), data={args.data}, mode={'quick' if args.quick else 'full'}, logs under {logs}:")
    for i, run in enumerate(runs, 1):
        s = run.scale
        length = "1 epoch" if run.max_epochs else f"{s['max_steps']} steps"
        print(f"[{i:2d}] {run.name}  (figures {', '.join(run.figures)}; batch {s['batch_size']}, {length}, "
              f"seeds {run.seeds})")
        print("     lyapunov-cli " + " ".join(_quote(a) for a in fit_args(run, args.data, args.data_dir, logs,
                                                                          datasets=spec["datasets"])))
    print(f"{len(figures)} figures:")
    for fig in figures:
        fspec = spec["figures"][fig]
        print(f"  {Path(args.out) / (fig + '.png')}: {fspec.get('title', '')} "
              f"({len(fspec['rows'])} x {len(fspec['cols'])}, {fspec.get('kind', 'run')})")


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " \"{}[]") else arg


def _prepare_cifar(data_dir: str) -> None:
    """Check (or download, where the network allows) CIFAR-10 once, rather than failing in every run."""
    from lyapunov_callbacks.datamodules import CIFAR10DataModule

    CIFAR10DataModule(data_dir=data_dir, download=True).prepare_data()


def _train(runs: list[Run], spec: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, dict], list[str]]:
    """Train every seed of every run; returns per run ``{seconds, cpu_seconds, seeds, steps_per_s}`` and the
    failed runs.

    ``args.jobs`` runs at a time: 1 trains in this process (``args.threads`` torch threads); more use a pool of
    spawned workers (:mod:`figures._worker`), each with ``args.threads`` threads, fed the most expensive runs
    first (predicted by :func:`predict_seconds`) so that the pool finishes together.
    """
    import torch

    from figures import _worker

    with_probe = probe_supported()
    if not with_probe:
        print("note: HessianEigenvalueMonitor has no `prefix` argument in this checkout: the probe-batch h0 "
              "(hessian_probe/*) is not measured; the figures and the summary show the mini-batch h0 only.",
              file=sys.stderr, flush=True)
    logs = Path(args.logs)
    timings: dict[str, dict] = {}
    failed: list[str] = []
    total = time.perf_counter()
    jobs = [(run, seed) for run in runs for seed in run.seeds]
    if args.jobs > 1:
        rates = load_rates()
        jobs.sort(key=lambda j: -predict_seconds(j[0], args.data, rates, spec).get("cpu_s", 0.0))
    for run, seed in jobs:
        target = run_dir(run, args.data, logs, seed)
        if target.exists():  # a rerun replaces the old logs rather than merging event files
            shutil.rmtree(target)
    commands = [fit_args(run, args.data, args.data_dir, logs, seed, datasets=spec["datasets"],
                         with_probe=with_probe) for run, seed in jobs]

    def record(i: int, run: Run, seed: int, result: tuple[float, float, str | None]) -> None:
        seconds, cpu, error = result
        if error is not None:
            failed.append(f"{run.name}/seed{seed}")
            print(f"[{i:3d}/{len(jobs)}] {run.name} seed {seed}: FAILED ({error})", flush=True)
            return
        t = timings.setdefault(run.name, {"seconds": 0.0, "cpu_seconds": 0.0, "seeds": 0})
        t["seconds"] += seconds
        t["cpu_seconds"] += cpu
        t["seeds"] += 1
        steps = run.scale["max_steps"] if not run.max_epochs else None
        t["steps_per_s"] = round(steps * t["seeds"] / t["seconds"], 2) if steps else None
        print(f"[{i:3d}/{len(jobs)}] {run.name} seed {seed}: {seconds:.1f} s (CPU {cpu:.1f} s)", flush=True)

    if args.jobs <= 1:
        threads = torch.get_num_threads()
        _worker.init(args.threads or threads)
        try:
            for i, ((run, seed), command) in enumerate(zip(jobs, commands), 1):
                record(i, run, seed, _worker.fit(command))
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker.init, initargs=(args.threads or 1,)) as pool:
            futures = {pool.submit(_worker.fit, command): job for job, command in zip(jobs, commands)}
            for i, future in enumerate(as_completed(futures), 1):
                run, seed = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # a worker that died (e.g. out of memory)
                    result = (0.0, 0.0, f"worker died: {type(err).__name__}: {err}")
                record(i, run, seed, result)
    print(f"trained {len(jobs) - len(failed)}/{len(jobs)} runs in {time.perf_counter() - total:.1f} s "
          f"({args.jobs} at a time)", flush=True)
    return timings, failed


def _plot(spec: dict[str, Any], figures: list[str], runs: list[Run], args: argparse.Namespace) -> list[str]:
    from lyapunov_callbacks.analysis.plotting import MissingTagsWarning, plot_figure

    logs, out = Path(args.logs), Path(args.out)
    failed = []
    skipped = skipped_figures(spec, figures)
    for fig in figures:
        if fig in skipped:
            continue
        fspec = {k: v for k, v in spec["figures"][fig].items() if k not in ("caption", "optional")}
        fspec["title"] = figure_title(spec, fig, runs, args.data)
        cells = [[None if name is None else logs / name / args.data for name in row] for row in fspec["runs"]]
        absent = [str(c) for row in cells for c in row if c is not None and not c.is_dir()]
        for path in absent:
            print(f"{fig}: no logs at {path}; leaving its cell empty", file=sys.stderr)
        fspec["runs"] = [[c if c is not None and c.is_dir() else None for c in row] for row in cells]
        if all(c is None for row in fspec["runs"] for c in row):
            failed.append(fig)
            print(f"{fig}: FAILED (no run of it has logs)", file=sys.stderr)
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", MissingTagsWarning)
                result = plot_figure(fspec, out / f"{fig}.png", dpi=args.dpi)
            notes = sorted({str(w.message) for w in caught if issubclass(w.category, MissingTagsWarning)})
            for note in notes:
                print(f"{fig}: warning: {note}", file=sys.stderr)
        except (FileNotFoundError, ValueError) as err:
            failed.append(fig)
            print(f"{fig}: FAILED ({err})", file=sys.stderr)
            continue
        print(f"{fig}: {', '.join(str(p) for p in result.paths)}", flush=True)
    return failed


def _summarise(runs: list[Run], args: argparse.Namespace, timings: dict[str, dict], wall: float | None) -> dict:
    """Write the summary files and the analysis figures; returns the summary paths."""
    from lyapunov_callbacks.analysis import summary
    from lyapunov_callbacks.analysis.plotting import plot_analysis

    logs = Path(args.logs)
    records = summary.collect((r.name, run_dir(r, args.data, logs)) for r in runs)
    meta = {"mode": "quick" if args.quick else "full", "runs": len({r.info.name for r in records}),
            "seeded runs": len(records), "probe h0": "measured" if any(
                r.stats.get("n_h0_probe") for r in records) else "not measured in these logs",
            # which two-class problem the runs trained on (digits: even/odd since 2026-12, 3 vs 5 before)
            "two-class data": json.dumps(load_spec(args.spec)["datasets"][args.data].get("two_class") or {})}
    if wall is not None:
        meta["training wall time (s)"] = round(wall, 1)
        meta["training CPU time (s)"] = round(sum(t["cpu_seconds"] for t in timings.values()), 1)
        meta["runs at a time"] = args.jobs
        meta["load average at the end (1 min)"] = round(os.getloadavg()[0], 2)
    else:  # re-summarised from existing logs (--plot-only): how they were trained stays in the summary
        meta.update(kept_training_meta(Path(args.summary_dir) / f"summary_{args.data}.json", meta))
    if timings:
        meta["steps/s (first seed's arch)"] = json.dumps(_steps_per_arch(runs, timings))
    paths = summary.write_summary(records, args.summary_dir, args.data, figure_of=figure_of(runs), meta=meta)
    payload = json.loads(paths["json"].read_text())
    for path in plot_analysis(payload, Path(args.out), dpi=args.dpi):
        print(f"analysis: {path}")
    return paths


def _steps_per_arch(runs: list[Run], timings: dict[str, dict]) -> dict[str, float]:
    best: dict[str, list[float]] = {}
    for run in runs:
        t = timings.get(run.name)
        if t and t.get("steps_per_s"):
            best.setdefault(run.arch, []).append(t["steps_per_s"])
    return {arch: round(sorted(v)[len(v) // 2], 2) for arch, v in best.items()}


def start_banner(runs: Sequence[Run], args: argparse.Namespace, spec: dict[str, Any]) -> str:
    """The line printed before training: how many runs (and seeded runs) and the time ``--plan`` predicts."""
    plan = predict_plan(runs, args.data, load_rates(), spec, args.jobs)
    seeded = sum(len(r.seeds) for r in runs)
    text = (f"make_figures: training {len(runs)} runs ({seeded} with their seeds) on data={args.data}, "
            f"{'quick' if args.quick else 'full'} scale, {plan['jobs']} at a time: predicted "
            f"{plan['wall_s'] / 60:.0f} min wall ({plan['cpu_s'] / 60:.0f} CPU min of one thread) from the rates in "
            f"{os.path.relpath(RATES_PATH)}, on an idle machine (--plan prints it per run)")
    if plan["unmeasured"]:
        text += f"; no prediction for {len(plan['unmeasured'])} runs without measured rates"
    return text + "."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the plan; returns 0 when every run trained and every figure was drawn, else 1 (2: bad arguments)."""
    args = _parser().parse_args(argv)
    defaults = default_paths(args.data, args.quick)
    args.logs = args.logs or os.path.relpath(defaults["logs"])
    args.out = args.out or os.path.relpath(defaults["out"])
    args.summary_dir = args.summary_dir or os.path.relpath(defaults["summary"])
    args.page = args.page or os.path.relpath(defaults["page"])
    try:
        spec = load_spec(args.spec)
        figures = selected_figures(spec, args.only)
        runs = plan_runs(spec, figures, "quick" if args.quick else "full")
    except ValueError as err:
        print(f"make_figures.py: error: {err}", file=sys.stderr)
        return 2
    for run in runs:
        if args.max_steps is not None:
            run.scale = {**run.scale, "max_steps": min(run.scale["max_steps"], args.max_steps)}
            if run.max_epochs is not None:  # an epoch-long run: N batches of one epoch
                run.scale["epoch_batches"] = min(run.scale["epoch_batches"] or args.max_steps, args.max_steps)
        if args.seeds is not None:
            run.scale = {**run.scale, "seeds": min(int(run.scale["seeds"]), args.seeds)}
    for note in skipped_figures(spec, figures).values():
        print(f"note: {note}", file=sys.stderr, flush=True)
    if any(v is not None and v < 1 for v in (args.threads, args.max_steps, args.seeds)) or args.jobs < 1:
        print("make_figures.py: error: --jobs, --threads, --max-steps and --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.list:
        _print_plan(spec, figures, runs, args)
        return 0
    if args.plan:
        _print_prediction(runs, args, spec)
        return 0
    if args.page_only:
        print(f"results page: {_render_page(args, defaults, spec)}")
        return 0
    timings: dict[str, dict] = {}
    failed_runs: list[str] = []
    wall = None
    if not args.plot_only:
        if args.data == "cifar":
            try:
                _prepare_cifar(args.data_dir)
            except (OSError, RuntimeError) as err:
                print(f"make_figures.py: error: {err}\n(or run with --data synthetic or --data digits)", file=sys.stderr)
                return 2
        if args.runs:
            unknown = sorted(set(args.runs) - {r.name for r in runs})
            if unknown:
                print(f"make_figures.py: error: --runs {' '.join(unknown)}: not in the plan (see --list)", file=sys.stderr)
                return 2
        selected = [r for r in runs if not args.runs or r.name in args.runs]
        print(start_banner(selected, args, spec), flush=True)
        start = time.perf_counter()
        timings, failed_runs = _train(selected, spec, args)
        wall = time.perf_counter() - start
    failed_figs = _plot(spec, figures, runs, args)
    paths = _summarise(runs, args, timings, wall)
    print(f"summary: {paths['md']}")
    print(f"results page: {_render_page(args, defaults, spec)}")
    if failed_runs or failed_figs:
        print(f"failed runs: {failed_runs or 'none'}; failed figures: {failed_figs or 'none'}", file=sys.stderr)
        return 1
    return 0


#: The summary's record of the training run, which only a run that trained can measure.
TRAINING_META = ("training wall time (s)", "training CPU time (s)", "runs at a time", "load average at the end (1 min)",
                 "steps/s (first seed's arch)")


def kept_training_meta(previous: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The :data:`TRAINING_META` entries of the summary at ``previous`` when it describes the same logs (same mode,
    runs and seeded runs as ``meta``), else nothing: a summary re-made from existing logs keeps how they were
    trained instead of losing it."""
    try:
        old = json.loads(previous.read_text()).get("meta", {})
    except (OSError, ValueError):
        return {}
    if any(old.get(k) != meta.get(k) for k in ("mode", "runs", "seeded runs")):
        return {}
    return {k: old[k] for k in TRAINING_META if k in old}


def _render_page(args: argparse.Namespace, defaults: dict[str, Path], spec: dict[str, Any]) -> Path:
    """Write the results page from the summaries in ``args.summary_dir`` (every data set's, not only ``--data``)."""
    from lyapunov_callbacks.analysis.summary import render_results_page

    figures_root = defaults["figures_root"] if args.out == os.path.relpath(defaults["out"]) else Path(args.out).parent
    every = plan_runs(spec, list(spec["figures"]), "full")
    captions = {fig: {"caption": f.get("caption", ""), "runs": [n for row in f["runs"] for n in row if n is not None]}
                for fig, f in spec["figures"].items()}
    return render_results_page(args.summary_dir, figures_root, args.page, intro=RESULTS_INTRO + "\n" + scale_text(spec),
                               figures=captions, figure_of=figure_of(every), lr_free=LR_FREE_PATH,
                               limitations=LIMITATIONS, gpt=GPT_PATH)


#: The learning-rate-free benchmark's results (QN against tuned SGD, Prodigy, D-Adaptation, schedule-free SGD).
LR_FREE_PATH = ROOT / "benchmarks" / "results" / "lr_free.md"
#: The GPT run file's training run, quoted beyond the paper's figures.
GPT_PATH = ROOT / "benchmarks" / "results" / "gpt_training.md"

#: The fixed limitations of the page (what the runs cannot show; no result is asserted here).
LIMITATIONS = (
    "Small data: the two-class problems are 1,438 training images (digits, even against odd, since the plan "
    "of 2026-12; the committed digits summary predates it and used 3 against 5, 292 images, 3 batches an "
    "epoch) and 10,000 synthetic images; the paper's CIFAR-10 cannot be downloaded here.",
    "Short runs: 1,000 to 1,500 steps (figures.yaml); the paper's runs are longer. Late-window values are "
    "those of these lengths; a run that still drifts reads *not settled*.",
    "Probe batches below 1,024 samples where 1,024 costs more than the rest of a run (TinyResNet 128, "
    "LeNet1 256): their probe h0 is closer to a mini-batch h0 than to the full-batch sharpness.",
    "ResNet-18 (figure 10) runs 10 steps at batch 32: untested at this scale, shown for the pipeline only.",
    "A committed summary from older code lacks some statistics (late λ, late drift, spreads): they read "
    "'not measured in the committed runs' until `make figures` reruns on this code.",
)


def scale_text(spec: dict[str, Any]) -> str:
    """The full scale of the plan in one paragraph of the results page (read from figures.yaml, not typed)."""
    parts = [f"{arch} {s['max_steps']:,} steps at batch {s['batch_size']}, {s['seeds']} seed(s), "
             + (f"probe batch {s['probe_size']:,}" if s.get("probe_every") else "no probe h0")
             for arch, s in spec["scales"]["full"].items()]
    fewer = sorted(name for name, run in spec.get("runs", {}).items()
                   if "seeds" in run and run["seeds"] < spec["scales"]["full"][arch_of(run["config"])]["seeds"])
    text = ("Full scale (`figures/figures.yaml`, sized to the 120-minute budget of `make figures` per data set on 2 "
            "CPU cores with measured per-step costs; see its cost note for what was cut): " + "; ".join(parts) + ".")
    if fewer:
        text += " One seed only (the plan's `runs:` overrides): " + ", ".join(f"`{n}`" for n in fewer) + "."
    return text + " Every figure title states its data set, steps, batch and seeds."


#: The fixed text at the top of the results page (how it is made; no result is asserted here).
RESULTS_INTRO = """
This page is generated by `make figures` (`figures/make_figures.py`) from the summaries in `docs/results/`,
which are computed by `lyapunov_callbacks/analysis/summary.py` from the TensorBoard logs of the runs; no number on it is
typed by hand. The figures are numbered and paneled as the paper's captions; `figures/figures.yaml` holds the
run plan (steps, batch, seeds, monitors) and the choice made for the garbled caption of figure 7 (the cyclic
schedule, completing the constant-LR series 4-6). `analysis_*.png` are not paper figures: late-training 1/h0
against α (with the lines 1/h0 = α and 1/h0 = α/2), the distribution of λ per run, and the quasi-Newton loss
beside the constant-LR runs; `adamw.png` (not a paper figure) shows AdamW's preconditioned stability ratio
α·h0(P⁻¹H)·(1−β1)/(1+β1) (h0(P⁻¹H): the top eigenvalue of the preconditioned Hessian) against its edge 2, and λ,
per LR, once its run files exist; `control_gd.png` and `control_adam.png` are the controls with known answers.

Reproducibility: on one machine a run is deterministic (the same code, seed and data give the same logs bit for
bit). Another CPU or PyTorch build may round differently, so the first logged losses can differ in their
last digits; a run with λ > 0 amplifies that difference, so its later curve, its late-window values and,
near the edge of divergence, whether it diverges at all can differ between machines. Such a run's value is one
draw of a chaotic trajectory, not a property of the code alone.

    make figures DATA=synthetic      # or DATA=digits, DATA=cifar; QUICK=1 for the short development scale
"""


if __name__ == "__main__":
    sys.exit(main())
