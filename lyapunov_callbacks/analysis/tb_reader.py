"""Reading the scalars of TensorBoard runs: finding run directories, merging their event files, reading titles.

A *run* is a directory holding ``events.out.tfevents.*`` files, as Lightning's ``TensorBoardLogger`` writes them
(``save_dir/name/version_N/``), usually beside ``hparams.yaml`` and LightningCLI's ``config.yaml``. Event files are
read with TensorBoard's own ``EventAccumulator`` (no downsampling), never parsed by hand.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Scalar", "find_runs", "read_scalars", "run_title", "event_files"]

_EVENTS_MARKER = "tfevents"


@dataclass(frozen=True)
class Scalar:
    """One logged scalar series: ``values[i]`` was logged at global step ``steps[i]`` (steps increasing)."""

    steps: np.ndarray
    values: np.ndarray


def _natural_key(path: Path) -> list:
    # version_10 sorts after version_2
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def event_files(run_dir: str | os.PathLike) -> list[Path]:
    """The event files directly inside ``run_dir``, in write order.

    Their names are ``events.out.tfevents.<time>.<host>.<pid>.<uid>``; the natural order of the name sorts by
    creation time, then by writer number within one second.
    """
    run_dir = Path(run_dir)
    files = (p for p in run_dir.iterdir() if p.is_file() and _EVENTS_MARKER in p.name)
    return sorted(files, key=lambda p: _natural_key(Path(p.name)))


def find_runs(path: str | os.PathLike) -> list[Path]:
    """The run directories under ``path``.

    Args:
        path: an event file (its directory is the run), a run directory (holds event files), or a directory
            above runs (e.g. ``lightning_logs/``): then every directory below it that holds event files, in
            natural order (``version_2`` before ``version_10``).

    Raises:
        FileNotFoundError: ``path`` does not exist, or neither it nor any directory below it holds event files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Log path {str(path)!r} does not exist.")
    if path.is_file():
        if _EVENTS_MARKER in path.name:
            return [path.parent]
        raise FileNotFoundError(f"{str(path)!r} is not a TensorBoard event file (no 'tfevents' in its name).")
    if event_files(path):
        return [path]
    runs = sorted(
        (Path(root) for root, _, files in os.walk(path) if any(_EVENTS_MARKER in f for f in files)),
        key=_natural_key,
    )
    if not runs:
        raise FileNotFoundError(
            f"No TensorBoard event files (events.out.tfevents.*) in {str(path)!r} or below it; "
            "pass the logger's version directory, e.g. lightning_logs/version_0."
        )
    return runs


