"""The cadence benchmark (``benchmarks/cadence.py``): its error measures on hand-made curves, and its quick run."""

import os

import pytest

from scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_running_median_interpolation_and_percentile_on_hand_made_curves():
    bench = load_script("benchmarks/cadence.py", "cadence_benchmark")
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



def test_best_placement_finds_the_kinks_of_a_piecewise_linear_curve():
    bench = load_script("benchmarks/cadence.py", "cadence_benchmark")
    # a trend with kinks at indices 4 and 9: three estimates placed there (and at 0) track it exactly
    trend = [1.0 + i for i in range(5)] + [5.0 + 3 * i for i in range(1, 6)] + [20.0] * 5
    chosen = bench.best_placement(trend, trend, 3)
    assert chosen == [0, 4, 9]
    steps = [5 * i for i in range(len(trend))]
    assert bench.tracking_errors({steps[i]: trend[i] for i in chosen}, steps, trend) == pytest.approx([0.0] * 15)
    # one estimate can only be the first, held flat; more estimates than points take every point
    assert bench.best_placement(trend, trend, 1) == [0]
    assert bench.best_placement(trend[:4], trend[:4], 9) == [0, 1, 2, 3]


def _quick_run(bench, out, *extra: str) -> dict:
    """``main(["--quick", ...])``'s small-model result; main() quiets Lightning's logger for its fits, and the
    level is put back for the tests that read its messages."""
    import logging

    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    try:
        return bench.main(["--quick", *extra, "--threads", "1", "--out", str(out)])["small"]
    finally:
        lightning_logger.setLevel(level)


@pytest.mark.slow
def test_quick_run_prints_every_variant_with_finite_numbers(tmp_path):
    bench = load_script("benchmarks/cadence.py", "cadence_benchmark")
    out = tmp_path / "cadence.md"
    result = _quick_run(bench, out)
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


@pytest.mark.slow
def test_the_floor_run_measures_the_noise_and_the_placement_error_of_the_reference(tmp_path):
    out = tmp_path / "cadence_floor.md"
    result = _quick_run(load_script("benchmarks/cadence.py", "cadence_benchmark"), out, "--floor")
    text = out.read_text()
    assert 0.0 <= result["noise"]["median"] <= result["noise"]["p90"] < 10.0
    # 60 steps: as many estimates as every 100 and every 50 steps is one, the first step's, held flat
    assert list(result["placement"]) == [1] and result["placement"][1]["steps"] == [0]
    assert "| noise floor: the reference's own estimates against the trend | 12 |" in text
    assert "| placement error alone: the trend at the best 1 steps (as many as every 100) | 1 |" in text


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def test_benchmarks_readme_quotes_the_committed_results_file():
    results = open(os.path.join(ROOT, "benchmarks", "results", "cadence.md"), encoding="utf-8").read()
    readme = open(os.path.join(ROOT, "benchmarks", "README.md"), encoding="utf-8").read()
    bench = load_script("benchmarks/cadence.py", "cadence_benchmark")
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


def test_benchmarks_readme_quotes_the_committed_floor_file():
    floor = open(os.path.join(ROOT, "benchmarks", "results", "cadence_floor.md"), encoding="utf-8").read()
    readme = open(os.path.join(ROOT, "benchmarks", "README.md"), encoding="utf-8").read()
    prose = " ".join(readme.split("## Measuring as often as h0 moves")[1].split("\n## ")[0].split())
    models = floor.split("\n## Reference run of ")[1:]
    assert len(models) == 2 and "64-256-256-10" in models[0] and "3072-512-512-2" in models[1]
    rows = [[_cells(line) for line in m.splitlines() if line.startswith("| ") and "---" not in line] for m in models]
    (small_noise, small_ten), (big_noise, big_ten) = [
        (next(r for r in rs if r[0].startswith("noise floor")),
         next(r for r in rs if r[0].startswith("placement error alone") and r[1] == "10")) for rs in rows
    ]
    assert f"lie a median {small_noise[2]} and a 90th percentile {small_noise[3]} from the smoothed trend" in prose
    assert f"and {big_noise[2]} and {big_noise[3]} on the README MLP" in prose
    assert f"track it to {small_ten[2]} and {small_ten[3]} (small MLP) and {big_ten[2]} and {big_ten[3]}" in prose
    # the verdict words follow the numbers: below the README MLP's floor, at the small MLP's
    assert float(big_noise[2]) > 0.05 and float(big_noise[3]) > 0.20
    assert abs(float(small_noise[2]) - 0.05) < 0.01 and float(small_ten[2]) < 0.05 and float(small_ten[3]) < 0.20


def test_the_model_labels_state_the_models_parameter_counts():
    import re

    import _common as C

    for which, label in C.MODELS.items():
        count = int(re.search(r"\(([\d,]+) params\)", label).group(1).replace(",", ""))
        assert sum(p.numel() for p in C.model_module(which, seed=0).parameters()) == count, which
