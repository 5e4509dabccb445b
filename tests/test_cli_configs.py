"""Every run config parses and trains (fast_dev_run) through the CLI; logging, per-batch cyclic LR, dispatch."""

import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lyapunov_callbacks import models
from lyapunov_callbacks.cli import LyapunovCLI, main, run_cli

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
#: Folders of shared pieces that run files include; every other yaml under configs/ is a run file.
PIECE_DIRS = {"base", "data", "model", "optimizer", "lr_scheduler", "trainer", "callbacks"}
RUN_FILES = sorted(
    p for p in CONFIG_ROOT.rglob("*.yaml") if p.relative_to(CONFIG_ROOT).parts[0] not in PIECE_DIRS
)
ARCH_CLASSES = {
    "linear": models.LinearModel,
    "mlp": models.MLP,
    "lenet1": models.LeNet1,
    "tinyresnet": models.TinyResNet,
    "resnet18": models.ResNet18,
}
NAME_RE = re.compile(r"^(?P<arch>[a-z0-9]+)_(?P<loss>ce|mse)(_lr(?P<lr>[0-9.]+))?$")
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers",
    # Lightning 2.6's own calls into jsonargparse 4.53 (skip_none, add_instantiator, instantiate_classes).
    "ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning",
)


@pytest.fixture(autouse=True)
def _bare_sys_argv(monkeypatch):
    # LightningCLI warns when given `args` while sys.argv (here pytest's own flags) is not empty.
    monkeypatch.setattr("sys.argv", ["lyapunov-cli"])


def _rel(path: Path) -> str:
    return str(path.relative_to(CONFIG_ROOT).with_suffix(""))


def _data_class_path(path: Path) -> str:
    """The ``class_path`` of the data module a run file trains on (following its ``config:`` includes)."""
    raw = yaml.safe_load(path.read_text())
    data = raw.get("data")
    if data is None:
        return _data_class_path(path.parent / raw["config"])
    return yaml.safe_load((path.parent / data).read_text())["class_path"] if isinstance(data, str) else data["class_path"]


def _overrides(cifar_dir: str, out: Path, cifar: bool = True) -> list[str]:
    # The CIFAR flags point CIFAR10DataModule at the fake files; other data modules need no files.
    cifar_flags = [
        "--data.init_args.data_dir", str(cifar_dir),
        "--data.init_args.download", "false",
        "--data.init_args.allow_unverified_files", "true",  # the fake files fail the md5 check, by design
    ] if cifar else []  # fmt: skip
    return [
        *cifar_flags,
        "--data.init_args.batch_size", "8",
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def test_the_paper_grid_of_run_files_exists():
    expected = {
        f"constant/{a}_{loss}_lr{lr}" for a in ARCH_CLASSES for loss in ("ce", "mse") for lr in ("0.05", "0.1", "0.3")
    } | {f"cyclic/{a}_{loss}" for a in ARCH_CLASSES for loss in ("ce", "mse")}
    assert expected <= {_rel(p) for p in RUN_FILES}


@pytest.mark.parametrize("path", RUN_FILES, ids=_rel)
def test_run_file_logs_under_its_own_name(path):
    # Distinct TensorBoard folders (logs/<kind>/<run>/version_N): runs never overwrite each other's logs.
    raw = yaml.safe_load(path.read_text())
    assert raw["trainer.logger.init_args.name"] == _rel(path)


def _is_resnet18_with_curvature_callbacks(path: Path) -> bool:
    """ResNet-18 runs outside the constant/cyclic grid carry the curvature callbacks (quasi-Newton LR, h0 and
    Lyapunov monitors), whose start-up Lanczos on 11M parameters makes even fast_dev_run take ~50 s here."""
    return "resnet18" in _rel(path) and path.parent.name not in ("constant", "cyclic")


def _fast_dev_run_params():
    for p in RUN_FILES:
        marks = [pytest.mark.slow] if "resnet18" in _rel(p) and not _is_resnet18_with_curvature_callbacks(p) else []
        yield pytest.param(p, marks=marks, id=_rel(p))


@pytest.mark.parametrize("path", list(_fast_dev_run_params()))
def test_run_file_trains_with_fast_dev_run(path, cifar_dir, tmp_path):
    cifar = _data_class_path(path).endswith(".CIFAR10DataModule")
    overrides = ["--trainer.fast_dev_run", "true", *_overrides(cifar_dir, tmp_path, cifar=cifar)]
    if _is_resnet18_with_curvature_callbacks(path):
        # The file itself is parsed and every object instantiated (ResNet-18, data, trainer with its callbacks);
        # the training step with those callbacks is run on TinyResNet instead, for time.
        parsed = run_cli(["--config", str(path), *overrides], run=False)
        assert type(parsed.model) is models.ResNet18 and parsed.model.num_classes == 10
        # The callbacks as composed (through `config:` includes and configs/callbacks/ pieces) are instantiated.
        configured = parsed.config["trainer"]["callbacks"] or []
        assert configured, f"{_rel(path)} attaches no curvature callbacks"
        names = {type(cb).__name__ for cb in parsed.trainer.callbacks}
        assert {c["class_path"].rsplit(".", 1)[-1] for c in configured} <= names
        overrides += ["--model.class_path", "lyapunov_callbacks.models.TinyResNet"]
    cli = run_cli(["fit", "--config", str(path), *overrides])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    assert math.isfinite(cli.trainer.callback_metrics["train/loss"].item())

    match = NAME_RE.match(path.stem)
    if match is None or _is_resnet18_with_curvature_callbacks(path):  # the model is swapped above
        return
    assert type(cli.model) is ARCH_CLASSES[match["arch"]]
    assert cli.model.loss_name == match["loss"]
    # num_classes is linked from the data module: cat vs dog, or all ten classes for ResNet-18.
    expected_classes = 10 if match["arch"] == "resnet18" else 2
    assert cli.datamodule.num_classes == expected_classes
    assert cli.model.hparams.num_classes == expected_classes
    assert cli.model(torch.zeros(1, 3, 32, 32)).shape == (1, expected_classes)

    (optimizer,) = cli.trainer.optimizers
    if path.parent.name == "adamw":  # AdamW runs with the Adam monitors (configs/callbacks/adamw_monitors.yaml)
        assert type(optimizer) is torch.optim.AdamW
        (group,) = optimizer.param_groups
        assert group["lr"] == float(match["lr"]) and group["weight_decay"] == 0.01
        assert {"HessianEigenvalueMonitor", "LyapunovExponentMonitor"} <= {type(c).__name__ for c in cli.trainer.callbacks}
        return
    assert type(optimizer) is torch.optim.SGD
    (group,) = optimizer.param_groups
    assert group["momentum"] == 0.0 and group["weight_decay"] == 0.0
    if path.parent.name == "constant":
        assert group["lr"] == float(match["lr"])
        assert cli.trainer.lr_scheduler_configs == []
    if path.parent.name == "cyclic":
        (sched,) = cli.trainer.lr_scheduler_configs
        assert isinstance(sched.scheduler, torch.optim.lr_scheduler.CyclicLR)
        assert sched.interval == "step"
        assert not sched.scheduler.cycle_momentum


def test_one_epoch_writes_tensorboard_tags(cifar_dir, tmp_path, capsys):
    path = CONFIG_ROOT / "constant" / "linear_ce_lr0.1.yaml"
    args = ["fit", "--config", str(path), "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1"]
    assert main([*args, *_overrides(cifar_dir, tmp_path)]) == 0

    (log_dir,) = (tmp_path / "constant" / "linear_ce_lr0.1").glob("version_*")
    # The CLI tells the user where the run's logs are and how to open them.
    out = capsys.readouterr().out
    assert f"TensorBoard logs of this run: {log_dir}" in out
    assert f"tensorboard --logdir {tmp_path}" in out
    assert (log_dir / "config.yaml").is_file()
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= tags
    # 36 training images (cat vs dog of the fake files, 10% held out) in batches of 8: 5 steps, one loss each.
    train_loss = acc.Scalars("train/loss")
    assert [e.step for e in train_loss] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(e.value) for e in train_loss)
    assert len(acc.Scalars("val/acc")) == 1 and 0.0 <= acc.Scalars("val/acc")[0].value <= 1.0


