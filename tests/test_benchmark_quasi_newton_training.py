"""``benchmarks/quasi_newton_training.py``: a short run writes the table it prints, with finite numbers."""

import pytest

from scripts import load_script


@pytest.mark.slow
def test_a_short_run_writes_its_table_with_every_rule(tmp_path):
    bench = load_script("benchmarks/quasi_newton_training.py")
    out = tmp_path / "qn.md"
    table = bench.main(["--quick", "--steps", "4", "--out", str(out), "--threads", "1"])
    text = out.read_text()
    assert text.startswith("# Quasi-Newton LR against constant LRs") and text.rstrip().endswith(table)
    assert "--steps 4" in text
    rows = [line for line in table.splitlines()[2:]]
    # Two models, each with the constant-0.1 fit and the quasi-Newton fit of --quick.
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        loss, last_lr, seconds, ratio = float(cells[2]), float(cells[3]), float(cells[4]), float(cells[5])
        assert 0 < loss < 10 and last_lr > 0 and seconds > 0 and ratio > 0, row
    assert sum("quasi-Newton" in row for row in rows) == 2
    # The quasi-Newton rows end on the LR 1/h0 set: not the constant reference 0.1.
    assert all(float(r.strip("|").split("|")[3]) != 0.1 for r in rows if "quasi-Newton" in r)
