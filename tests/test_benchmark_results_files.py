"""Benchmarks that write their printed tables to a results file: ``_common.recorded`` and ``monitor_overhead``."""

import os

import pytest

from scripts import load_script


def test_recorded_writes_what_was_printed_with_the_command_and_load(tmp_path, capsys):
    common = load_script("benchmarks/_common.py")
    out = tmp_path / "r.md"
    with common.recorded(str(out), "some_bench.py", ["--threads", "1"], "Some benchmark"):
        print("| a | b |\n|---|---|\n| 1 | 2 |")
    text = out.read_text()
    assert text.startswith("# Some benchmark\n\nProduced by `python benchmarks/some_bench.py --threads 1` (")
    assert "Load before: `" in text and "; after: `" in text
    assert text.endswith("| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "| 1 | 2 |" in capsys.readouterr().out  # still printed
    with common.recorded(None, "some_bench.py", [], "Not written"):
        print("only printed")
    assert os.listdir(tmp_path) == ["r.md"]  # out=None: printed only


def test_out_path_is_the_results_file_for_a_full_run_only(tmp_path):
    common = load_script("benchmarks/_common.py")
    parse = lambda argv: common.parse_args("x", argv, extra=lambda p: common.add_out_argument(p, "x.md"))  # noqa: E731
    assert common.out_path(parse([]), "x.md") == common.results_path("x.md")
    assert common.out_path(parse(["--quick"]), "x.md") is None
    assert common.out_path(parse(["--quick", "--out", str(tmp_path / "y.md")]), "x.md") == str(tmp_path / "y.md")


@pytest.mark.slow
def test_monitor_overhead_quick_run_writes_every_variant(tmp_path):
    import logging

    # main() quiets Lightning's logger for its fits; put the level back for the tests that read its messages.
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    bench = load_script("benchmarks/monitor_overhead.py")
    out = tmp_path / "mo.md"
    try:
        bench.main(["--quick", "--models", "small", "--steps", "10", "--repeats", "1", "--threads", "1",
                    "--out", str(out)])
    finally:
        lightning_logger.setLevel(level)
    text = out.read_text()
    assert text.startswith("# Monitor overhead")
    for name in bench._variants():
        assert f"| {name} |" in text
    # one repetition: its own ratio is the median ratio, so the range beside it is that one number
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    rows = [cells for cells in rows if cells[0] in bench._variants()]
    assert len(rows) == len(bench._variants())
    for cells in rows:
        low, high = (float(x) for x in cells[3].split("–"))
        assert low == high and abs(low - float(cells[2])) <= 0.006, cells


def test_suite_timer_reads_pytests_summary_line():
    timer = load_script("benchmarks/test_suite_time.py")
    assert timer.parse_summary("....\n934 passed, 284 warnings in 582.05s (0:09:42)\n") == {
        "passed": 934, "failed": 0, "skipped": 0, "seconds": 582.05}
    assert timer.parse_summary("= 2 failed, 930 passed, 1 skipped, 1 error in 9.50s =") == {
        "passed": 930, "failed": 3, "skipped": 1, "seconds": 9.5}
    with pytest.raises(ValueError, match="no pytest summary line"):
        timer.parse_summary("ERROR: file or directory not found")


def test_suite_timer_records_a_passing_run_and_nothing_for_a_failing_one(tmp_path, capsys):
    timer = load_script("benchmarks/test_suite_time.py")
    (tmp_path / "test_ok.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    (tmp_path / "test_bad.py").write_text("def test_one():\n    assert 1 + 1 == 3\n")
    out = tmp_path / "suite.md"
    assert timer.main(["--out", str(out), "--", str(tmp_path / "test_ok.py")]) == 0
    row = [line for line in out.read_text().splitlines() if line.startswith("| 1 ")]
    assert len(row) == 1 and "min" in row[0] and "Load before:" in out.read_text()
    out.unlink()
    assert timer.main(["--out", str(out), "--", str(tmp_path / "test_bad.py")]) == 1
    assert not out.exists()
