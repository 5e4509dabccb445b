"""figures/quickstart.py, which writes the results file behind the README's "What you should see": its statistics
are those of the run's own logs and of what the run's trainer ended with."""

from pathlib import Path

import pytest

from lyapunov_callbacks.cli import run_cli
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
quickstart = load_script("figures/quickstart.py")
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers",
    "ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning",
    "ignore:.*smaller than the logging interval",
)


def test_curve_statistics_and_results_file_of_a_tiny_run(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lyapunov-cli"])
    cli = run_cli([
        "fit", "--config", str(ROOT / "configs" / "quasi_newton" / "mlp_ce.yaml"),
        "--data.init_args.synthetic", "true", "--data.init_args.synthetic_train_size", "400",
        "--data.init_args.synthetic_val_size", "100", "--data.init_args.batch_size", "16",
        "--model.init_args.hidden_sizes", "[8]", "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.callbacks.window=2", "--trainer.callbacks.every_n_steps=2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.name", "quasi_newton/mlp_ce/synthetic",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
    ])  # fmt: skip
    run_dir = tmp_path / quickstart.RUN_SUBDIR
    rows = dict(quickstart.curve_stats(run_dir))
    m = cli.trainer.callback_metrics
    assert rows["optimiser steps (the checkpoint's step count)"] == str(cli.trainer.global_step)
    assert rows["h0 at the last estimate"] == f"{m['quasi_newton/h0'].item():.3g}"
    assert rows["α at the last estimate"] == f"{m['quasi_newton/lr'].item():.3g}"
    assert rows["val/acc, last epoch"] == f"{m['val/acc'].item():.3f}"
    assert float(rows["largest relative gap between α and 1/h0"]) < 1e-6  # α = 1/h0 at every estimate
    out = tmp_path / "r.md"
    quickstart.write_results(out, "make train DATA=synthetic", 1, 12.0, 3.0, ("0.10 0.20 0.30", "0.40 0.50 0.60"),
                             ["==> make train: data = synthetic"], list(rows.items()))
    text = out.read_text()
    assert "| epochs | 1 |\n| wall time of the command (install already done) | 12 s |" in text
    assert f"| val/acc, last epoch | {rows['val/acc, last epoch']} |" in text
    assert "before: 0.10 0.20 0.30; after: 0.40 0.50 0.60." in text
    assert text.endswith("```text\n==> make train: data = synthetic\n```\n")
