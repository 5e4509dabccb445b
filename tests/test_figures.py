"""Tests of the figures driver (figures/make_figures.py): the plan against the paper's captions, the command lines, a tiny run."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lyapunov_callbacks import summary
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
make_figures = load_script("figures/make_figures.py", reuse=True)

# The paper's captions beside the repository: ../shared/paper/ from its root (make_figures.CAPTIONS_PATH).
CAPTIONS = make_figures.CAPTIONS_PATH


@pytest.fixture(scope="module")
def spec():
    return make_figures.load_spec()


def _callbacks(args):
    value = next(a for a in args if a.startswith("--trainer.callbacks="))
    return json.loads(value.split("=", 1)[1])


def _flag(args, name):
    hits = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return hits[0] if hits else None


def _grid(spec, fig):
    return spec["figures"][fig]["runs"]


def test_the_captions_file_is_read_beside_the_repository():
    assert CAPTIONS == ROOT.parent / "shared" / "paper" / "figure-captions.txt"
    assert CAPTIONS.is_file(), (f"{CAPTIONS} is missing: the plan is checked against the paper's captions, which "
                                "live in ../shared/paper/ beside the repository")
    assert "Figure 4:" in CAPTIONS.read_text()


def test_figures_are_numbered_and_paneled_as_the_captions(spec):
    figs = spec["figures"]
    assert list(figs) == [f"fig{i}" for i in range(1, 11)] + ["control_gd", "control_adam", "adamw"]
    captions = CAPTIONS.read_text()  # fails, rather than passing, when the captions are missing
    # fig 1: MLP-CE (top), TinyResNet-CE (middle), MLP-MSE (bottom) x constant 0.1, 0.3, cyclic
    assert _grid(spec, "fig1") == [[f"constant/{m}_lr0.1", f"constant/{m}_lr0.3", f"cyclic/{m}"]
                                   for m in ("mlp_ce", "tinyresnet_ce", "mlp_mse")]
    # fig 2: MLP, LeNet1, ResNet18 (columns) x CE (top), MSE (bottom), quasi-Newton; ResNet18 on ten classes
    assert _grid(spec, "fig2") == [
        ["quasi_newton/mlp_ce", "quasi_newton/lenet1_ce", "resnet18_comparison/quasi_newton"],
        ["quasi_newton/mlp_mse", "quasi_newton/lenet1_mse", "quasi_newton/resnet18_mse"]]
    assert figs["fig3"]["kind"] == "spectrum" and figs["fig3"]["k"] == 14
    # figs 4-6: one constant LR each, MLP, LeNet1, TinyResNet (and the linear model) x MSE / CE
    for fig, lr in (("fig4", "0.05"), ("fig5", "0.1"), ("fig6", "0.3")):
        assert _grid(spec, fig) == [[f"constant/{a}_{loss}_lr{lr}" for a in ("linear", "mlp", "lenet1", "tinyresnet")]
                                    for loss in ("mse", "ce")]
        assert lr in captions.split(f"Figure {fig[3:]}:")[1].split("Figure")[0]
    # fig 7 (garbled caption): the cyclic member of the series, said so in its title
    assert _grid(spec, "fig7") == [[f"cyclic/{a}_{loss}" for a in ("linear", "mlp", "lenet1", "tinyresnet")]
                                   for loss in ("mse", "ce")]
    assert "garbled" in figs["fig7"]["title"]
    # figs 8 / 9: quasi-Newton with CE (MLP, LeNet1, TinyResNet, ResNet18) / MSE (linear, MLP, LeNet1, TinyResNet)
    assert _grid(spec, "fig8") == [["quasi_newton/mlp_ce", "quasi_newton/lenet1_ce", "quasi_newton/tinyresnet_ce",
                                    "resnet18_comparison/quasi_newton"]]
    assert _grid(spec, "fig9") == [[f"quasi_newton/{a}_mse" for a in ("linear", "mlp", "lenet1", "tinyresnet")]]
    # fig 10: ResNet18 CE, quasi-Newton vs cyclic vs constant 0.05
    assert _grid(spec, "fig10") == [["resnet18_comparison/quasi_newton", "resnet18_comparison/cyclic",
                                     "resnet18_comparison/constant_lr0.05"]]


def test_shared_runs_are_trained_once(spec):
    runs = make_figures.plan_runs(spec, list(spec["figures"]))
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    by = {r.name: r for r in runs}
    assert by["constant/mlp_ce_lr0.1"].figures == ["fig1", "fig5"]
    assert by["resnet18_comparison/quasi_newton"].figures == ["fig2", "fig8", "fig10"]
    assert by["cyclic/tinyresnet_ce"].figures == ["fig1", "fig7"]
    # 24 constant + 8 cyclic + 7 two-class quasi-Newton + ResNet18 (QN CE, QN MSE, cyclic, 0.05) + 6 spectrum,
    # + 2 full-batch controls + the 3 AdamW runs once their run files exist
    adamw = 3 if not make_figures.skipped_figures(spec, ["adamw"]) else 0
    assert len(runs) == 24 + 8 + 7 + 4 + 6 + 2 + adamw
    for run in runs:
        assert run.config_path.is_file(), run.name


def _late_count(run, key):
    """Estimates of a monitor (every run.scale[key] steps, from step 0) in the last 30 % of the run."""
    n, every = run.scale["max_steps"], run.scale[key]
    if not every:
        return 0
    start = (1 - summary.THRESHOLDS["late_fraction"]) * n
    return sum(1 for s in range(0, n + 1, every) if s >= start)


def test_full_scale_meets_the_length_and_seed_requirements(spec):
    runs = {r.name: r for r in make_figures.plan_runs(spec, list(spec["figures"]))}
    need = summary.THRESHOLDS["min_late_estimates"]
    # the runs deciding A and B: the constant-LR and cyclic runs of figures 1, 5, 6, 7 (linear, MLP, LeNet1) and
    # figure 1's TinyResNet runs: 3 seeds, >= 10 late estimates of the mini-batch and the probe h0 (and λ)
    deciding = [n for fig in ("fig1", "fig5", "fig6", "fig7") for row in spec["figures"][fig]["runs"] for n in row
                if n and (not n.split("/")[1].startswith("tinyresnet") or fig == "fig1")]
    assert len(set(deciding)) == 3 * 2 * 3 + 3
    for name in deciding:
        run = runs[name]
        assert run.seeds == [0, 1, 2], name
        assert _late_count(run, "hessian_every") >= need and _late_count(run, "probe_every") >= need, name
        if run.arch != "tinyresnet":  # TinyResNet's λ is cut for the budget (figures.yaml says so)
            assert _late_count(run, "lyapunov_every") >= need, name
        assert run.scale["probe_size"] >= 128 and run.scale["max_steps"] >= 1000
    assert runs["constant/tinyresnet_ce_lr0.1"].scale["max_steps"] == 1000
    text = (ROOT / "figures" / "figures.yaml").read_text()
    for arch in ("tinyresnet", "lenet1"):  # a probe below 1,024 samples is never silent
        size = spec["scales"]["full"][arch]["probe_size"]
        assert size >= 1024 or f"probe on {size} samples" in text or f"batch of {size}" in text, arch
    # the controls: full batch (the whole two-class training set in one batch), on both data sets
    for name in ("control_gd/mlp_mse_lr0.05", "control_adam/mlp_ce_lr0.003"):
        run = runs[name]
        assert run.scale["batch_size"] == spec["datasets"]["digits"]["sizes"]["two_class"][0] == 1438
        assert run.sizes["synthetic"][0] == 1438 == run.data_init["synthetic"]["synthetic_train_size"] * 2 // 10
    quick = make_figures.plan_runs(spec, list(spec["figures"]), "quick")
    assert all(r.seeds == [0] for r in quick)
    assert [r.name for r in quick] == [r.name for r in make_figures.plan_runs(spec, list(spec["figures"]))]


def test_the_plan_fits_the_budget(spec):
    rates = make_figures.load_rates()
    for data in ("synthetic", "digits"):
        plan = make_figures.predict_plan(make_figures.plan_runs(spec, list(spec["figures"])), data, rates, spec, 2)
        assert not plan["unmeasured"] and plan["wall_s"] <= 120 * 60, (data, plan["wall_s"] / 60)


def test_cyclic_runs_cannot_alias_their_estimates(spec, tmp_path):
    runs = {r.name: r for r in make_figures.plan_runs(spec, list(spec["figures"]))}
    for mode in make_figures.MODES:
        for run in make_figures.plan_runs(spec, list(spec["figures"]), mode):
            assert make_figures.cycle_aliasing(run) == [], run.name
    cyc = runs["cyclic/lenet1_ce"]
    # the earlier plan: a probe every 100 (LeNet1: 200) steps on a 200-step cycle reads two phases (one)
    old = make_figures.Run(cyc.name, cyc.config, {**cyc.scale, "probe_every": 100, "hessian_every": 20})
    assert make_figures.cycle_aliasing(old) == [
        "mini-batch h0 every 20 steps on a cycle of 200 steps (gcd 20: 10 phase(s))",
        "probe h0 every 100 steps on a cycle of 200 steps (gcd 100: 2 phase(s))"]
    assert make_figures.cycle_aliasing(make_figures.Run(cyc.name, cyc.config, {**cyc.scale, "probe_every": 200}))[0] \
        .endswith("(gcd 200: 1 phase(s))")
    # a constant-LR run has no cycle to alias with
    const = runs["constant/lenet1_ce_lr0.1"]
    assert make_figures.cycle_aliasing(make_figures.Run(const.name, const.config, {**const.scale, "probe_every": 100})) == []
    # coprime periods visit every phase of the cycle
    phases = {(s % 200) for s in range(0, 200 * 41, 41)}
    assert len(phases) == 200 and make_figures._coprime_near(100, 200) == 101
    # the plan refuses an aliasing period, naming the fix
    text = (ROOT / "figures" / "figures.yaml").read_text().replace(
        "hessian_every: 23, probe_every: 23, probe_size: 256", "hessian_every: 23, probe_every: 100, probe_size: 256")
    bad = tmp_path / "figures.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=r"probe h0 every 100 steps on a cycle of 200 steps.*coprime.*e\.g\. 101"):
        make_figures.load_spec(bad)


def test_command_lines(spec):
    runs = {r.name: r for r in make_figures.plan_runs(spec, list(spec["figures"]))}
    logs = Path("figures/logs")
    mlp = make_figures.fit_args(runs["constant/mlp_ce_lr0.1"], "synthetic", "data", logs, seed=2,
                                datasets=spec["datasets"], with_probe=True)
    assert mlp[:3] == ["fit", "--config", str(Path("configs/constant/mlp_ce_lr0.1.yaml"))]
    assert _flag(mlp, "seed_everything") == "2" and _flag(mlp, "trainer.max_steps") == "1500"
    assert _flag(mlp, "trainer.limit_train_batches") == "1.0"  # whole epochs
    assert _flag(mlp, "data.init_args.batch_size") == "128" and _flag(mlp, "data.init_args.synthetic") == "true"
    assert _flag(mlp, "trainer.logger.init_args.name") == "constant/mlp_ce_lr0.1/synthetic"
    assert _flag(mlp, "trainer.logger.init_args.version") == "seed2"
    assert _callbacks(mlp) == [
        {"class_path": "lyapunov_callbacks.HessianEigenvalueMonitor", "init_args": {"every_n_steps": 41, "k": 1}},
        {"class_path": "lyapunov_callbacks.LyapunovExponentMonitor", "init_args": {"window": 10, "every_n_steps": 41}},
        {"class_path": "lyapunov_callbacks.HessianEigenvalueMonitor",
         "init_args": {"every_n_steps": 41, "batch": "fixed", "probe_size": 1024, "prefix": "hessian_probe"}},
        {"class_path": "figures.epoch_loss.FullTrainLoss", "init_args": {"max_batches": None}},
    ]
    no_probe = make_figures.fit_args(runs["constant/mlp_ce_lr0.1"], "synthetic", "data", logs,
                                     datasets=spec["datasets"], with_probe=False)
    assert all(c["init_args"].get("prefix") is None for c in _callbacks(no_probe))
    assert _flag(make_figures.fit_args(runs["cyclic/lenet1_mse"], "synthetic", "data", logs, datasets=spec["datasets"]),
                 "lr_scheduler.init_args.step_size_up") == "100"
    assert _flag(mlp, "lr_scheduler.init_args.step_size_up") is None
    qn = _callbacks(make_figures.fit_args(runs["quasi_newton/mlp_ce"], "cifar", "/x", logs, datasets=spec["datasets"]))
    assert [c["class_path"].rsplit(".", 1)[1] for c in qn] == ["QuasiNewtonLR", "FullTrainLoss"]  # decides D only
    spectrum = make_figures.fit_args(runs["spectrum/mlp_ce_lr0.1"], "synthetic", "data", logs, datasets=spec["datasets"])
    assert _flag(spectrum, "trainer.max_epochs") == "1" and _flag(spectrum, "trainer.max_steps") == "-1"
    assert _callbacks(spectrum)[0] == {"class_path": "lyapunov_callbacks.HessianEigenvalueMonitor",
                                       "init_args": {"every_n_steps": 10, "k": 14}}
    # digits: the whole data module replaced, two classes even against odd with label noise; ResNet18 on ten
    dig = make_figures.fit_args(runs["constant/mlp_ce_lr0.1"], "digits", "data", logs, datasets=spec["datasets"])
    data = json.loads(_flag(dig, "data"))
    assert data == {"class_path": "lyapunov_callbacks.datamodules.digits.DigitsDataModule",
                    "init_args": {"classes": [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]], "label_noise": 0.1,
                                  "batch_size": 128}}
    # the full-batch controls: one batch of 1,438 images; on synthetic a training set of that size
    gd = make_figures.fit_args(runs["control_gd/mlp_mse_lr0.05"], "synthetic", "data", logs, datasets=spec["datasets"])
    assert _flag(gd, "data.init_args.synthetic_train_size") == "7190" and _flag(gd, "data.init_args.batch_size") == "1438"
    gd_digits = json.loads(_flag(make_figures.fit_args(runs["control_gd/mlp_mse_lr0.05"], "digits", "data", logs,
                                                       datasets=spec["datasets"]), "data"))
    assert gd_digits["init_args"]["batch_size"] == 1438 and "synthetic_train_size" not in gd_digits["init_args"]
    dig10 = make_figures.fit_args(runs["resnet18_comparison/cyclic"], "digits", "data", logs, datasets=spec["datasets"])
    assert json.loads(_flag(dig10, "data"))["init_args"]["classes"] is None
    cifar = make_figures.fit_args(runs["constant/mlp_ce_lr0.1"], "cifar", "/x/y", logs, datasets=spec["datasets"])
    assert _flag(cifar, "data.init_args.data_dir") == "/x/y" and _flag(cifar, "data.init_args.synthetic") is None


def test_list_and_titles(spec, capsys):
    assert make_figures.main(["--list", "--quick", "--data", "synthetic", "--only", "fig10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 runs (3 with seeds), data=synthetic, mode=quick")
    runs = make_figures.plan_runs(spec, list(spec["figures"]))
    title = make_figures.figure_title(spec, "fig5", runs, "digits")
    assert title.startswith("Figure 5: constant α = 0.1\ndata: digits; ")
    assert "1000 steps × batch 128" in title and "seed" in title


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
    with pytest.raises(ValueError, match=r"figures.fig1.runs must be len\(rows\) x len\(cols\) = 3 x 3"):
        make_figures.load_spec(path)
    bad = yaml.safe_load((ROOT / "figures" / "figures.yaml").read_text())
    bad["scales"]["full"]["mlp"]["batchsize"] = 8
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"scales.full.mlp lacks \[\] / has unknown keys \['batchsize'\]"):
        make_figures.load_spec(path)
    assert make_figures.main(["--spec", str(path), "--list"]) == 2


ADAMW_RUNS = [[f"adamw/mlp_ce_lr{lr}" for lr in ("0.0003", "0.001", "0.003")]]  # TinyResNet row cut (budget)


def test_adamw_figure_is_planned_and_skipped_with_a_note_while_its_run_files_are_missing(tmp_path, capsys):
    spec = yaml.safe_load((ROOT / "figures" / "figures.yaml").read_text())
    fig = spec["figures"]["adamw"]
    assert fig["runs"] == ADAMW_RUNS and fig["kind"] == "preconditioned" and fig["optional"]
    # a checkout without (some of) the run files: a note naming them, no runs, no crash, exit 0
    fake = {"adamw/mlp_ce_lr0.0003": {"config": "adamw/does_not_exist"}}
    spec["runs"].update(fake)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    loaded = make_figures.load_spec(path)
    notes = make_figures.skipped_figures(loaded, ["adamw", "fig1"])
    assert list(notes) == ["adamw"] and "configs/adamw/does_not_exist.yaml" in notes["adamw"]
    assert make_figures.plan_runs(loaded, ["adamw"]) == []
    assert make_figures.main(["--spec", str(path), "--list", "--only", "adamw", "fig10"]) == 0
    captured = capsys.readouterr()
    assert "note: adamw: skipped:" in captured.err and "does_not_exist" in captured.err
    assert captured.out.startswith("3 runs (3 with seeds)")
    # drawing from logs: the skipped figure is neither drawn nor counted as failed
    assert make_figures._plot(loaded, ["adamw"], [], make_figures._parser().parse_args(
        ["--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "out")])) == []
    # once the files exist the figure's six runs are planned at the MLP / TinyResNet scales
    for row in ADAMW_RUNS:
        for name in row:
            spec["runs"][name] = {"config": "constant/mlp_ce_lr0.1"}
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    loaded = make_figures.load_spec(path)
    assert make_figures.skipped_figures(loaded, ["adamw"]) == {}
    runs = make_figures.plan_runs(loaded, ["adamw"])
    assert [r.name for r in runs] == [n for row in ADAMW_RUNS for n in row]
    assert all(r.figures == ["adamw"] for r in runs)


def test_predicted_cost_adds_up_the_measured_rates(spec):
    """predict_seconds on made-up rates, checked against the arithmetic of its docstring by hand."""
    rates = {"mlp": {"batch": 128, "probe": 1024, "step_cpu_s": 0.05, "fwd_sample_cpu_s": 1e-4,
                     "hvp_batch_cpu_s": 0.1, "hvp_probe_cpu_s": 0.5}}
    runs = {r.name: r for r in make_figures.plan_runs(spec, list(spec["figures"]))}
    run = runs["constant/mlp_ce_lr0.1"]
    s, cost = run.scale, spec["cost"]
    p = make_figures.predict_seconds(run, "synthetic", rates, spec)
    n_train, n_val = spec["datasets"]["synthetic"]["sizes"]["two_class"]
    per_epoch = s["epoch_batches"] or -(-n_train // s["batch_size"])
    epochs = -(-s["max_steps"] // per_epoch)
    b = s["batch_size"] / 128
    assert p["steps"] == s["max_steps"] and p["epochs"] == epochs
    assert p["train"] == pytest.approx(s["max_steps"] * 0.05 * b)
    assert p["hessian"] == pytest.approx(-(-s["max_steps"] // s["hessian_every"]) * cost["hvps_per_estimate"] * 0.1 * b)
    assert p["probe"] == pytest.approx(-(-s["max_steps"] // s["probe_every"]) * cost["hvps_per_probe_estimate"] * 0.5
                                       * min(s["probe_size"], n_train) / 1024)
    assert p["lyapunov"] == pytest.approx(-(-s["max_steps"] // s["lyapunov_every"]) * s["lyapunov_window"] * 0.1 * b)
    full = n_train if s["full_loss_batches"] is None else min(n_train, 512 * s["full_loss_batches"])
    val = n_val if s["val_batches"] is None else min(n_val, s["val_batches"] * s["batch_size"])
    assert p["full_loss"] == pytest.approx((epochs + 1) * full * 1e-4)
    assert p["validation"] == pytest.approx(epochs * val * 1e-4)
    assert p["cpu_s"] == pytest.approx(sum(p[k] for k in ("train", "hessian", "probe", "lyapunov", "full_loss",
                                                           "validation", "overhead")))
    # an architecture without rates is reported, not guessed; the plan packs the seeds on the workers
    assert make_figures.predict_seconds(runs["constant/lenet1_ce_lr0.1"], "synthetic", rates, spec) == {}
    plan = make_figures.predict_plan([run, runs["constant/lenet1_ce_lr0.1"]], "synthetic", rates, spec, jobs=2)
    assert plan["unmeasured"] == ["constant/lenet1_ce_lr0.1"]
    seeds = len(run.seeds)
    assert plan["cpu_s"] == pytest.approx(seeds * p["cpu_s"])
    assert plan["wall_s"] == pytest.approx(-(-seeds // 2) * p["cpu_s"])


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
    """Two linear runs of 6 steps through the real CLI: overrides reach the trainer, figure, summary and page."""
    spec = yaml.safe_load((ROOT / "figures" / "figures.yaml").read_text())
    lin = {"batch_size": 16, "max_steps": 6, "epoch_batches": 3, "val_batches": 1, "log_every": 1,
           "hessian_every": 1, "probe_every": None, "probe_size": 16, "lyapunov_window": 2, "lyapunov_every": None,
           "seeds": 2, "cyclic_half": 3, "full_loss_batches": 1}
    tiny = {"datasets": spec["datasets"], "cost": spec["cost"], "scales": {"full": {"linear": lin}, "quick": {"linear": lin}},
            "figures": {"tiny": {"title": "tiny", "rows": ["linear"], "cols": ["cyclic", "quasi-Newton"],
                                 "runs": [["cyclic/linear_ce", "quasi_newton/linear_mse"]]},
                        "ctrl": {"title": "control", "rows": ["GD"], "cols": ["full batch"],
                                 "runs": [["control_gd/linear_mse_lr0.05"]]}},
            # a full-batch control: the whole (64-image) two-class training set in one batch every step
            "runs": {"control_gd/linear_mse_lr0.05": {
                "config": "constant/linear_mse_lr0.05", "seeds": 1, "batch_size": 64, "epoch_batches": None,
                "lyapunov_window": None, "data_init": {"synthetic": {"synthetic_train_size": 320}},
                "sizes": {"synthetic": [64, 2000]}}}}
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(tiny))
    logs, out, page = tmp_path / "logs", tmp_path / "figs" / "synthetic", tmp_path / "results.md"
    # --jobs 2: the pool of spawned single-threaded workers that `make figures` uses by default
    code = make_figures.main(["--spec", str(spec_path), "--logs", str(logs), "--out", str(out), "--jobs", "2",
                              "--summary-dir", str(tmp_path / "summary"), "--page", str(page)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    for run in ("cyclic/linear_ce", "quasi_newton/linear_mse"):
        for seed in (0, 1):
            assert f"{run} seed {seed}: " in stdout
    assert "trained 5/5 runs" in stdout and "(2 at a time)" in stdout
    assert (out / "tiny.png").stat().st_size > 10_000 and (out / "ctrl.png").stat().st_size > 10_000

    from lyapunov_callbacks.analysis.tb_reader import read_scalars

    for seed in (0, 1):
        cyclic = read_scalars(logs / f"cyclic/linear_ce/synthetic/seed{seed}")
        # triangular CyclicLR 0.05 <-> 0.3 with step_size_up = cyclic_half = 3, stepped every batch
        np.testing.assert_array_equal(cyclic["optim/lr"].steps, np.arange(6))
        np.testing.assert_allclose(cyclic["optim/lr"].values, [0.05, 0.05 + 0.25 / 3, 0.05 + 0.5 / 3, 0.3,
                                                               0.05 + 0.5 / 3, 0.05 + 0.25 / 3], rtol=1e-6)
        np.testing.assert_array_equal(cyclic["lyapunov/lambda"].steps, [1, 3, 5])  # windows of 2 steps
        # the full-training-set loss at every epoch start (steps 0, 3) and at the end (6)
        assert cyclic["train_full/loss"].steps.tolist() == [0, 3, 6]
    qn = read_scalars(logs / "quasi_newton/linear_mse/synthetic/seed0")
    np.testing.assert_allclose(qn["quasi_newton/lr"].values, qn["hessian/inv_h0"].values, rtol=1e-6)
    summary = json.loads((tmp_path / "summary" / "summary_synthetic.json").read_text())
    rows = {r["name"]: r for r in summary["runs"]}
    assert rows["cyclic/linear_ce"]["seeds"] == 2 and rows["quasi_newton/linear_mse"]["seeds"] == 2
    text = page.read_text()
    assert "## Data set: synthetic" in text and "Not run: no `docs/results/summary_cifar.json`" in text
    # the control: every step is an epoch (one batch of the whole set), α·h0 measured; on the page with its answer
    gd = read_scalars(logs / "control_gd/linear_mse_lr0.05/synthetic/seed0")
    assert gd["train_full/loss"].steps.tolist() == list(range(7)) and gd["hessian/h0"].steps.size == 6
    assert rows["control_gd/linear_mse_lr0.05"]["schedule"] == "control_gd"
    assert "- **Controls**: full-batch GD `control_gd/linear_mse_lr0.05`: late α·h0 " in text
    assert "late estimates; known answer: 2)" in text


def test_page_only_rewrites_the_committed_page_from_the_committed_summaries(tmp_path, capsys):
    """The committed results page is what the generator makes of the committed summaries (nothing trained)."""
    page = tmp_path / "results.md"
    assert make_figures.main(["--page-only", "--page", str(page)]) == 0
    assert f"results page: {page}" in capsys.readouterr().out
    # written outside docs/, the page links the figures by absolute path; the committed one by docs/-relative path
    text = page.read_text().replace((ROOT / "docs").as_posix() + "/", "")
    committed = (ROOT / "docs" / "results.md").read_text()
    assert text == committed, "docs/results.md is stale: run `make figures FIGURES_ARGS=--page-only`"
    assert "Reproducibility: on one machine a run is deterministic" in committed
    # the verdict in words comes first, then data, scale and limitations (with what λ ≈ 0 cannot tell apart)
    assert committed.index("## Verdict") < committed.index("## Data, scale and limitations") < committed.index(
        "## Criteria") < committed.index("## Data set: synthetic")
    assert make_figures.LIMITATIONS[0] in committed and "λ ≈ 0 does not tell A from B" in committed


def test_plot_only_keeps_the_training_record_of_the_same_logs(tmp_path):
    trained = {"mode": "full", "runs": 55, "seeded runs": 105, "probe h0": "measured",
               "training wall time (s)": 3505.7, "training CPU time (s)": 6411.7, "runs at a time": 2,
               "load average at the end (1 min)": 1.56, "steps/s (first seed's arch)": '{"mlp": 21.82}'}
    path = tmp_path / "summary_digits.json"
    path.write_text(json.dumps({"meta": trained, "runs": []}))
    now = {"mode": "full", "runs": 55, "seeded runs": 105, "probe h0": "measured"}
    assert make_figures.kept_training_meta(path, now) == {k: trained[k] for k in make_figures.TRAINING_META}
    # other logs (a different count of runs, or the quick mode), or no summary yet: nothing is carried over
    assert make_figures.kept_training_meta(path, {**now, "seeded runs": 104}) == {}
    assert make_figures.kept_training_meta(path, {**now, "mode": "quick"}) == {}
    assert make_figures.kept_training_meta(tmp_path / "absent.json", now) == {}
