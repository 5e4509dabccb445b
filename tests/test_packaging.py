"""The built wheel installs one top-level package: `models/` and `datamodules/` go under our namespace."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_only_the_lyapunov_callbacks_namespace(tmp_path):
    # --no-build-isolation: build with the venv's setuptools (the `dev` extra pins one with bdist_wheel), offline.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO_ROOT)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("lyapunov_callbacks-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"lyapunov_callbacks"}, top_level
    assert "lyapunov_callbacks/models/mlp.py" in names
    assert "lyapunov_callbacks/datamodules/cifar10.py" in names
    assert "lyapunov_callbacks/datamodules/digits.py" in names


def test_models_and_datamodules_import_from_the_namespace():
    from lyapunov_callbacks.datamodules import CIFAR10DataModule, DigitsDataModule
    from lyapunov_callbacks.models import MLP

    assert MLP.__module__ == "lyapunov_callbacks.models.mlp"
    assert CIFAR10DataModule.__module__ == "lyapunov_callbacks.datamodules.cifar10"
    assert DigitsDataModule.__module__ == "lyapunov_callbacks.datamodules.digits"