class _RecordOptimizerState(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.momenta: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        group = trainer.optimizers[0].param_groups[0]
        self.lrs.append(group["lr"])
        self.momenta.append(group["momentum"])


def test_cyclic_config_steps_the_lr_every_batch_and_keeps_momentum_zero(cifar_dir, tmp_path):
    path = CONFIG_ROOT / "cyclic" / "linear_ce.yaml"
    # run=False: no subcommand; the CLI only parses and instantiates, and we fit with a recording callback.
    args = ["--config", str(path), "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1"]
    cli = run_cli([*args, *_overrides(cifar_dir, tmp_path)], run=False)
    recorder = _RecordOptimizerState()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    # Triangular CyclicLR, base 0.05, max 0.3, step_size_up 142 batches: lr_k = 0.05 + 0.25 k / 142 on the
    # way up. 2 epochs x 5 batches = 10 steps, each with its own LR (a per-epoch scheduler would give 2 values).
    expected = [0.05 + 0.25 * k / 142 for k in range(10)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert recorder.momenta == [0.0] * 10
    assert all(state.get("momentum_buffer") is None for state in cli.trainer.optimizers[0].state.values())


@pytest.mark.parametrize(
    "scheduler, interval",
    [
        (lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1, cycle_momentum=False), "step"),
        (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10), "step"),
        (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1), "epoch"),
    ],
)
def test_configure_optimizers_steps_per_batch_schedulers_every_batch(scheduler, interval):
    model = models.LinearModel(num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = scheduler(optimizer)
    out = LyapunovCLI.configure_optimizers(model, optimizer, sched)
    assert out == {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": interval}}
    assert LyapunovCLI.configure_optimizers(model, optimizer) is optimizer


def test_plot_command_dispatches_to_plotting_main(monkeypatch):
    from lyapunov_callbacks.analysis import plotting

    received = []
    monkeypatch.setattr(plotting, "main", lambda argv: received.append(argv) or 3)
    assert main(["plot", "logs/run", "--out", "x.png"]) == 3
    assert received == [["logs/run", "--out", "x.png"]]


def test_bad_config_value_exits_with_usage_error(tmp_path, capsys):
    path = CONFIG_ROOT / "constant" / "mlp_ce_lr0.1.yaml"
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(path), "--model.init_args.loss", "l2"])
    assert excinfo.value.code != 0
    assert "loss" in capsys.readouterr().err