def _scalars_of_file(path: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    # scalars=0 / tensors=0: keep every point (the default reservoir keeps a random sample of 10k).
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    try:
        acc.Reload()
    except Exception as err:  # a corrupt record raises from deep inside tensorboard
        raise ValueError(f"Could not read TensorBoard event file {str(path)!r}: {err}") from err
    tags = acc.Tags()
    out: dict[str, list[tuple[int, float]]] = {}
    for tag in tags.get("scalars", []):
        out[tag] = [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
    # torch's SummaryWriter(new_style=True) and tf.summary v2 store scalars as 0-d tensors of the scalars plugin
    for tag in tags.get("tensors", []):
        if tag in out or acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        out[tag] = [(int(e.step), float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
    return out


def read_scalars(run_dir: str | os.PathLike) -> dict[str, Scalar]:
    """Every scalar tag of a run, its event files merged.

    The files are read in write order; where two files hold the same tag at the same step (a resumed run that
    re-logged a step), the later file wins. Each series is sorted by step.

    Args:
        run_dir: a directory holding ``events.out.tfevents.*`` files.

    Raises:
        FileNotFoundError: ``run_dir`` is missing or holds no event files.
        ValueError: the event files are unreadable or hold no scalars.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {str(run_dir)!r} does not exist.")
    files = event_files(run_dir)
    if not files:
        raise FileNotFoundError(f"No TensorBoard event files (events.out.tfevents.*) in {str(run_dir)!r}.")
    merged: dict[str, dict[int, float]] = {}
    for f in files:
        for tag, points in _scalars_of_file(f).items():
            merged.setdefault(tag, {}).update(points)
    if not merged:
        raise ValueError(
            f"The event files in {str(run_dir)!r} hold no scalars "
            f"({len(files)} file(s), e.g. {files[0].name!r}); was anything logged?"
        )
    result = {}
    for tag, by_step in merged.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        result[tag] = Scalar(steps=steps, values=np.array([by_step[s] for s in steps], dtype=np.float64))
    return result


# ------------------------------------------------------------------------------------------------ titles


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return None


def _short(class_path: Any) -> str | None:
    return class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) and class_path else None


def _class_and_args(node: Any) -> tuple[str | None, dict]:
    """``{class_path, init_args}`` or a bare class path string -> (short class name, init args)."""
    if isinstance(node, str):
        return _short(node), {}
    if isinstance(node, dict):
        args = node.get("init_args") or {}
        return _short(node.get("class_path") or node.get("_class_path")), args if isinstance(args, dict) else {}
    return None, {}


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


#: CIFAR-10's class names, by label (``classes: [3, 5]`` is cat vs dog).
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_ADAM_NAMES = ("Adam", "AdamW")


def _data_name(config: dict) -> str | None:
    """The data set of a LightningCLI config: e.g. ``CIFAR-10 cat vs dog (synthetic stand-in)``, ``digits 3 vs 5``."""
    name, args = _class_and_args(config.get("data"))
    if name is None:
        return None
    classes = args.get("classes")
    classes = list(classes) if isinstance(classes, (list, tuple)) else []
    if name == "CIFAR10DataModule":
        base, labels = "CIFAR-10", [
            _CIFAR10_CLASSES[c] if isinstance(c, int) and 0 <= c < len(_CIFAR10_CLASSES) else str(c) for c in classes
        ]
        if len(classes) == len(_CIFAR10_CLASSES):
            labels = []
    elif name == "DigitsDataModule":
        base, labels = "digits", [str(c) for c in classes]
        if len(classes) == 10:
            labels = []
    else:
        base, labels = name.removesuffix("DataModule") or name, [str(c) for c in classes]
    text = f"{base} {' vs '.join(labels)}" if labels else base
    return f"{text} (synthetic stand-in)" if args.get("synthetic") else text


def _quasi_newton_rule(qn_args: dict, optimizer: str | None, momentum: Any) -> str:
    """``QuasiNewtonLR α = 1/h0`` and its variants (scale, the edge rule, momentum, Adam's λ1(P⁻¹H))."""
    factor = float(qn_args.get("scale", 1.0) or 1.0)
    if qn_args.get("rule") == "edge":
        factor *= float(qn_args.get("edge", 1.8))
    adam = optimizer in _ADAM_NAMES
    curvature = "λ1(P⁻¹H)" if adam else "h0"
    stability = "c" if adam else "(1+μ)" if momentum and qn_args.get("momentum_aware") else ""
    numerator = "·".join(x for x in (f"{factor:g}" if factor != 1 or not stability else "", stability) if x)
    return f"QuasiNewtonLR α = {numerator}/{curvature}"


def _title_from_config(config: dict) -> tuple[list[str], list[str]]:
    """Title parts, two lines: model, loss and data set; then the optimiser with the LR rule that set α."""
    parts: list[str] = []
    model = config.get("model")
    model_name, model_args = _class_and_args(model)
    if model_name is None and isinstance(model, dict):
        model_args = model  # LightningCLI without subclass mode stores the init args directly
    if model_name:
        parts.append(model_name)
    if "loss" in model_args:
        parts.append(f"loss={model_args['loss']}")
    data = _data_name(config)
    if data:
        parts.append(data)
    head, parts = parts, []
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    qn_args = next((args for name, args in map(_class_and_args, callbacks if isinstance(callbacks, list) else [])
                    if name == "QuasiNewtonLR"), None)
    sched_name, sched_args = _class_and_args(config.get("lr_scheduler"))
    opt_name, opt_args = _class_and_args(config.get("optimizer"))
    if opt_name:
        opt = opt_name
        # the optimiser's lr is not the LR where a rule sets it (QuasiNewtonLR: the fallback before the first
        # estimate; CyclicLR / OneCycleLR: replaced by their own bounds); other schedulers start from it
        if "lr" in opt_args and qn_args is None and sched_name not in ("CyclicLR", "OneCycleLR"):
            opt += f" lr={_fmt(opt_args['lr'])}"
        if opt_args.get("momentum"):
            opt += f" momentum={_fmt(opt_args['momentum'])}"
        parts.append(opt)
    elif "lr" in model_args:  # a model that builds its own optimiser from an ``lr`` argument
        parts.append(f"lr={_fmt(model_args['lr'])}")
    if sched_name == "CyclicLR" and "base_lr" in sched_args and "max_lr" in sched_args:
        parts.append(f"CyclicLR {_fmt(sched_args['base_lr'])}–{_fmt(sched_args['max_lr'])}")
    elif sched_name:
        parts.append(sched_name)
    if qn_args is not None:
        parts.append(_quasi_newton_rule(qn_args, opt_name, opt_args.get("momentum")))
    return head, parts


def _title_from_hparams(hparams: dict) -> list[str]:
    parts = []
    name = _short(hparams.get("_class_path"))
    if name:
        parts.append(name)
    if "loss" in hparams:
        parts.append(f"loss={hparams['loss']}")
    if "lr" in hparams:
        parts.append(f"lr={_fmt(hparams['lr'])}")
    return parts


def run_title(run_dir: str | os.PathLike) -> str:
    """A chart title for a run: model class, loss and data set; then the optimiser and the LR rule.

    Read from LightningCLI's ``config.yaml`` in the run directory (or its parent): the first line names the
    model, the loss and the data set (e.g. ``CIFAR-10 cat vs dog (synthetic stand-in)``), the second the
    optimiser and what set α: ``SGD lr=0.1`` (constant), ``SGD lr=0.1 · CosineAnnealingLR``, ``SGD · CyclicLR
    0.05–0.3`` or ``SGD · QuasiNewtonLR α = 1/h0`` (the optimiser's lr, only the fallback start there, is left
    out). Else from the logger's ``hparams.yaml``; falls back to the run directory's name (``name/version_N``).
    """
    run_dir = Path(run_dir)
    for candidate in (run_dir / "config.yaml", run_dir.parent / "config.yaml"):
        config = _load_yaml(candidate) if candidate.is_file() else None
        if isinstance(config, dict):
            lines = [" · ".join(parts) for parts in _title_from_config(config) if parts]
            if lines:
                return "\n".join(lines)
    hparams_path = run_dir / "hparams.yaml"
    hparams = _load_yaml(hparams_path) if hparams_path.is_file() else None
    if isinstance(hparams, dict):
        parts = _title_from_hparams(hparams)
        if parts:
            return " · ".join(parts)
    resolved = run_dir.resolve()
    return f"{resolved.parent.name}/{resolved.name}" if resolved.parent.name else resolved.name
