"""Tests of the figures driver (figures/make_figures.py): the plan in figures.yaml, the command lines, one tiny run."""

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_figures", ROOT / "figures" / "make_figures.py")
make_figures = importlib.util.module_from_spec(_spec)
sys.modules["make_figures"] = make_figures  # dataclasses look their module up there
_spec.loader.exec_module(make_figures)

ARCHS = ["mlp", "lenet1", "tinyresnet", "linear"]


@pytest.fixture(scope="module")
def spec():
    return make_figures.load_spec()


def _callbacks(args):
    value = next(a for a in args if a.startswith("--trainer.callbacks="))
    return json.loads(value.split("=", 1)[1])


def _flag(args, name):
    hits = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return hits[0] if hits else None


def test_spec_references_only_existing_configs(spec):
    runs = make_figures.plan_runs(spec, list(spec["figures"]))
    assert runs, "the plan has no run"
    for run in runs:
        assert run.config_path.is_file(), run.name
        assert run.arch in spec["scales"], run.name
    # 4 architectures x 2 losses x (3 constant LRs + cyclic + quasi-Newton), 6 spectrum runs, 3 ResNet-18 runs
    assert len(runs) == 4 * 2 * 5 + 6 + 3
    assert len({r.name for r in runs}) == len(runs)


def test_figure_mapping(spec):
    figs = spec["figures"]
    assert make_figures.selected_figures(spec, None, False) == [f"fig{i}" for i in range(1, 10)]
    assert make_figures.selected_figures(spec, None, True)[-1] == "fig10"
    assert figs["fig1"]["runs"] == [[f"constant/{a}_ce_lr{lr}" for lr in ("0.05", "0.1", "0.3")] for a in ARCHS]
    assert figs["fig2"]["runs"][0] == ["quasi_newton/mlp_ce", "quasi_newton/mlp_mse"]  # the README's main job
    assert figs["fig3"]["kind"] == "spectrum" and figs["fig3"]["k"] == 14
    assert figs["fig10"]["runs"] == [["resnet18_comparison/quasi_newton", "resnet18_comparison/cyclic",
                                      "resnet18_comparison/constant_lr0.05"]]


def test_list_prints_every_planned_run(capsys):
    assert make_figures.main(["--list", "--data", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("46 runs, data=synthetic")
    commands = [line.strip()[len("lyapunov-cli "):] for line in out.splitlines()
                if line.strip().startswith("lyapunov-cli fit")]
    assert len(commands) == 46
    by_name = {_flag(shlex.split(c), "trainer.logger.init_args.name"): shlex.split(c) for c in commands}

    mlp = by_name["constant/mlp_ce_lr0.1"]
    assert mlp[:3] == ["fit", "--config", str(Path("configs/constant/mlp_ce_lr0.1.yaml"))]
    assert _flag(mlp, "trainer.max_steps") == "120" and _flag(mlp, "trainer.limit_train_batches") == "30"
    assert _flag(mlp, "data.init_args.batch_size") == "64"
    assert _flag(mlp, "data.init_args.synthetic") == "true"
    assert _flag(mlp, "trainer.logger.init_args.version") == "synthetic"
    assert _callbacks(mlp) == [
        {"class_path": "lyapunov_callbacks.HessianEigenvalueMonitor", "init_args": {"every_n_steps": 5, "k": 1}},
        {"class_path": "lyapunov_callbacks.LyapunovExponentMonitor", "init_args": {"window": 10, "every_n_steps": None}},
    ]
    # the cyclic LR's half-cycle shrinks to one reduced epoch; constant runs have no scheduler flag
    assert _flag(by_name["cyclic/lenet1_mse"], "lr_scheduler.init_args.step_size_up") == "30"
    assert _flag(by_name["cyclic/tinyresnet_ce"], "lr_scheduler.init_args.step_size_up") == "15"
    assert _flag(mlp, "lr_scheduler.init_args.step_size_up") is None
    # quasi-Newton runs keep their config's QuasiNewtonLR and get no extra Hessian monitor
    qn = _callbacks(by_name["quasi_newton/mlp_ce"])
    assert [c["class_path"].rsplit(".", 1)[1] for c in qn] == ["QuasiNewtonLR", "LyapunovExponentMonitor"]
    assert qn[0]["init_args"]["every_n_steps"] == 10
    # spectrum runs: top-14 Hessian, no Lyapunov monitor, one reduced epoch
    spec_run = by_name["spectrum/mlp_ce_lr0.1"]
    assert _callbacks(spec_run) == [
        {"class_path": "lyapunov_callbacks.HessianEigenvalueMonitor", "init_args": {"every_n_steps": 10, "k": 14}}
    ]
    assert _flag(spec_run, "trainer.max_steps") == "30"
    assert "resnet18_comparison/cyclic" not in by_name  # optional figure 10 is not in the default plan


def test_list_with_cifar_and_only(capsys):
    assert make_figures.main(["--list", "--data", "cifar", "--data-dir", "/x/y", "--only", "fig10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 runs, data=cifar")
    cmds = [shlex.split(line.strip()[len("lyapunov-cli "):]) for line in out.splitlines()
            if line.strip().startswith("lyapunov-cli fit")]
    assert all(_flag(c, "data.init_args.data_dir") == "/x/y" for c in cmds)
    assert all(_flag(c, "data.init_args.synthetic") is None for c in cmds)
    # the comparison's monitors come from configs/callbacks/*.yaml, rescaled
    cyclic = next(c for c in cmds if _flag(c, "trainer.logger.init_args.name") == "resnet18_comparison/cyclic")
    assert _callbacks(cyclic)[0]["init_args"] == {"every_n_steps": 4, "k": 1}
    assert _flag(cyclic, "lr_scheduler.init_args.step_size_up") == "8"
    # a 16-step ResNet-18 run re-estimates the quasi-Newton LR every 4 steps instead of its config's 20
    qn = next(c for c in cmds if _flag(c, "trainer.logger.init_args.name") == "resnet18_comparison/quasi_newton")
    assert _callbacks(qn) == [
        {"class_path": "lyapunov_callbacks.QuasiNewtonLR", "init_args": {"scale": 1.0, "every_n_steps": 4}},
        {"class_path": "lyapunov_callbacks.LyapunovExponentMonitor", "init_args": {"window": 4, "every_n_steps": 8}},
    ]


def test_bad_arguments_and_specs(tmp_path, capsys):
    assert make_figures.main(["--list", "--only", "fig99"]) == 2
    assert "fig99: no such figure" in capsys.readouterr().err
    bad = yaml.safe_load((ROOT / "figures" / "figures.yaml").read_text())
    bad["figures"]["fig1"]["runs"][0][0] = "constant/mlp_ce_lr0.7"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"constant/mlp_ce_lr0.7.*does not exist"):
        make_figures.load_spec(path)
    bad["figures"]["fig1"]["runs"][0] = bad["figures"]["fig1"]["runs"][0][:2]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"figures.fig1.runs must be len\(rows\) x len\(cols\) = 4 x 3"):
        make_figures.load_spec(path)
    bad = yaml.safe_load((ROOT / "figures" / "figures.yaml").read_text())
    bad["scales"]["mlp"]["batchsize"] = 8
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"scales.mlp lacks \[\] / has unknown keys \['batchsize'\]"):
        make_figures.load_spec(path)
    assert make_figures.main(["--spec", str(path), "--list"]) == 2


