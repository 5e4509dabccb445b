"""`make train` on a fresh machine: the data choice (CIFAR-10, else the offline stand-in, said loudly), the short
errors offline, and the log folder that names the data set. No test touches the network: "not downloadable" is
``LYAPUNOV_OFFLINE=1`` or an injected check."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_files import write_fake_cifar10
from lyapunov_callbacks import make_train
from lyapunov_callbacks.cli import main as cli_main
from lyapunov_callbacks.make_train import CIFARUnavailable, choose_data

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "quasi_newton" / "mlp_ce.yaml"
#: A run of the main job small enough for a test: 80 stand-in images of the two classes, one batch.
TINY = [
    "--data.init_args.synthetic_train_size", "400", "--data.init_args.synthetic_val_size", "100",
    "--model.init_args.hidden_sizes", "[8]", "--trainer.max_epochs", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers")


def _offline():
    return False, "test: offline"


def _no_download(data_dir):
    raise AssertionError("no download may be attempted here")


def _no_check():
    raise AssertionError("no reachability check may be made here")


def test_auto_without_cifar_picks_the_stand_in_and_says_why(tmp_path):
    choice = choose_data("auto", tmp_path, reachable=_offline, download=_no_download)
    assert choice.name == "synthetic" and choice.is_stand_in
    assert choice.args == ["--data.init_args.data_dir", str(tmp_path), "--data.init_args.synthetic", "true"]
    folder = str(tmp_path / "cifar-10-batches-py")
    assert choice.reason == f"CIFAR-10 is not in {folder} and cannot be downloaded: test: offline"
    first, last = choice.first_line("auto"), choice.last_line("auto")
    assert first.startswith("==> make train: data = SYNTHETIC, the offline CIFAR-shaped stand-in, NOT CIFAR-10: ")
    assert choice.reason in first and "make train DATA=digits" in first
    assert last.startswith("==> make train: this run trained on the SYNTHETIC offline stand-in, NOT CIFAR-10 (")
    assert choice.reason in last
    assert choice.last_line("auto", status=1) == "==> make train: the run on synthetic failed (exit status 1)."


def test_auto_with_cifar_on_disk_uses_it_without_the_network(tmp_path):
    write_fake_cifar10(tmp_path)
    choice = choose_data("auto", tmp_path, reachable=_no_check, download=_no_download)
    assert choice.name == "cifar" and choice.args == ["--data.init_args.data_dir", str(tmp_path)]
    assert choice.first_line("auto") == f"==> make train: data = CIFAR-10 (found in {tmp_path / 'cifar-10-batches-py'})."
    assert choice.last_line("auto") == "==> make train: this run trained on CIFAR-10 (data = cifar)."


def test_auto_downloads_when_reachable_and_falls_back_when_the_download_fails(tmp_path):
    fetched = []
    choice = choose_data("auto", tmp_path, reachable=lambda: (True, ""), download=fetched.append)
    assert fetched == [tmp_path] and choice.name == "cifar" and choice.reason.startswith("downloaded into ")

    def fail(data_dir):
        raise RuntimeError("Downloading CIFAR-10 failed (HTTPError: 503). download=True needs network access")

    choice = choose_data("auto", tmp_path, reachable=lambda: (True, ""), download=fail)
    assert choice.name == "synthetic"
    assert choice.reason.endswith("cannot be downloaded: the download failed (RuntimeError: Downloading CIFAR-10 "
                                  "failed (HTTPError: 503))")


def test_cifar_insists_and_names_the_offline_commands(tmp_path):
    with pytest.raises(CIFARUnavailable) as info:
        choose_data("cifar", tmp_path, reachable=_offline, download=_no_download)
    message = str(info.value)
    assert "\n" not in message and message.startswith("make train DATA=cifar: CIFAR-10 is not in ")
    assert "make train DATA=synthetic" in message and "make train DATA=digits" in message
    with pytest.raises(ValueError, match="DATA must be one of auto, cifar, synthetic, digits, got 'cifr'"):
        choose_data("cifr", tmp_path)


def test_offline_variable_answers_without_a_connection(monkeypatch):
    def connect(*args, **kwargs):
        raise AssertionError("no connection may be attempted")

    monkeypatch.setattr(make_train.socket, "create_connection", connect)
    monkeypatch.setenv("LYAPUNOV_OFFLINE", "1")
    assert make_train.cifar_download_reachable() == (False, "LYAPUNOV_OFFLINE=1")


def test_make_train_data_cifar_offline_stops_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LYAPUNOV_OFFLINE", "1")
    assert make_train.main(["--data", "cifar", "--data-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("make train DATA=cifar: CIFAR-10 is not in ") and "LYAPUNOV_OFFLINE=1" in line
    assert "make train DATA=synthetic" in line


def test_the_log_folder_names_the_data_set(tmp_path):
    choice = choose_data("digits", tmp_path)
    args = make_train.fit_args(str(CONFIG), choice, ["--trainer.max_epochs", "1"])
    assert args == [
        "fit", "--config", str(CONFIG), "--data", "lyapunov_callbacks.datamodules.DigitsDataModule",
        "--data.init_args.data_dir", str(tmp_path), "--trainer.logger.init_args.name", "quasi_newton/mlp_ce/digits",
        "--trainer.max_epochs", "1",
    ]  # fmt: skip
    other = tmp_path / "my_run.yaml"
    other.write_text("trainer:\n  max_epochs: 1\n")
    assert make_train.run_name(other) == "my_run"


def test_the_cli_without_cifar_ends_in_one_line_naming_the_offline_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["lyapunov-cli"])
    status = cli_main([
        "fit", "--config", str(CONFIG), "--data.init_args.data_dir", str(tmp_path / "none"),
        "--data.init_args.download", "false", "--trainer.logger.init_args.save_dir", str(tmp_path), *TINY,
    ])  # fmt: skip
    assert status == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, errors
    assert errors[0].startswith("lyapunov-cli: error: CIFAR-10 not found: the folder ")
    assert "--data.init_args.synthetic true" in errors[0] and "make train DATA=synthetic" in errors[0]


def _make_train_command(*make_args: str) -> list[str]:
    """The command ``make train`` runs (``make -n``), with this interpreter in place of the venv's."""
    # Under `make test` the outer make's MAKEFLAGS/MAKELEVEL reach this sub-make, which then prints
    # "make[1]: Entering/Leaving directory" lines around the command: run it as a top-level make.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEFILES")}
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "train", *make_args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    words = shlex.split(line)
    assert words[0].endswith("/python") and words[1:3] == ["-m", "lyapunov_callbacks.make_train"], line
    return [sys.executable, *words[1:]]


@pytest.mark.slow  # a fresh process that imports torch and Lightning, then fits one batch
def test_make_train_default_trains_the_stand_in_when_cifar_is_neither_on_disk_nor_downloadable(tmp_path):
    command = _make_train_command(
        f"DATA_DIR={tmp_path / 'data'}",
        "ARGS=" + shlex.join([*TINY, "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]),
    )
    assert command[3:5] == ["--data", "auto"]  # the Makefile's default
    env = {**os.environ, "LYAPUNOV_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("==> make train: data = SYNTHETIC, the offline CIFAR-shaped stand-in, NOT CIFAR-10: ")
    assert "LYAPUNOV_OFFLINE=1" in lines[0]
    assert lines[-1].startswith("==> make train: this run trained on the SYNTHETIC offline stand-in, NOT CIFAR-10")
    run_dir = tmp_path / "logs" / "quasi_newton" / "mlp_ce" / "synthetic" / "version_0"
    assert run_dir.is_dir() and list(run_dir.glob("events.out.tfevents.*"))
    assert f"TensorBoard logs of this run: {run_dir}" in proc.stdout
    assert not (tmp_path / "data").exists()  # nothing was downloaded or written there
