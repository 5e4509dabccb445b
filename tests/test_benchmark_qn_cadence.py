"""``benchmarks/qn_cadence.py``: QuasiNewtonLR's rule every 10 steps against ``"auto"`` on the lr_free tasks."""

import os

import pytest

from scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "qn_cadence.md")


@pytest.mark.slow  # two 30-step fits with warm-ups and re-estimates
def test_quick_run_compares_the_two_cadences_on_the_same_trajectory_start(tmp_path):
    bench = load_script("benchmarks/qn_cadence.py")
    out = tmp_path / "q.md"
    text = bench.main(["--quick", "--threads", "1", "--out", str(out)])
    row = next(line for line in text.splitlines() if line.startswith("| digits mlp ce |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    every, auto = float(cells[1]), float(cells[2])
    assert float(cells[3]) == pytest.approx(auto / every, abs=1e-3)
    estimates = [float(x) for x in cells[4].split(" / ")]
    # every 10 steps over 30 steps: the warm-up's and steps 10 and 20 (at least); auto starts at 10-step intervals
    assert estimates[0] >= 3 and estimates[1] >= 2
    assert "within 2% of every 10 steps' final loss on" in text and out.read_text().startswith("# QuasiNewtonLR")


def test_the_committed_results_state_every_task_and_the_summary():
    with open(RESULTS, encoding="utf-8") as fh:
        text = fh.read()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| task")]
    assert len(rows) == 16  # lr_free's tasks: 4 models x 2 losses x 2 data sets
    summary = next(line for line in text.splitlines() if line.startswith("`auto` within"))
    within = int(summary.split(" final loss on ")[1].split(" of ")[0])
    ratios = [float(r.strip("|").split("|")[3]) for r in rows]
    assert within == sum(r <= 1.02 for r in ratios)
