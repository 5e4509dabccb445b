"""The console script as users run it: DDP on 2 processes, `test --ckpt_path`, short class names, the help texts.

Tests that depend on what a fresh process has imported (short-name resolution, the help's lists of known
subclasses) run the console script in a subprocess: inside pytest, other test modules have already imported our
classes, which would hide a CLI that does not import them itself.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lyapunov_callbacks import models
from lyapunov_callbacks.datamodules import CIFAR10DataModule
from lyapunov_callbacks import HessianEigenvalueMonitor
from lyapunov_callbacks.cli import main, run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO_ROOT / "configs"
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers",
    "ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning",
)


@pytest.fixture(autouse=True)
def _bare_sys_argv(monkeypatch):
    # LightningCLI warns when given `args` while sys.argv (here pytest's own flags) is not empty.
    monkeypatch.setattr("sys.argv", ["lyapunov-cli"])


def _console(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``python -m lyapunov_callbacks ARGS`` in a fresh process, this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "lyapunov_callbacks", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _fake_cifar_args(cifar_dir: str, out: Path) -> list[str]:
    return [
        "--data.init_args.data_dir", str(cifar_dir),
        "--data.init_args.download", "false",
        "--data.init_args.allow_unverified_files", "true",  # the fake files fail the md5 check by design
        "--data.init_args.batch_size", "8",
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


@pytest.mark.slow
def test_readme_quasi_newton_run_under_ddp_on_two_processes_exits_cleanly(tmp_path):
    # The README's multi-process command, shortened to 2 steps per process on a 16-unit MLP.
    args = [
        "fit", "--config", str(CONFIG_ROOT / "quasi_newton" / "mlp_ce.yaml"),
        "--data.init_args.synthetic", "true",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--model.init_args.hidden_sizes", "[16]",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    proc = _console(args, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr and "Connection closed by peer" not in proc.stderr

    log_dir = tmp_path / "quasi_newton" / "mlp_ce" / "version_0"
    # Rank zero alone tells where the logs are: the message appears exactly once.
    assert proc.stdout.count("TensorBoard logs of this run:") == 1
    assert f"TensorBoard logs of this run: {log_dir}\n" in proc.stdout
    assert [p.name for p in (tmp_path / "quasi_newton" / "mlp_ce").iterdir()] == ["version_0"]
    assert [p.name for p in (log_dir / "checkpoints").iterdir()] == ["epoch=0-step=2.ckpt"]

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1]
    # The quasi-Newton LR (re-estimated every 10 steps, so once here) was set from the DDP-averaged h0.
    (qn_lr,) = acc.Scalars("quasi_newton/lr")
    assert qn_lr.step == 0 and math.isfinite(qn_lr.value) and qn_lr.value > 0


def _reference_test_metrics(model: models.ImageClassifier, dm: CIFAR10DataModule) -> tuple[float, float]:
    """Mean loss over test images and accuracy, computed by hand over ``dm.test_dataloader()``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in dm.test_dataloader():
            logits = model(images)
            total_loss += model.loss_from_logits(logits, labels).item() * labels.shape[0]
            correct += (logits.argmax(dim=1) == labels).sum().item()
            count += labels.shape[0]
    return total_loss / count, correct / count


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_fit_then_test_from_checkpoint(cifar_dir, tmp_path, loss):
    config = str(CONFIG_ROOT / "constant" / f"lenet1_{loss}_lr0.1.yaml")
    common = ["--config", config, *_fake_cifar_args(cifar_dir, tmp_path)]
    assert main(["fit", *common, "--trainer.max_epochs", "1"]) == 0
    (ckpt,) = (tmp_path / "constant" / f"lenet1_{loss}_lr0.1" / "version_0" / "checkpoints").glob("*.ckpt")

    cli = run_cli(["test", *common, "--ckpt_path", str(ckpt)])
    metrics = cli.trainer.callback_metrics
    assert {"test/loss", "test/acc"} <= set(metrics)

    # The same numbers by hand from the checkpoint's weights on the data module's test split.
    model = models.LeNet1.load_from_checkpoint(ckpt)
    dm = CIFAR10DataModule(
        data_dir=cifar_dir, download=False, classes=[3, 5], batch_size=8, allow_unverified_files=True
    )
    dm.prepare_data()
    dm.setup("test")
    ref_loss, ref_acc = _reference_test_metrics(model, dm)
    assert metrics["test/loss"].item() == pytest.approx(ref_loss, rel=1e-5)
    assert metrics["test/acc"].item() == pytest.approx(ref_acc, abs=1e-7)
    # The checkpoint's weights were tested, not a fresh initialisation.
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for name, tensor in cli.model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_short_class_names_resolve_in_a_fresh_process(tmp_path):
    args = [
        "fit", "--config", str(CONFIG_ROOT / "constant" / "mlp_ce_lr0.1.yaml"),
        "--model", "LeNet1",
        "--data", "CIFAR10DataModule", "--data.init_args.synthetic", "true", "--data.init_args.classes", "[3, 5]",
        "--trainer.callbacks+=HessianEigenvalueMonitor", "--trainer.callbacks.every_n_steps=5",
        "--trainer.callbacks+=QuasiNewtonLR",
        "--trainer.callbacks+=LyapunovExponentMonitor",
        "--print_config",
    ]  # fmt: skip
    proc = _console(args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load(proc.stdout)
    assert config["model"]["class_path"] == "lyapunov_callbacks.models.LeNet1"
    assert config["data"]["class_path"] == "lyapunov_callbacks.datamodules.CIFAR10DataModule"
    callbacks = config["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[-1] for c in callbacks] == [
        "HessianEigenvalueMonitor",
        "QuasiNewtonLR",
        "LyapunovExponentMonitor",
    ]
    assert callbacks[0]["init_args"]["every_n_steps"] == 5


def test_short_class_names_train(cifar_dir, tmp_path):
    args = [
        "fit", "--config", str(CONFIG_ROOT / "constant" / "linear_ce_lr0.1.yaml"),
        "--model", "LeNet1", "--model.loss", "mse",
        "--trainer.callbacks+=HessianEigenvalueMonitor", "--trainer.callbacks.every_n_steps=1",
        "--trainer.fast_dev_run", "true",
        *_fake_cifar_args(cifar_dir, tmp_path),
    ]  # fmt: skip
    cli = run_cli(args)
    assert type(cli.model) is models.LeNet1 and cli.model.loss_name == "mse"
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, HessianEigenvalueMonitor)]
    assert monitor.every_n_steps == 1
    assert cli.trainer.global_step == 1
    assert math.isfinite(cli.trainer.callback_metrics["hessian/h0"].item())


def test_fit_help_lists_our_callbacks_models_and_data_modules(tmp_path):
    proc = _console(["fit", "--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # jsonargparse wraps the lists of known subclasses at commas; compare without whitespace.
    text = "".join(proc.stdout.split())
    for name in (
        "lyapunov_callbacks.HessianEigenvalueMonitor",
        "lyapunov_callbacks.LyapunovExponentMonitor",
        "lyapunov_callbacks.QuasiNewtonLR",
        "lyapunov_callbacks.models.LinearModel",
        "lyapunov_callbacks.models.MLP",
        "lyapunov_callbacks.models.LeNet1",
        "lyapunov_callbacks.models.TinyResNet",
        "lyapunov_callbacks.models.ResNet18",
        "lyapunov_callbacks.datamodules.CIFAR10DataModule",
    ):
        assert name in text, name


def test_top_level_help_lists_plot_beside_the_lightning_subcommands(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict"):
        assert f"\n    {subcommand} " in out, subcommand
    assert "plot" in out.split("Available subcommands:", 1)[1]
    assert "lyapunov-cli plot --help" in " ".join(out.split())
