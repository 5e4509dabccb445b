"""Figures a reader can read: the α·h0 panel under every run chart, a diverged cell on its own y-axis, the
1/h0-against-α plot without the quasi-Newton points, and y labels that do not run over themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from lyapunov_callbacks.analysis import plotting


def write_run(run_dir: Path, series: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(log_dir=str(run_dir)) as writer:
        for tag, (steps, values) in series.items():
            for s, v in zip(steps, values):
                writer.add_scalar(tag, float(v), int(s))
    return run_dir


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).astype(np.float64)


STEPS = np.arange(0, 100, 10)


def _run(path, h0, lr=0.1, loss=None, probe=None):
    series = {"hessian/h0": (STEPS, h0), "optim/lr": (STEPS, np.full(STEPS.size, lr)),
              "train/loss": (STEPS, np.linspace(1.0, 0.5, STEPS.size) if loss is None else loss)}
    if probe is not None:
        series["hessian_probe/h0"] = (STEPS[::3], probe)
    return write_run(path, series)


def test_the_stability_panel_draws_alpha_h0_against_one_and_two(tmp_path):
    h0 = np.linspace(5.0, 19.0, STEPS.size)  # α·h0 from 0.5 to 1.9
    probe = np.array([3.0, 12.0, 150.0, 0.5])  # α·h0 0.3, 1.2, 15 (above the range), 0.05 (below)
    run = _run(tmp_path / "a" / "seed0", h0, probe=probe)
    grid = plotting.plot_grid([[run]], ["MLP"], ["α = 0.1"], tmp_path / "fig.png", dpi=40)
    st = grid.stability[0][0]
    assert grid.stability_axes.shape == (1, 1) and st.ax is grid.stability_axes[0, 0]
    np.testing.assert_allclose(st.lines["mini-batch"].get_ydata(), f32(h0) * f32(0.1), rtol=1e-6)
    # points outside 0.1..10 are drawn at the edge and counted
    np.testing.assert_allclose(st.lines["probe"].get_ydata(), np.clip(f32(probe) * f32(0.1), 0.1, 10.0), rtol=1e-6)
    assert st.clipped == {"mini-batch": 0, "probe": 2}
    # how many estimates each curve rests on, in its legend
    assert st.estimates == {"mini-batch": 10, "probe": 4} and st.seeds == 1
    texts = [t.get_text() for t in st.ax.get_legend().get_texts()]
    assert texts == ["mini-batch: 10 estimates × 1 seed(s)", "probe: 4 estimates × 1 seed(s)"]
    refs = sorted(ln.get_ydata()[0] for ln in st.ax.get_lines() if ln not in st.lines.values())
    assert refs == [1.0, 2.0] and st.ax.get_yscale() == "log"
    assert (tmp_path / "fig.png").is_file()


def test_a_logged_stability_is_used_as_it_is_and_seeds_are_counted(tmp_path):
    for seed, scale in enumerate((1.0, 1.2, 1.4)):
        write_run(tmp_path / "r" / f"seed{seed}", {"hessian/stability": (STEPS, scale * np.ones(STEPS.size)),
                                                  "train/loss": (STEPS, np.linspace(1, 0.5, STEPS.size))})
    fig = plotting._new_figure((4, 2))
    st = plotting.plot_stability(tmp_path / "r", fig.add_subplot())
    np.testing.assert_allclose(st.lines["mini-batch"].get_ydata(), np.full(STEPS.size, 1.2), rtol=1e-6)
    assert st.seeds == 3 and st.estimates == {"mini-batch": 10}


def test_a_diverged_cell_keeps_its_own_y_axis(tmp_path):
    calm = _run(tmp_path / "calm" / "seed0", np.full(STEPS.size, 10.0))
    blow = np.array([1.0, 2.0, 5.0, 1e3, 1e20, 1e37, np.inf, np.inf, np.inf, np.inf])
    wild = _run(tmp_path / "wild" / "seed0", np.full(STEPS.size, 30.0), lr=0.3, loss=blow)
    other = _run(tmp_path / "other" / "seed0", np.full(STEPS.size, 10.0), loss=np.linspace(2.0, 0.2, STEPS.size))
    grid = plotting.plot_grid([[calm, wild, other]], ["MLP"], ["a", "b", "c"], dpi=40)
    a, b, c = (cell.ax for cell in grid.cells[0])
    assert grid.cells[0][1].diverged_at == 30  # the first loss above 10 x the first one: 1e3 at step 30
    assert a.get_ylim() == c.get_ylim()  # the two trained runs share the row's scale
    assert b.get_ylim() != a.get_ylim() and b.get_ylim()[1] < 1e30
    assert "own y-axis (diverged)" in [t.get_text() for t in b.texts]
    assert "own y-axis (diverged)" not in [t.get_text() for t in a.texts]


def test_quasi_newton_points_are_left_out_of_the_alpha_plot(tmp_path):
    def rec(name, arch, schedule, alpha, inv):
        return {"name": name, "seed": "seed0", "alpha": alpha, "inv_h0_minibatch": inv, "inv_h0_probe": inv,
                "steps": 100}
    payload = {"data": "synthetic", "thresholds": {"lambda_zero": 0.05}, "meta": {},
               "runs": [{"name": "constant/mlp_ce_lr0.1", "arch": "mlp", "loss": "ce", "schedule": "constant",
                         "steps": 100, "seeds": 1, "lr": 0.1},
                        {"name": "quasi_newton/mlp_ce", "arch": "mlp", "loss": "ce", "schedule": "quasi_newton",
                         "steps": 100, "seeds": 1, "lr": None}],
               "records": [rec("constant/mlp_ce_lr0.1", "mlp", "constant", 0.1, 0.05),
                           rec("quasi_newton/mlp_ce", "mlp", "quasi_newton", 0.2, 0.2)]}
    from unittest import mock

    drawn = []
    real = plotting.Axes.scatter

    def spy(self, x, y, *args, **kwargs):
        drawn.append((float(x[0]), float(y[0])))
        return real(self, x, y, *args, **kwargs)

    with mock.patch.object(plotting.Axes, "scatter", spy):
        paths = plotting.plot_analysis(payload, tmp_path, dpi=40)
    assert tmp_path / "analysis_alpha_h0.png" in paths
    # the constant run in both panels (mini-batch, probe); the QN point (α = 1/h0 = 0.2) in neither
    assert drawn == [(0.1, 0.05), (0.1, 0.05)]


def test_long_axis_labels_are_broken_into_lines():
    pre = plotting.PRECONDITIONED_SERIES
    label = plotting._left_label([s for s in pre if s.positive], True)
    assert label == "α·h0(P⁻¹H)·(1−β1)/(1+β1),\ntraining loss (log)"
    assert "λ1" not in label  # λ is the Lyapunov exponent on these charts
    short = [s for s in plotting.SERIES if s.key in ("inv_h0", "lr", "loss")]
    assert plotting._left_label(short, True) == "1/h0, α, training loss (log)"  # short enough for one line
