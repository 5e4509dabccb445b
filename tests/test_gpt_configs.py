"""The GPT run files compose what they say: the model, the text data, the optimiser and the callbacks."""

from pathlib import Path

import pytest

from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR
from lyapunov_callbacks.cli import run_cli
from lyapunov_callbacks.datamodules import TextDataModule
from lyapunov_callbacks.models import GPT

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "gpt"
pytestmark = pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning")


@pytest.fixture(autouse=True)
def _bare_sys_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lyapunov-cli"])


def _parse(name: str, tmp_path):
    args = ["--config", str(CONFIGS / name), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    return run_cli(args, run=False)


def test_adamw_run_file_trains_the_gpt_with_both_monitors(tmp_path):
    cli = _parse("adamw_monitors.yaml", tmp_path)
    assert type(cli.model) is GPT and type(cli.datamodule) is TextDataModule
    assert cli.model.hparams.num_classes == 256 and cli.model.block_size == cli.datamodule.block_size == 64
    assert cli.trainer.max_steps == 400
    (h0,) = [c for c in cli.trainer.callbacks if isinstance(c, HessianEigenvalueMonitor)]
    (lam,) = [c for c in cli.trainer.callbacks if isinstance(c, LyapunovExponentMonitor)]
    assert h0.every_n_steps == 10 and h0.pre_h0 is True and h0.batch_sharpness is True
    assert lam.window == 10 and lam.every_n_steps == 50
    assert cli.config["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert cli.config["optimizer"]["init_args"]["lr"] == 0.001
    assert cli.config["optimizer"]["init_args"]["weight_decay"] == 0.01


def test_quasi_newton_run_file_trains_the_gpt_with_adam_and_the_lambda_monitor(tmp_path):
    cli = _parse("quasi_newton_adam.yaml", tmp_path)
    assert type(cli.model) is GPT and type(cli.datamodule) is TextDataModule
    assert cli.config["optimizer"]["class_path"] == "torch.optim.Adam"
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"QuasiNewtonLR", "LyapunovExponentMonitor"} <= names
    (qn,) = [c for c in cli.trainer.callbacks if isinstance(c, QuasiNewtonLR)]
    assert qn.rule.every_n_steps == 10
