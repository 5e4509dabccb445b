"""``benchmarks/compiled_hvp.py``: the compiled product equals the autograd one and every row is printed."""

import re
import shutil

import pytest

from scripts import load_script


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_quick_run_matches_the_autograd_product(tmp_path):
    out = tmp_path / "c.md"
    text = load_script("benchmarks/compiled_hvp.py").main(["--quick", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert out.read_text().endswith(text)
    rows = [line for line in text.splitlines() if line.startswith("| MLP 64-256-256-10 |")]
    assert [int(r.split("|")[2]) for r in rows] == [1, 8]
    for row in rows:
        numbers = [float(c) for c in row.strip("|").split("|")[2:]]
        assert all(x > 0 for x in numbers), row
    difference = float(re.search(r"products differ by ([0-9.e+-]+)", text).group(1))
    assert difference < 1e-5
