"""The cadence benchmark (``benchmarks/cadence.py``): its error measures on hand-made curves, and its quick run."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "benchmarks") not in sys.path:  # the scripts import benchmarks/_common.py
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _load():
    spec = importlib.util.spec_from_file_location("cadence_benchmark", os.path.join(ROOT, "benchmarks", "cadence.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_running_median_interpolation_and_percentile_on_hand_made_curves():
    bench = _load()
    # centred median of 3, the window cut at the ends
    assert bench.running_median([1.0, 9.0, 2.0, 8.0, 3.0], 1) == [5.0, 2.0, 8.0, 3.0, 5.5]
    # linear between the estimates, flat before the first and after the last
    points = {10: 1.0, 20: 3.0, 40: 2.0}
    assert bench.interpolate(points, [0, 10, 15, 20, 30, 40, 55]) == [1.0, 1.0, 2.0, 3.0, 2.5, 2.0, 2.0]
    assert bench.percentile([3.0, 1.0, 2.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)
    assert bench.percentile([7.0], 0.9) == 7.0
    # an estimate at every reference step of a curve equal to the reference tracks it exactly
    steps = list(range(0, 50, 5))
    ref = [1.0 + 0.1 * s for s in steps]
    assert bench.tracking_errors(dict(zip(steps, ref)), steps, ref) == [0.0] * len(steps)
    # a curve 10 % above the reference everywhere: error 0.1 at every step
    errs = bench.tracking_errors({0: 1.1, 45: 1.1 * ref[-1]}, [0, 45], [1.0, ref[-1]])
    assert errs == pytest.approx([0.1, 0.1])


@pytest.mark.slow
def test_quick_run_prints_every_variant_with_finite_numbers(tmp_path):
    import logging

    # main() quiets Lightning's logger for its fits; put the level back for the tests that read its messages.
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    bench = _load()
    out = tmp_path / "cadence.md"
    try:
        result = bench.main(["--quick", "--threads", "1", "--out", str(out)])["small"]
    finally:
        lightning_logger.setLevel(level)
    text = out.read_text()
    assert "Load before: `" in text and "load average" in text
    assert "Every fit trains bit-identical weights to the plain fit: yes." in text
    assert result["identical"]
    rows = [line for line in text.splitlines() if line.startswith("| every ") or line.startswith("| auto")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == list(bench.VARIANTS)
    for name, row in result["table"].items():
        assert row["estimates"] >= 1 and row["hvps"] > 0
        assert 0.0 <= row["median"] <= row["p90"] <= row["max"] < 10.0
        assert row["wall"] > 0 and row["cpu"] > 0
        assert row["same_steps"]
    # the fixed cadences estimate at their multiples; auto starts at min_every intervals
    assert result["table"]["every 10"]["steps"] == list(range(0, 60, 10))
    assert result["table"]["auto, drift_tol 0.05"]["steps"][:2] == [0, 10]
    assert "Targets of `auto, drift_tol 0.05`:" in text


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def test_benchmarks_readme_quotes_the_committed_results_file():
    results = open(os.path.join(ROOT, "benchmarks", "results", "cadence.md"), encoding="utf-8").read()
    readme = open(os.path.join(ROOT, "benchmarks", "README.md"), encoding="utf-8").read()
    bench = _load()
    models = results.split("\n## Cadence of ")[1:]
    assert len(models) == 2 and "64-256-256-10" in models[0] and "3072-512-512-2" in models[1]
    tables = [{_cells(line)[0]: _cells(line) for line in m.splitlines() if line.startswith("| ")} for m in models]
    section = readme.split("## Measuring as often as h0 moves")[1].split("\n## ")[0]
    for model, table in zip(models, tables):
        assert set(bench.VARIANTS) <= set(table)
        for name in bench.VARIANTS:  # each model's table is the results file's, row for row
            row = next(line for line in model.splitlines() if line.startswith(f"| {name} |"))
            assert row in section
    prose = " ".join(section.split())  # the prose, line breaks as spaces
    small, big = tables
    auto, ten = small["auto, drift_tol 0.05"], small["every 10"]
    # the numbers the bullets quote: estimates, median, p90, CPU and wall ratios
    assert f"median error {auto[4]} ≤ 0.05 and 90th percentile {auto[5]} ≤ 0.20" in prose
    assert f"(every 10 steps: {ten[4]} and {ten[5]})" in prose
    assert f"with {auto[1].split()[0]} estimates instead of 100, at {auto[8]} CPU / {auto[7]} wall" in prose
    assert f"every-10 row costs {ten[8]}" in prose and f"even every 100 steps costs {small['every 100'][8]}" in prose
    auto, fifty = big["auto, drift_tol 0.05"], big["every 50"]
    assert f"`auto` spends {auto[1].split()[0]} estimates" in prose
    assert f"median error of {auto[4]} and a 90th percentile of {auto[5]} at {auto[8]} CPU" in prose
    assert f"worse than every 50 steps ({fifty[4]} and {fifty[5]} at {fifty[8]})" in prose
    assert f"only to {big['every 10'][4]}" in prose
    # the verdict words follow the numbers: met on the small model's accuracy, missed on the README MLP's
    assert float(small["auto, drift_tol 0.05"][4]) <= 0.05 and float(small["auto, drift_tol 0.05"][5]) <= 0.20
    assert float(auto[4]) > 0.05 and float(auto[5]) > 0.20 and float(auto[8].rstrip("×")) > 1.2
