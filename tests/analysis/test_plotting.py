"""Tests of the plot command: event files written by torch's SummaryWriter (and one real trainer.fit) in tmp dirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib import colors as mcolors
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from lyapunov_callbacks.analysis import plotting
from lyapunov_callbacks.analysis.tb_reader import find_runs, read_scalars, run_title
from lyapunov_callbacks.analysis.plotting import (
    MissingTagsWarning,
    main,
    plot_figure,
    plot_grid,
    plot_run,
    plot_spectrum,
)

NUM_STEPS = 40
STEPS_PER_EPOCH = 20
NUM_EIGS = 14

CONFIG_YAML = """\
# lightning.pytorch==2.6.6
seed_everything: 0
trainer:
  accelerator: cpu
  max_epochs: 2
  log_every_n_steps: 1
  callbacks:
  - class_path: lyapunov_callbacks.QuasiNewtonLR
    init_args:
      every_n_steps: 10
model:
  class_path: lyapunov_callbacks.models.MLP
  init_args:
    num_classes: 10
    loss: mse
data:
  class_path: lyapunov_callbacks.datamodules.CIFAR10DataModule
  init_args:
    batch_size: 128
optimizer:
  class_path: torch.optim.SGD
  init_args:
    lr: 0.1
    momentum: 0.0
lr_scheduler:
  class_path: torch.optim.lr_scheduler.CosineAnnealingLR
  init_args:
    T_max: 40
