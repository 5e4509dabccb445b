"""What ``make train`` runs: choose the data set, say which one loudly, and run ``lyapunov-cli fit`` on it.

The data modules stay strict (a missing CIFAR-10 is an error there, never a silent fallback); the choice lives
here, at the command line, where it is printed in the first and the last line of the run:

- ``--data auto`` (``make train``): CIFAR-10 when ``<data-dir>/cifar-10-batches-py`` is complete or can be
  downloaded, otherwise the offline CIFAR-shaped stand-in (``synthetic``), with the reason;
- ``--data cifar`` (``make train DATA=cifar``): CIFAR-10 or one short message naming the offline commands, exit 2;
- ``--data synthetic`` / ``--data digits``: the offline stand-in / scikit-learn's real 8x8 digits, no network.

The run logs to ``logs/<run name>/<data>/version_N`` (the run file's logger name with the data set appended), so
runs on different data never share a folder. Setting the environment variable ``LYAPUNOV_OFFLINE=1`` treats
CIFAR-10 as not downloadable without touching the network.

Usage::

    python -m lyapunov_callbacks.make_train --data auto --data-dir data --config configs/quasi_newton/mlp_ce.yaml \\
        -- --trainer.max_epochs 3
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence
from urllib.parse import urlparse

import yaml

#: Values of ``DATA`` / ``--data``.
DATA_CHOICES = ("auto", "cifar", "synthetic", "digits")
#: Environment variable: ``1`` means "CIFAR-10 is not downloadable here" (no connection is attempted).
OFFLINE_ENV = "LYAPUNOV_OFFLINE"
#: The official archive (``torchvision.datasets.CIFAR10.url``), written out so that the check imports nothing.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
#: Seconds the reachability check waits for a connection to the download host.
CONNECT_TIMEOUT_S = 5.0
#: What a user without CIFAR-10 types instead.
OFFLINE_COMMANDS = "make train DATA=synthetic (offline CIFAR-shaped stand-in) or make train DATA=digits (real 8x8 digits)"
DIGITS_CLASS = "lyapunov_callbacks.datamodules.DigitsDataModule"


class CIFARUnavailable(RuntimeError):
    """CIFAR-10 is neither on disk nor downloadable (the message says why and what to type instead)."""


@dataclass
class DataChoice:
    """The data set a ``make train`` run uses: its name, the CLI arguments that select it, and why."""

    name: str
    args: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def is_stand_in(self) -> bool:
        return self.name == "synthetic"

    def first_line(self, requested: str) -> str:
        if self.name == "cifar":
            return f"==> make train: data = CIFAR-10 ({self.reason})."
        if self.name == "digits":
            return "==> make train: data = digits (scikit-learn's real 8x8 digits, upsampled to 3x32x32; DATA=digits)."
        if requested == "synthetic":
            return "==> make train: data = synthetic, the offline CIFAR-shaped stand-in (DATA=synthetic), not CIFAR-10."
        return (
            f"==> make train: data = SYNTHETIC, the offline CIFAR-shaped stand-in, NOT CIFAR-10: {self.reason}. "
            f"To train on CIFAR-10, put its python-version batches there (or pass DATA_DIR=...); real offline "
            f"data: make train DATA=digits."
        )

    def last_line(self, requested: str, status: int = 0) -> str:
        if status != 0:
            return f"==> make train: the run on {self.name} failed (exit status {status})."
        if self.name == "synthetic" and requested == "auto":
            return (
                "==> make train: this run trained on the SYNTHETIC offline stand-in, NOT CIFAR-10 "
                f"({self.reason})."
            )
        label = {"cifar": "CIFAR-10", "digits": "digits", "synthetic": "the synthetic offline stand-in"}[self.name]
        return f"==> make train: this run trained on {label} (data = {self.name})."


def cifar_on_disk(data_dir: str | os.PathLike) -> bool:
    """Whether ``data_dir/cifar-10-batches-py`` holds every file of the python version of CIFAR-10."""
    folder = Path(data_dir).expanduser() / CIFAR10_FOLDER
    return all((folder / name).is_file() for name in CIFAR10_FILES)


def cifar_download_reachable(timeout: float = CONNECT_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the CIFAR-10 download host accepts a connection, and if not, why (a few words).

    ``LYAPUNOV_OFFLINE=1`` answers "no" without touching the network.
    """
    if os.environ.get(OFFLINE_ENV, "") == "1":
        return False, f"{OFFLINE_ENV}=1"
    url = urlparse(CIFAR10_URL)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"{url.hostname} unreachable ({type(exc).__name__}: {exc})"


def download_cifar(data_dir: str | os.PathLike) -> None:
    """Download and check the official archive into ``data_dir`` (the data module's own ``prepare_data``)."""
    from lyapunov_callbacks.datamodules import CIFAR10DataModule

    CIFAR10DataModule(data_dir=str(data_dir), download=True).prepare_data()


