"""The AdamW run files (configs/adamw/): the exact names the figures use, and what their pieces configure."""

from __future__ import annotations

from pathlib import Path

import yaml

from lyapunov_callbacks.cli import run_cli

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
NAMES = [f"{arch}_ce_lr{lr}" for arch in ("mlp", "tinyresnet") for lr in ("0.0003", "0.001", "0.003")]


def test_the_adamw_run_files_are_exactly_the_six_named_ones():
    assert sorted(p.stem for p in (CONFIG_ROOT / "adamw").glob("*.yaml")) == sorted(NAMES)
    for name in NAMES:
        raw = yaml.safe_load((CONFIG_ROOT / "adamw" / f"{name}.yaml").read_text())
        assert raw["config"] == "../base/adamw.yaml"
        assert raw["trainer.callbacks"] == "../callbacks/adamw_monitors.yaml"
        assert raw["optimizer.init_args.lr"] == float(name.rsplit("lr", 1)[1])


def test_adamw_run_file_resolves_to_adamw_and_monitors_that_log_pre_h0(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["lyapunov-cli"])
    path = CONFIG_ROOT / "adamw" / "tinyresnet_ce_lr0.003.yaml"
    parsed = run_cli(["--config", str(path), "--trainer.default_root_dir", str(tmp_path),
                      "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.init_args.download", "false"],
                     run=False)
    opt = parsed.config["optimizer"]
    assert opt["class_path"] == "torch.optim.AdamW"
    assert opt["init_args"]["lr"] == 0.003 and opt["init_args"]["weight_decay"] == 0.01
    assert "momentum" not in opt["init_args"]  # the base's SGD group is replaced, not merged
    monitors = {type(cb).__name__: cb for cb in parsed.trainer.callbacks}
    hessian = monitors["HessianEigenvalueMonitor"]
    assert hessian.pre_h0 is True and hessian.batch_sharpness is True and hessian.prefix == "hessian"
    lyap = monitors["LyapunovExponentMonitor"]
    assert lyap.prefix == "lyapunov" and lyap.window == 10 and lyap.every_n_steps == 50
