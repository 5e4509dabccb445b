"""``lyapunov-cli plot``: titles name the data set and the LR rule, panels of a parent folder are told apart,
and the legend covers no curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

from lyapunov_callbacks.analysis.tb_reader import run_title
from lyapunov_callbacks.analysis.plotting import main, plot_run


def _config(data: str, optimizer: str = "torch.optim.SGD", lr: float = 0.1, callbacks: str = "",
            scheduler: str = "") -> str:
    return f"""\
trainer:
  callbacks:{callbacks or " []"}
model:
  class_path: lyapunov_callbacks.models.MLP
  init_args:
    loss: ce
data:
{data}
optimizer:
  class_path: {optimizer}
  init_args:
    lr: {lr}
    momentum: 0.0
{scheduler}"""


CIFAR_SYNTHETIC = """\
  class_path: lyapunov_callbacks.datamodules.CIFAR10DataModule
  init_args:
    classes: [3, 5]
    synthetic: true"""
DIGITS = """\
  class_path: lyapunov_callbacks.datamodules.DigitsDataModule
  init_args:
    classes: [3, 5]"""
QUASI_NEWTON = """
  - class_path: lyapunov_callbacks.QuasiNewtonLR
    init_args:
      scale: 1.0"""
CYCLIC = """\
lr_scheduler:
  class_path: torch.optim.lr_scheduler.CyclicLR
  init_args:
    base_lr: 0.05
    max_lr: 0.3
"""


def _run(run_dir: Path, config: str, steps: int = 30) -> Path:
    """A run whose loss sits in the upper right of the chart, where an inside legend would go."""
    run_dir.mkdir(parents=True, exist_ok=True)
    s = np.arange(steps)
    series = {"lyapunov/lambda": -0.01 + 0.02 * np.sin(s / 4.0), "hessian/inv_h0": np.geomspace(0.2, 0.02, steps),
              "optim/lr": np.geomspace(0.2, 0.02, steps), "train/loss": np.full(steps, 0.7)}
    with SummaryWriter(log_dir=str(run_dir)) as writer:
        for tag, values in series.items():
            for step, value in zip(s, values):
                writer.add_scalar(tag, float(value), int(step))
    (run_dir / "config.yaml").write_text(config)
    return run_dir


@pytest.mark.parametrize(
    "config, title",
    [
        (_config(CIFAR_SYNTHETIC, callbacks=QUASI_NEWTON),
         "MLP · loss=ce · CIFAR-10 cat vs dog (synthetic stand-in)\nSGD · QuasiNewtonLR α = 1/h0"),
        (_config(DIGITS, lr=0.05), "MLP · loss=ce · digits 3 vs 5\nSGD lr=0.05"),
        (_config(DIGITS, scheduler=CYCLIC), "MLP · loss=ce · digits 3 vs 5\nSGD · CyclicLR 0.05–0.3"),
        (_config(CIFAR_SYNTHETIC, optimizer="torch.optim.AdamW", lr=0.001, callbacks=QUASI_NEWTON),
         "MLP · loss=ce · CIFAR-10 cat vs dog (synthetic stand-in)\nAdamW · QuasiNewtonLR α = c/λ1(P⁻¹H)"),
    ],
    ids=["quasi-newton-synthetic", "constant-digits", "cyclic", "quasi-newton-adamw"],
)
def test_title_names_the_data_set_and_the_lr_rule(tmp_path, config, title):
    assert run_title(_run(tmp_path / "run", config)) == title


def test_legend_of_a_single_run_chart_covers_no_curve(tmp_path):
    result = plot_run(_run(tmp_path / "run", _config(DIGITS)), out=tmp_path / "curves.png")
    fig = result.figure
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    for ax in (result.ax, result.lambda_ax):
        assert not box.overlaps(ax.get_window_extent())
    assert box.y1 < result.ax.get_window_extent().y0  # below the chart
    assert imread(str(result.paths[0])).std() > 0.01


def test_panels_of_a_parent_folder_are_told_apart(tmp_path, capsys, monkeypatch):
    logs = tmp_path / "logs" / "quasi_newton"
    config = _config(CIFAR_SYNTHETIC, callbacks=QUASI_NEWTON)
    _run(logs / "mlp_ce" / "version_0", config)
    _run(logs / "mlp_ce" / "version_1", config)  # the same config: the same title
    _run(logs / "mlp_ce_digits" / "version_0", _config(DIGITS))
    saved = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **kw: (saved.append(fig), savefig(fig, *a, **kw))[1])
    out = tmp_path / "all.png"
    assert main([str(logs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out)] and out.stat().st_size > 1000
    titles = [ax.get_title() for ax in saved[0].axes if ax.get_title()]
    assert titles == [
        "mlp_ce/version_0\nMLP · loss=ce · CIFAR-10 cat vs dog (synthetic stand-in)\nSGD · QuasiNewtonLR α = 1/h0",
        "mlp_ce/version_1\nMLP · loss=ce · CIFAR-10 cat vs dog (synthetic stand-in)\nSGD · QuasiNewtonLR α = 1/h0",
        "mlp_ce_digits/version_0\nMLP · loss=ce · digits 3 vs 5\nSGD lr=0.1",
    ]