def choose_data(
    data: str,
    data_dir: str | os.PathLike,
    reachable: Callable[[], tuple[bool, str]] = cifar_download_reachable,
    download: Callable[[str | os.PathLike], None] = download_cifar,
) -> DataChoice:
    """The data set of a ``make train`` run.

    Args:
        data: one of :data:`DATA_CHOICES`.
        data_dir: the folder that holds (or will hold) ``cifar-10-batches-py``.
        reachable: the download check (default :func:`cifar_download_reachable`); tests pass their own.
        download: fetches CIFAR-10 into ``data_dir`` (default :func:`download_cifar`); raises when it fails.

    Raises:
        ValueError: if ``data`` is not one of :data:`DATA_CHOICES`.
        CIFARUnavailable: with ``data="cifar"``, if CIFAR-10 is neither on disk nor downloadable.
    """
    if data not in DATA_CHOICES:
        raise ValueError(f"DATA must be one of {', '.join(DATA_CHOICES)}, got {data!r}.")
    dir_args = ["--data.init_args.data_dir", str(data_dir)]
    if data == "synthetic":
        return DataChoice("synthetic", dir_args + ["--data.init_args.synthetic", "true"], "DATA=synthetic")
    if data == "digits":
        return DataChoice("digits", ["--data", DIGITS_CLASS] + dir_args, "DATA=digits")
    folder = Path(data_dir) / CIFAR10_FOLDER
    if cifar_on_disk(data_dir):
        return DataChoice("cifar", dir_args, f"found in {folder}")
    ok, why = reachable()
    if ok:
        try:
            download(data_dir)
        except Exception as exc:  # network, HTTP, checksum or archive errors all mean "not downloadable"
            ok, why = False, f"the download failed ({type(exc).__name__}: {str(exc).split('. ')[0]})"
    if ok:
        return DataChoice("cifar", dir_args, f"downloaded into {folder}")
    reason = f"CIFAR-10 is not in {folder} and cannot be downloaded: {why}"
    if data == "cifar":
        raise CIFARUnavailable(
            f"make train DATA=cifar: {reason}. Offline: {OFFLINE_COMMANDS}; or put the official python-version "
            f"batches in {folder} (or pass DATA_DIR)."
        )
    return DataChoice("synthetic", dir_args + ["--data.init_args.synthetic", "true"], reason)


def run_name(config: str | os.PathLike) -> str:
    """The run file's TensorBoard name (``trainer.logger.init_args.name``), else the file's stem."""
    try:
        raw = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError):
        raw = {}
    name = raw.get("trainer.logger.init_args.name")
    if name is None:
        logger = (raw.get("trainer") or {}).get("logger") if isinstance(raw.get("trainer"), dict) else None
        name = ((logger or {}).get("init_args") or {}).get("name") if isinstance(logger, dict) else None
    return str(name) if name else Path(config).stem


def fit_args(config: str, choice: DataChoice, extra: Sequence[str] = ()) -> list[str]:
    """The ``lyapunov-cli`` command line of the run: the config, the data set, a log folder that names it, then
    ``extra`` (which may override any of them)."""
    return [
        "fit", "--config", str(config), *choice.args,
        "--trainer.logger.init_args.name", f"{run_name(config)}/{choice.name}",
        *extra,
    ]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make train", description="Choose the data set of the main job, say which, and train it."
    )
    p.add_argument("--data", default="auto", choices=DATA_CHOICES, help="auto (default): CIFAR-10 when on disk or "
                   "downloadable, else the offline stand-in; cifar: CIFAR-10 only; synthetic; digits")
    p.add_argument("--data-dir", default="data", help="folder that holds cifar-10-batches-py (default: data)")
    p.add_argument("--config", default="configs/quasi_newton/mlp_ce.yaml", help="the run file")
    p.add_argument("cli_args", nargs="*", help="further lyapunov-cli fit arguments (after --)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Choose the data, print it, run the fit with :func:`lyapunov_callbacks.cli.main`, print it again."""
    args = _parser().parse_args(argv)
    try:
        choice = choose_data(args.data, args.data_dir)
    except CIFARUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(choice.first_line(args.data), flush=True)
    from lyapunov_callbacks.cli import main as cli_main

    argv = fit_args(args.config, choice, args.cli_args)
    print(f"==> {shlex.join(['lyapunov-cli', *argv])}", flush=True)
    saved, sys.argv = sys.argv, ["lyapunov-cli", *argv]  # LightningCLI reads (and checks) sys.argv itself
    try:
        status = cli_main()
    finally:
        sys.argv = saved
    print(choice.last_line(args.data, status), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
