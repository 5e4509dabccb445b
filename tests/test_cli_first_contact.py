"""The command line as a new user meets it: the summary after a fit, a TensorBoard command that works as printed,
one readable line for an argument a class refuses, and `predict` on the shipped data modules."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lyapunov_callbacks import QuasiNewtonLR
from lyapunov_callbacks.cli import fit_summary_lines, main, one_line_error, run_cli, tensorboard_command

REPO_ROOT = Path(__file__).resolve().parents[1]
QN_CONFIG = REPO_ROOT / "configs" / "quasi_newton" / "mlp_ce.yaml"
CONSTANT_CONFIG = REPO_ROOT / "configs" / "constant" / "mlp_ce_lr0.1.yaml"
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers",
    "ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning",
)


@pytest.fixture(autouse=True)
def _bare_sys_argv(monkeypatch):
    # LightningCLI warns when given `args` while sys.argv (here pytest's own flags) is not empty.
    monkeypatch.setattr("sys.argv", ["lyapunov-cli"])


def _tiny(out: Path, data: str = "synthetic") -> list[str]:
    """The stand-in at 80 two-class training and 20 held-out images (or the two-class digits), an 8-unit MLP, one
    epoch, logs in ``out``."""
    if data == "digits":
        data_args = ["--data", "lyapunov_callbacks.datamodules.DigitsDataModule"]
    else:
        data_args = ["--data.init_args.synthetic", "true",
                     "--data.init_args.synthetic_train_size", "400", "--data.init_args.synthetic_val_size", "100"]
    return [
        *data_args, "--data.init_args.batch_size", "32",
        "--model.init_args.hidden_sizes", "[8]", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
    ]  # fmt: skip


def test_fit_prints_the_summary_of_the_run_and_a_working_tensorboard_command(tmp_path, capsys):
    cli = run_cli(["fit", "--config", str(QN_CONFIG), *_tiny(tmp_path)])
    out = capsys.readouterr().out
    metrics = cli.trainer.callback_metrics
    (qn,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, QuasiNewtonLR)]
    acc, h0, lr = (metrics[t].item() for t in ("val/acc", "quasi_newton/h0", "quasi_newton/lr"))
    triggered = int(metrics["quasi_newton/triggered_estimates"].item())
    expected = [
        f"final validation accuracy (val/acc): {acc:.4f}",
        f"last h0 = {h0:.4g} (quasi_newton/h0), α = {lr:.4g} (quasi_newton/lr)",
        f"quasi_newton: {qn.rule.num_estimates} estimates, {qn.rule.rejected_estimates} rejected, {qn.rule.clamped_estimates} "
        f"clamped, {triggered} triggered by a loss jump or the Rayleigh check",
    ]
    assert "\n" + "\n".join(expected) + "\n" in out
    assert qn.rule.num_estimates >= 1 and 0.0 < lr == pytest.approx(1.0 / h0, rel=1e-6)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr, rel=1e-6)

    # The TensorBoard command names a launcher that exists and the run's folder.
    (line,) = [l for l in out.splitlines() if l.startswith("  open them with: ")]
    words = shlex.split(line.removeprefix("  open them with: "))
    root = tmp_path / "quasi_newton" / "mlp_ce"
    assert words[-2:] == ["--logdir", str(root)]
    if words[1:3] == ["-m", "tensorboard.main"]:
        assert Path(words[0]).is_file()
    else:
        assert len(words) == 3 and Path(words[0]).is_file() and Path(words[0]).name.startswith("tensorboard")


def test_summary_without_validation_or_curvature_callbacks_says_what_is_missing(tmp_path, capsys):
    cli = run_cli([
        "fit", "--config", str(CONSTANT_CONFIG), *_tiny(tmp_path),
        "--trainer.limit_val_batches", "0", "--trainer.max_steps", "1",
    ])  # fmt: skip
    assert fit_summary_lines(cli.trainer) == [
        "final validation accuracy: not logged (no validation loop ran)",
        "h0: not measured (no QuasiNewtonLR or HessianEigenvalueMonitor), α = 0.1 (the optimiser's first param group)",
    ]


def test_tensorboard_command_runs_as_printed(tmp_path):
    command = shlex.split(tensorboard_command(tmp_path))
    proc = subprocess.run([*command[:-2], "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--logdir" in proc.stdout, proc.stderr[-2000:]


def test_a_refused_callback_argument_is_one_line():
    try:
        try:
            raise ValueError("`every_n_steps` must be an integer >= 1, got 0; use e.g. every_n_steps=10.")
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes\nSubtypes: [...]") from inner
    except ValueError as outer:
        assert one_line_error(outer) == "`every_n_steps` must be an integer >= 1, got 0; use e.g. every_n_steps=10."

    class Monitor:
        def __init__(self, every_n_steps):
            raise ValueError(f"`every_n_steps` must be >= 1,\n  got {every_n_steps}.")

    try:
        Monitor(0)
    except ValueError as exc:
        assert one_line_error(exc) == "Monitor: `every_n_steps` must be >= 1, got 0."


def test_cli_argument_error_ends_in_one_readable_line_in_a_fresh_process(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "lyapunov_callbacks", "fit", "--config", str(QN_CONFIG),
         "--data.init_args.synthetic", "true",
         "--trainer.callbacks+=HessianEigenvalueMonitor", "--trainer.callbacks.every_n_steps=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "lyapunov-cli: error: HessianEigenvalueMonitor: `every_n_steps` must be an integer >= 1, got 0; "
        'use e.g. every_n_steps=10 or every_n_steps="auto" (adaptive).'
    )


@pytest.mark.parametrize("data", ["synthetic", "digits"])
def test_predict_runs_on_the_test_split_of_the_shipped_data_modules(tmp_path, data):
    args = ["predict", "--config", str(QN_CONFIG), *_tiny(tmp_path, data)]
    assert main(args) == 0  # the command a user types

    cli = run_cli(args[1:], run=False)  # parse and instantiate only: no subcommand
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    dm, model = cli.datamodule, cli.model
    expected_set = dm.test_set if data == "synthetic" else dm.val_set
    assert dm.classes == [3, 5]  # the run file's cat/dog selection carried over to digits 3 and 5
    images = torch.stack([expected_set[i][0] for i in range(len(expected_set))])
    logits = torch.cat(predictions)
    assert logits.shape == (len(expected_set), dm.num_classes)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=1e-5, atol=1e-6)


def test_summary_of_a_model_without_accuracy_names_its_validation_metrics():
    from types import SimpleNamespace

    import torch

    trainer = SimpleNamespace(
        callback_metrics={"val/loss": torch.tensor(2.1689), "val/bpb": torch.tensor(3.1291),
                          "train/loss": torch.tensor(2.0), "hessian/h0": torch.tensor(54.36)},
        callbacks=[], optimizers=[torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)],
    )
    assert fit_summary_lines(trainer) == [
        "final validation: val/bpb 3.129, val/loss 2.169",
        "last h0 = 54.36 (hessian/h0), α = 0.001 (the optimiser's first param group)",
    ]
