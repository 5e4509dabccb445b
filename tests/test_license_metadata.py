"""The package metadata uses PEP 639's license expression, and building it raises no setuptools deprecation."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_metadata_has_the_spdx_license_and_the_build_warns_about_none(tmp_path):
    # --no-build-isolation: the venv's setuptools (the `dev` extra requires one that reads `license = "MIT"`).
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path),
         str(REPO_ROOT)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    log = built.stdout + built.stderr
    assert "project.license` as a TOML table is deprecated" not in log
    assert "License classifiers are deprecated" not in log
    (wheel,) = tmp_path.glob("lyapunov_callbacks-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        lines = zf.read(meta).decode().splitlines()
    assert "License-Expression: MIT" in lines