def test_config_callbacks_follow_includes_and_files(tmp_path):
    (tmp_path / "cbs.yaml").write_text("- class_path: lyapunov_callbacks.QuasiNewtonLR\n  init_args: {every_n_steps: 7}\n")
    (tmp_path / "base.yaml").write_text("trainer.callbacks: cbs.yaml\n")
    (tmp_path / "run.yaml").write_text("config: base.yaml\noptimizer.init_args.lr: 0.2\n")
    assert make_figures.config_callbacks(tmp_path / "run.yaml") == [
        {"class_path": "lyapunov_callbacks.QuasiNewtonLR", "init_args": {"every_n_steps": 7}}
    ]
    (tmp_path / "plain.yaml").write_text("trainer: {max_epochs: 3}\n")
    assert make_figures.config_callbacks(tmp_path / "plain.yaml") == []


@pytest.mark.slow
def test_tiny_end_to_end_run(tmp_path, capsys):
    """Two linear runs of 6 steps through the real CLI: the overrides reach the trainer, the figure is drawn."""
    tiny = {
        "scales": {"linear": {"batch_size": 16, "max_steps": 6, "epoch_batches": 3, "val_batches": 1, "log_every": 1,
                              "hessian_every": 1, "lyapunov_window": 2, "lyapunov_every": None}},
        "figures": {"tiny": {"title": "tiny", "rows": ["linear"], "cols": ["cyclic", "quasi-Newton"],
                             "runs": [["cyclic/linear_ce", "quasi_newton/linear_mse"]]}},
    }
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(tiny))
    logs, out = tmp_path / "logs", tmp_path / "out"
    code = make_figures.main(["--spec", str(spec_path), "--logs", str(logs), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "[ 1/2] cyclic/linear_ce:" in stdout and "trained 2/2 runs" in stdout
    assert (out / "tiny.png").stat().st_size > 10_000

    from lyapunov_callbacks._tb_reader import read_scalars

    cyclic = read_scalars(logs / "cyclic/linear_ce/synthetic")
    # triangular CyclicLR 0.05 <-> 0.3 with step_size_up = epoch_batches = 3, stepped every batch
    np.testing.assert_array_equal(cyclic["optim/lr"].steps, np.arange(6))
    np.testing.assert_allclose(cyclic["optim/lr"].values, [0.05, 0.05 + 0.25 / 3, 0.05 + 0.5 / 3, 0.3,
                                                           0.05 + 0.5 / 3, 0.05 + 0.25 / 3], rtol=1e-6)
    np.testing.assert_array_equal(cyclic["lyapunov/lambda"].steps, [1, 3, 5])  # windows of 2 steps
    assert cyclic["train/loss"].steps.tolist() == list(range(6))
    qn = read_scalars(logs / "quasi_newton/linear_mse/synthetic")
    assert "hessian/inv_h0" in qn and "quasi_newton/lr" in qn
    np.testing.assert_allclose(qn["quasi_newton/lr"].values, qn["hessian/inv_h0"].values, rtol=1e-6)
    summary = (logs / "summary_synthetic.md").read_text()
    assert "| cyclic/linear_ce |" in summary and "| quasi_newton/linear_mse |" in summary
    nums = make_figures.run_numbers(logs / "quasi_newton/linear_mse/synthetic")
    assert nums["median_alpha_h0"] == pytest.approx(1.0, rel=1e-5)  # α = 1/h0 at every estimate
