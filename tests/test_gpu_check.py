"""``benchmarks/gpu_check.sh --tiny`` runs on a CPU and prints its one table with every row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~70 s of CPU time (tiny fits through Lightning)
def test_gpu_check_tiny_runs_and_prints_every_row():
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    rows = [line.split("|")[1].strip() for line in lines[1:]]
    assert [r.split(" (")[0] for r in rows] == [
        "hvp MLP 3072-16-10", "hvp LeNet1", "hvp TinyResNet", "monitor TinyResNet / 2", "monitor TinyResNet / 3",
        "h0 vs PyHessian", "cpu == cpu",
    ]
    agreement = lines[-1]
    assert "match" in agreement and "MISMATCH" not in agreement
    # Every HVP row has three positive finite ratios.
    for line in lines[1:4]:
        ratios = [float(c.split()[-1].rstrip("×")) for c in line.split("|")[3:6]]
        assert all(0 < r < 1e3 for r in ratios), line