ckpt_path: null
"""


def reference_series(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Realistic curves: λ crossing zero, 1/h0 from 1e-2 to 1, lr 0.1, loss 2 -> 0.3, 14 eigenvalues, epoch."""
    rng = np.random.default_rng(seed)
    steps = np.arange(NUM_STEPS)
    hess_steps = steps[::2]  # the spectrum is measured every other step
    series = {
        "lyapunov/lambda": (steps, 0.4 * np.sin(steps / 5.0) - 0.05),
        "hessian/inv_h0": (steps, np.geomspace(1e-2, 1.0, NUM_STEPS)),
        "optim/lr": (steps, np.full(NUM_STEPS, 0.1)),
        "train/loss": (steps, np.linspace(2.0, 0.3, NUM_STEPS) + 0.02 * rng.standard_normal(NUM_STEPS)),
        "epoch": (steps, (steps // STEPS_PER_EPOCH).astype(float)),
    }
    for i in range(NUM_EIGS):
        series[f"hessian/h{i}"] = (hess_steps, 50.0 * 0.6**i * (1.0 + 0.01 * hess_steps))
    return series


def write_run(run_dir: Path, series: dict, config: str | None = CONFIG_YAML) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(log_dir=str(run_dir)) as writer:
        for tag, (steps, values) in series.items():
            for s, v in zip(steps, values):
                writer.add_scalar(tag, float(v), int(s))
    if config is not None:
        (run_dir / "config.yaml").write_text(config)
    return run_dir


def f32(values) -> np.ndarray:
    """Event files store scalars as float32."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def assert_not_blank(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    img = imread(str(path))[..., :3]
    pixels = img.reshape(-1, 3)
    background = np.ones(3)  # white figure face
    differs = np.abs(pixels - background).max(axis=1) > 0.05
    assert img.std() > 0.01
    assert differs.mean() > 0.01


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("logs") / "mlp" / "version_0", reference_series())


# ------------------------------------------------------------------------------------------------ reader


def test_read_scalars_merges_event_files_later_file_wins(tmp_path):
    run = tmp_path / "version_0"
    write_run(run, {"train/loss": ([0, 1, 2], [2.0, 1.5, 1.2])}, config=None)
    # a resumed run: a second event file in the same directory re-logs step 2 and continues
    write_run(run, {"train/loss": ([2, 3], [1.1, 0.9]), "optim/lr": ([3], [0.05])}, config=None)
    with SummaryWriter(log_dir=str(run)) as writer:  # non-scalar events, as Lightning and our callbacks write them
        writer.add_custom_scalars({"lyapunov": {"chart": ["Multiline", ["lyapunov/lambda", "train/loss"]]}})
        writer.add_text("note", "hello", 0)
        for summary in hparams({"lr": 0.1}, {"hp_metric": -1.0}):  # what Lightning's log_hyperparams writes
            writer._get_file_writer().add_summary(summary)
    assert len(list(run.glob("events.out.tfevents.*"))) == 3
    scalars = read_scalars(run)
    assert sorted(scalars) == ["optim/lr", "train/loss"]
    np.testing.assert_array_equal(scalars["train/loss"].steps, [0, 1, 2, 3])
    np.testing.assert_array_equal(scalars["train/loss"].values, f32([2.0, 1.5, 1.1, 0.9]))
    np.testing.assert_array_equal(scalars["optim/lr"].values, f32([0.05]))


def test_find_runs_sorts_versions_naturally(tmp_path):
    for v in (10, 2, 1):
        write_run(tmp_path / "lightning_logs" / f"version_{v}", {"train/loss": ([0], [1.0])}, config=None)
    (tmp_path / "lightning_logs" / "no_events").mkdir()
    runs = find_runs(tmp_path)
    assert [r.name for r in runs] == ["version_1", "version_2", "version_10"]
    assert find_runs(runs[0]) == [runs[0]]
    assert find_runs(next(runs[0].glob("events*"))) == [runs[0]]


def test_title_from_config_hparams_and_dirname(tmp_path, full_run):
    # the data set on the first line; QuasiNewtonLR sets α, so the optimiser's lr (its fallback start) is left out
    assert run_title(full_run) == "MLP · loss=mse · CIFAR-10\nSGD · CosineAnnealingLR · QuasiNewtonLR α = 1/h0"
    run = write_run(tmp_path / "lenet" / "version_3", {"train/loss": ([0], [1.0])}, config=None)
    assert run_title(run) == "lenet/version_3"
    (run / "hparams.yaml").write_text("_class_path: lyapunov_callbacks.models.LeNet1\nnum_classes: 10\nloss: ce\n")
    assert run_title(run) == "LeNet1 · loss=ce"


def test_empty_dir_and_empty_event_file_raise(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No TensorBoard event files.*empty"):
        plot_run(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_run(tmp_path / "nope")
    hollow = tmp_path / "hollow"
    hollow.mkdir()
    (hollow / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"")
    with pytest.raises(ValueError, match="hold no scalars") as err:
        plot_run(hollow)
    assert str(hollow) in str(err.value)
    with pytest.raises(ValueError, match="hold no scalars"):
        plot_spectrum(hollow)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "events.out.tfevents.1700000000.host.1.0").write_bytes(bytes(range(256)) * 3)
    with pytest.raises(ValueError, match="garbage.*hold no scalars"):
        plot_run(garbage)


# ------------------------------------------------------------------------------------------------ run chart


def test_plot_run_colours_data_axes_and_png(tmp_path, full_run):
    series = reference_series()
    result = plot_run(full_run, out=tmp_path / "figs" / "run.png")
    assert result.paths == [tmp_path / "figs" / "run.png"]
    assert_not_blank(result.paths[0])
    assert result.missing == []
    assert result.title == "MLP · loss=mse · CIFAR-10\nSGD · CosineAnnealingLR · QuasiNewtonLR α = 1/h0"
    assert result.ax.get_title() == result.title

    expected_colour = {"lambda": "tab:blue", "inv_h0": "tab:orange", "lr": "tab:red", "loss": "tab:green"}
    expected_hue = {"lambda": (0.5, 0.7), "inv_h0": (0.05, 0.12), "lr": (0.95, 1.0), "loss": (0.25, 0.42)}
    expected_tag = {"lambda": "lyapunov/lambda", "inv_h0": "hessian/inv_h0", "lr": "optim/lr", "loss": "train/loss"}
    assert set(result.lines) == set(expected_colour)
    for key, line in result.lines.items():
        rgb = mcolors.to_rgb(line.get_color())
        assert rgb == mcolors.to_rgb(expected_colour[key])
        hue = mcolors.rgb_to_hsv(rgb)[0]
        lo, hi = expected_hue[key]
        assert lo <= hue <= hi, (key, hue)
        steps, values = series[expected_tag[key]]
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_array_equal(line.get_ydata(), f32(values))
    assert result.tags == expected_tag
    # α = 1/h0 under QuasiNewtonLR: α is dashed over a wider 1/h0 so that neither hides the other.
    assert result.lines["lr"].get_linestyle() == "--"
    assert result.lines["inv_h0"].get_linewidth() > result.lines["lr"].get_linewidth()

    # positive curves span 1e-2 .. 2 (> one decade): log left axis; λ on its linear twin axis with a zero line
    assert result.log_scale and result.ax.get_yscale() == "log"
    assert result.lambda_ax is not None and result.lambda_ax.get_yscale() == "linear"
    assert result.lines["lambda"] in result.lambda_ax.lines
    assert result.lines["loss"] in result.ax.lines
    zero = [ln for ln in result.lambda_ax.lines if ln.get_linestyle() == "--"]
    assert len(zero) == 1 and list(zero[0].get_ydata()) == [0.0, 0.0]
    assert result.ax.get_xlabel() == "global step"
    assert result.lambda_ax.get_ylabel() == "λ"
    legend = result.figure.legends[0]  # below the chart (tests/test_plot_command.py: it covers no curve)
    assert [t.get_text() for t in legend.get_texts()] == [
        "λ (Lyapunov exponent)", "1/h0", "α (learning rate)", "training loss"
    ]


def test_plot_run_linear_axis_when_values_span_less_than_a_decade(tmp_path):
    run = write_run(
        tmp_path / "narrow",
        {"optim/lr": ([0, 1, 2], [0.1, 0.1, 0.1]), "train/loss": ([0, 1, 2], [0.5, 0.4, 0.3])},
        config=None,
    )
    with pytest.warns(MissingTagsWarning):
        result = plot_run(run)
    assert not result.log_scale and result.ax.get_yscale() == "linear"  # 0.5 / 0.1 = 5 < 10


def test_missing_tags_plot_the_rest_and_are_named(tmp_path):
    run = write_run(
        tmp_path / "plain_sgd",
        {"train/loss": ([0, 1, 2, 3], [2.0, 1.0, 0.6, 0.4]), "lr-SGD": ([0, 1, 2, 3], [0.1, 0.1, 0.05, 0.05])},
        config=None,
    )
    with pytest.warns(MissingTagsWarning, match=r"plain_sgd.*lyapunov/lambda, hessian/inv_h0"):
        result = plot_run(run, out=tmp_path / "plain.png")
    assert result.missing == ["lyapunov/lambda", "hessian/inv_h0"]
    assert set(result.lines) == {"lr", "loss"} and result.lambda_ax is None
    assert result.tags["lr"] == "lr-SGD"  # Lightning's LearningRateMonitor tag
    np.testing.assert_array_equal(result.lines["lr"].get_ydata(), f32([0.1, 0.1, 0.05, 0.05]))
    assert_not_blank(result.paths[0])

    only_loss = write_run(tmp_path / "only_accuracy", {"train/acc": ([0], [0.1])}, config=None)
    with pytest.raises(ValueError, match="none of the chart's tags.*train/acc"):
        plot_run(only_loss)


def test_quasi_newton_lr_preferred_over_optim_lr(tmp_path):
    run = write_run(
        tmp_path / "qn",
        {"optim/lr": ([0, 1], [0.1, 0.1]), "quasi_newton/lr": ([0, 1], [0.02, 0.03]), "train/loss": ([0, 1], [1, 1])},
        config=None,
    )
    with pytest.warns(MissingTagsWarning):
        result = plot_run(run)
    assert result.tags["lr"] == "quasi_newton/lr"
    np.testing.assert_array_equal(result.lines["lr"].get_ydata(), f32([0.02, 0.03]))


def test_formats_and_bad_arguments(tmp_path, full_run):
    result = plot_run(full_run, out=tmp_path / "a" / "b" / "fig.png", formats=("png", "pdf", "svg"), dpi=60)
    assert [p.name for p in result.paths] == ["fig.png", "fig.pdf", "fig.svg"]
    assert result.paths[1].read_bytes()[:4] == b"%PDF"
    assert "<svg" in result.paths[2].read_text()
    default_dpi = plot_run(full_run, out=tmp_path / "hi.png").paths[0]
    assert imread(str(result.paths[0])).shape[1] < imread(str(default_dpi)).shape[1]  # dpi 60 < 150
    # formats=None: the suffix of out picks the format
    assert plot_run(full_run, out=tmp_path / "x.pdf", formats=None).paths == [tmp_path / "x.pdf"]
    with pytest.raises(ValueError, match="formats=.*jpg"):
        plot_run(full_run, out=tmp_path / "x.png", formats=("jpg",))
    with pytest.raises(ValueError, match="dpi=0"):
        plot_run(full_run, dpi=0)


# ------------------------------------------------------------------------------------------------ spectrum


def test_spectrum_averages_first_epoch(tmp_path, full_run):
    series = reference_series()
    result = plot_spectrum(full_run, out=tmp_path / "spectrum.png")
    assert_not_blank(result.paths[0])
    assert result.end_step == STEPS_PER_EPOCH  # the first change of the `epoch` tag
    expected = []
    for i in range(NUM_EIGS):
        steps, values = series[f"hessian/h{i}"]
        expected.append(f32(values)[steps < STEPS_PER_EPOCH].mean())
    np.testing.assert_allclose(result.eigenvalues, expected, rtol=1e-12)
    np.testing.assert_array_equal(result.num_points, np.full(NUM_EIGS, 10))
    heights = [p.get_height() for p in result.ax.patches]
    np.testing.assert_allclose(heights, expected, rtol=1e-12)
    assert result.log_scale and result.ax.get_yscale() == "log"  # 50 .. 50 * 0.6**13 ~ 0.065
    # 14 bars: every second index labelled (h10..h13 collided at a grid cell's width)
    assert [t.get_text() for t in result.ax.get_xticklabels()] == [f"h{i}" if i % 2 == 0 else ""
                                                                   for i in range(NUM_EIGS)]
    # the log axis stops 1e-4 below the largest mean (an MSE model's 1e-15 eigenvalues squeezed the panel)
    assert result.ax.get_ylim()[0] == pytest.approx(max(expected) * 1e-4)

    five = plot_spectrum(full_run, k=5, first_epoch_steps=6)
    expected5 = [f32(series[f"hessian/h{i}"][1])[:3].mean() for i in range(5)]  # steps 0, 2, 4
    np.testing.assert_allclose(five.eigenvalues, expected5, rtol=1e-12)
    assert five.end_step == 6 and len(five.ax.patches) == 5

    with pytest.warns(MissingTagsWarning, match="hessian/h14, hessian/h15"):
        more = plot_spectrum(full_run, k=16)
    assert more.missing == ["hessian/h14", "hessian/h15"] and len(more.ax.patches) == NUM_EIGS
    with pytest.raises(ValueError, match="k=0"):
        plot_spectrum(full_run, k=0)


def test_spectrum_without_eigenvalues_raises(tmp_path):
    run = write_run(tmp_path / "no_hessian", {"train/loss": ([0, 1], [1.0, 0.5])}, config=None)
    with pytest.raises(ValueError, match="No hessian/h0"):
        plot_spectrum(run)


# ------------------------------------------------------------------------------------------------ grids


def test_plot_grid_2x2_with_empty_cell(tmp_path, full_run):
    other = write_run(
        tmp_path / "lenet" / "version_0",
        {"train/loss": ([0, 1, 2], [2.3, 1.9, 1.4]), "optim/lr": ([0, 1, 2], [0.1, 0.1, 0.1])},
        config=None,
    )
    with pytest.warns(MissingTagsWarning):
        grid = plot_grid(
            [[full_run, other], [full_run, None]],
            row_labels=["MLP", "LeNet1"],
            col_labels=["constant", "quasi-Newton"],
            out=tmp_path / "grid.png",
            title="Figure 1",
        )
    assert_not_blank(grid.paths[0])
    assert grid.axes.shape == (2, 2) and grid.cells[1][1] is None
    assert grid.missing == {str(other): ["lyapunov/lambda", "hessian/inv_h0"]}
    assert grid.axes[0, 0].get_title() == "constant" and grid.axes[0, 1].get_title() == "quasi-Newton"
    # y labels: the row label and the quantities of the left axis; λ labelled on the row's last chart
    assert grid.axes[0, 0].get_ylabel() == "MLP\n1/h0, α, training loss (log)"
    assert grid.axes[1, 0].get_ylabel() == "LeNet1\n1/h0, α, training loss (log)"
    assert grid.cells[0][0].lambda_ax is not None and grid.cells[1][0].lambda_ax.get_ylabel() == "λ"
    # one scale per row: both charts of the top row share the log scale and the limits
    top = [grid.cells[0][0].ax, grid.cells[0][1].ax]
    assert [a.get_yscale() for a in top] == ["log", "log"]
    assert top[0].get_ylim() == top[1].get_ylim()
    assert top[0].get_ylim()[0] <= 1e-2 and top[0].get_ylim()[1] >= 2.3
    np.testing.assert_array_equal(
        grid.cells[0][1].lines["loss"].get_ydata(), f32([2.3, 1.9, 1.4])
    )
    labels = [t.get_text() for t in grid.figure.legends[0].get_texts()]
    assert labels == ["λ (Lyapunov exponent)", "1/h0", "α (learning rate)", "training loss"]
    assert grid.figure.get_suptitle() == "Figure 1"

    with pytest.raises(ValueError, match="col_labels has 3 labels"):
        plot_grid([[full_run, None]], col_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="no run directory"):
        plot_grid([[None, None]])


def test_plot_figure_spec(tmp_path, full_run):
    spec = {"title": "Figure 2", "rows": ["MLP"], "cols": ["const", "qn", "cosine"],
            "runs": [[str(full_run.relative_to(tmp_path.parent)), None, full_run]]}
    grid = plot_figure(spec, tmp_path / "figs" / "fig2.pdf", base_dir=tmp_path.parent)
    assert grid.paths == [tmp_path / "figs" / "fig2.pdf"] and grid.paths[0].stat().st_size > 1000
    assert grid.axes.shape == (1, 3) and grid.cells[0][1] is None
    first, last = grid.cells[0][0].lines["loss"], grid.cells[0][2].lines["loss"]
    np.testing.assert_array_equal(first.get_ydata(), last.get_ydata())
    with pytest.raises(ValueError, match="1 rows x 2 columns"):
        plot_figure({"rows": ["a"], "cols": ["b", "c"], "runs": [[full_run]]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="lacks the key 'runs'"):
        plot_figure({"rows": [], "cols": []}, tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------------ CLI


def test_main_single_run_grid_spectrum_and_errors(tmp_path, full_run, capsys):
    out = tmp_path / "cli" / "run.png"
    assert main([str(full_run), "--out", str(out), "--format", "png", "svg", "--dpi", "60"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out), str(out.with_suffix(".svg"))]
    assert_not_blank(out)

    # a directory above several runs -> one row of charts
    bare = write_run(full_run.parent / "version_1", {"train/loss": ([0, 1], [1.0, 0.8])}, config=None)
    assert main([str(full_run.parent), "--out", str(tmp_path / "row.png"), "--col-labels", "v0", "v1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "row.png")
    assert "warning" in captured.err and str(bare) in captured.err and "lyapunov/lambda" in captured.err
    assert_not_blank(tmp_path / "row.png")

    assert main([str(full_run), "--spectrum", "--k", "6", "--out", str(tmp_path / "spec.png")]) == 0
    assert_not_blank(tmp_path / "spec.png")
    capsys.readouterr()

    empty = tmp_path / "empty_logs"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "never.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and str(empty) in err and "Traceback" not in err
    assert not (tmp_path / "never.png").exists()

    three = [str(full_run)] * 3
    assert main([*three, "--grid", "1", "2", "--out", str(tmp_path / "g.png")]) == 2
    assert "holds 2 runs but 3 were given" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "g.png")]) == 2  # argparse: RUN is required
    capsys.readouterr()


@pytest.mark.parametrize("n, shape", [(1, (1, 1)), (3, (1, 3)), (4, (2, 2)), (5, (2, 3)), (10, (3, 4))])
def test_layout_near_square(n, shape):
    assert plotting._layout(n, None) == shape


# ------------------------------------------------------------------------------------------------ real training


def test_plot_of_a_real_trainer_fit(tmp_path):
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.layer(x), y)
            self.losses.append(loss.item())
            self.log("train/loss", loss)
            self.log("optim/lr", self.optimizers().param_groups[0]["lr"])
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    logger = TensorBoardLogger(str(tmp_path), name="tiny")
    trainer = L.Trainer(
        max_epochs=1, logger=logger, log_every_n_steps=1, accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    model = Tiny()
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))

    with pytest.warns(MissingTagsWarning, match="lyapunov/lambda, hessian/inv_h0"):
        result = plot_run(logger.log_dir, out=tmp_path / "tiny.png")
    assert result.missing == ["lyapunov/lambda", "hessian/inv_h0"]
    assert_not_blank(result.paths[0])
    np.testing.assert_array_equal(result.lines["loss"].get_xdata(), np.arange(8))
    np.testing.assert_allclose(result.lines["loss"].get_ydata(), model.losses, rtol=1e-6)
    np.testing.assert_array_equal(result.lines["lr"].get_ydata(), np.full(8, 0.5))


# ------------------------------------------------------------------------------------------------ readability fixes


def test_spectrum_first_epoch_ends_where_epoch_1_starts(tmp_path):
    """Lightning's pattern: log_every_n_steps=4 logs epoch at steps 3, 7, ...; validation logs the end of epoch 0 at
    its last step (9 for 10 batches); epoch 1 is first logged at step 11 although it starts at step 10."""
    h_steps = np.arange(0, 14)
    series = {
        "epoch": (np.array([3, 7, 9, 11, 13]), np.array([0.0, 0.0, 0.0, 1.0, 1.0])),
        "hessian/h0": (h_steps, np.where(h_steps < 10, 1.0, 100.0)),
    }
    run = write_run(tmp_path / "r", series, config=None)
    result = plot_spectrum(run, k=1)
    assert result.end_step == 10
    assert result.eigenvalues[0] == pytest.approx(1.0) and result.num_points[0] == 10


def test_plot_main_default_out_and_skips_runs_without_tags(tmp_path, full_run, capsys):
    root = tmp_path / "lightning_logs"
    train = write_run(root / "version_0", reference_series(), config=None)
    validate = write_run(root / "version_1", {"val/loss": ([0], [0.5]), "val/acc": ([0], [0.8])}, config=None)
    assert main([str(root)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(root / "curves.png")  # the default --out: inside the first RUN
    assert_not_blank(root / "curves.png")
    assert f"note: skipping {validate}" in captured.err and str(train) not in captured.err
    # --spectrum skips the run without hessian/h0 too, default name spectrum.png
    assert main([str(root), "--spectrum", "--k", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(root / "spectrum.png")
    # a parent holding only runs without the chart's tags: one-line error
    only_val = tmp_path / "only_val"
    write_run(only_val / "version_0", {"val/loss": ([0], [0.5])}, config=None)
    write_run(only_val / "version_1", {"val/loss": ([0], [0.4])}, config=None)
    assert main([str(only_val)]) == 2
    assert "no run under" in capsys.readouterr().err
    assert plotting.default_out(next(train.glob("events.out.tfevents.*"))) == train / "curves.png"


def test_diverged_run_is_cut_and_marked(tmp_path):
    steps = np.arange(20)
    loss = np.where(steps < 12, 1.0 - 0.01 * steps, np.where(steps < 14, 50.0, np.nan))
    run = write_run(tmp_path / "div", {"train/loss": (steps, loss), "optim/lr": (steps, np.full(20, 0.3)),
                                       "hessian/inv_h0": (steps, np.full(20, 0.2)),
                                       "lyapunov/lambda": (steps[4::5], np.array([0.1, 0.2, 0.3, 0.4]))},
                    config=None)
    result = plot_run(run)
    assert result.diverged_at == 12  # 50 > 10 x the first loss
    assert result.lines["loss"].get_xdata().max() == 11 and result.lines["lr"].get_xdata().max() == 11
    assert [t.get_text() for t in result.ax.texts] == ["diverged at step 12"]
    # λ measured every 5 steps: drawn with markers; points after the divergence dropped
    assert result.lines["lambda"].get_marker() == "o"
    np.testing.assert_array_equal(result.lines["lambda"].get_xdata(), [4, 9])
    assert result.lines["loss"].get_marker() in ("None", None, "")


def test_seeds_drawn_as_median_and_band(tmp_path):
    steps = np.arange(10)
    cell = tmp_path / "constant" / "mlp_ce_lr0.1" / "synthetic"
    for seed, scale in enumerate((1.0, 2.0, 4.0)):
        write_run(cell / f"seed{seed}", {"train/loss": (steps, scale * np.linspace(1.0, 0.5, 10)),
                                         "optim/lr": (steps, np.full(10, 0.1))}, config=None)
    with pytest.warns(MissingTagsWarning):
        result = plot_run(cell)
    assert result.num_runs == 3
    np.testing.assert_allclose(result.lines["loss"].get_ydata(), 2.0 * np.linspace(1.0, 0.5, 10), rtol=1e-6)
    bands = result.ax.collections
    assert len(bands) == 2  # α, then the loss (series order)
    lows = bands[1].get_paths()[0].vertices[:, 1]
    assert lows.min() == pytest.approx(0.5, rel=1e-6) and lows.max() == pytest.approx(4.0, rel=1e-6)


def test_preconditioned_grid_draws_the_ratio_against_the_edge_and_lambda(tmp_path):
    """The AdamW chart: hessian/pre_stability on the left axis with a dashed line at 2, λ on the right axis."""
    steps = np.arange(20)
    ratio = np.linspace(0.5, 2.5, 20)
    lam = 0.1 * np.cos(steps / 3.0)
    run = write_run(tmp_path / "adamw" / "version_0", {"hessian/pre_stability": (steps, ratio),
                                                        "lyapunov/lambda": (steps, lam),
                                                        "train/loss": (steps, np.linspace(0.7, 0.5, 20))},
                    config=None)
    grid = plotting.plot_grid([[run, None]], ["MLP · CE"], ["α = 1e-3", "α = 3e-3"], tmp_path / "adamw.png",
                              kind="preconditioned", dpi=40)
    cell = grid.cells[0][0]
    assert set(cell.lines) == {"pre_stability", "lambda", "loss"} and cell.missing == []
    np.testing.assert_allclose(cell.lines["pre_stability"].get_ydata(), f32(ratio))
    np.testing.assert_allclose(cell.lines["lambda"].get_ydata(), f32(lam))
    edges = [ln for ln in cell.ax.get_lines() if ln.get_linestyle() == "--" and ln is not cell.lines.get("loss")]
    assert [tuple(ln.get_ydata()) for ln in edges] == [(2.0, 2.0)]
    legend = [t.get_text() for t in grid.figure.legends[0].get_texts()]
    assert legend == ["λ (Lyapunov exponent)", "α·h0(P⁻¹H)·(1−β1)/(1+β1)", "training loss", "edge 2"]
    assert (tmp_path / "adamw.png").is_file()
    # a run without the AdamW tags is named in a warning, not drawn as something else
    sgd = write_run(tmp_path / "sgd" / "version_0", {"train/loss": (steps, np.ones(20))}, config=None)
    with pytest.warns(plotting.MissingTagsWarning, match="hessian/pre_stability"):
        plotting.plot_grid([[sgd]], kind="preconditioned", dpi=40)
    with pytest.raises(ValueError, match="'run', 'spectrum' or 'preconditioned'"):
        plotting.plot_grid([[sgd]], kind="adam")
