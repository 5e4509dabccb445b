"""The GPT benchmarks run and write every row (quick runs), and the docs quote their committed results verbatim."""

import math
import os
import re

import pytest

from scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "compiled-and-transformers.md")
pytestmark = pytest.mark.filterwarnings("ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning")


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| variant") and not line.startswith("| step")]


@pytest.mark.slow
def test_gpt_overhead_quick_run_writes_every_variant_with_finite_times(tmp_path):
    import logging

    level = logging.getLogger("lightning.pytorch").level
    out = tmp_path / "g.md"
    try:
        load_script("benchmarks/gpt_overhead.py").main(["--quick", "--steps", "10", "--repeats", "1", "--out", str(out)])
    finally:
        logging.getLogger("lightning.pytorch").setLevel(level)
    rows = _rows(out.read_text())
    assert [r[0] for r in rows] == ["plain", "h0 + pre_h0 + batch sharpness / 10", "λ window 10 / 50",
                                    "both (the run file)"]
    assert all(float(r[1]) > 0 and math.isfinite(float(r[2])) for r in rows)
    assert rows[0][2] == "1.00"
    assert float(rows[1][5]) >= 2  # an estimate: h0 and pre_h0 solves, and the batch sharpness


def _quoted_tables(doc: str) -> dict[str, list[str]]:
    """``results file -> table lines`` of the doc: each table follows a line naming its results file."""
    out: dict[str, list[str]] = {}
    current = None
    for line in doc.splitlines():
        named = re.search(r"`(benchmarks/results/[a-z_]+\.md)`", line)
        if named and not line.startswith("|"):
            current = named.group(1)
        elif line.startswith("|") and current is not None:
            out.setdefault(current, []).append(line)
    return out


def test_the_doc_quotes_its_tables_verbatim_from_the_committed_results():
    with open(DOC, encoding="utf-8") as fh:
        tables = _quoted_tables(fh.read())
    assert "benchmarks/results/gpt_overhead.md" in tables
    for results, lines in tables.items():
        with open(os.path.join(ROOT, results), encoding="utf-8") as fh:
            committed = fh.read().splitlines()
        for line in lines:
            assert line in committed, f"{line!r} is not in {results}"


def test_the_doc_quotes_the_training_time_and_validation_of_the_committed_run():
    with open(DOC, encoding="utf-8") as fh:
        doc = fh.read().splitlines()
    with open(os.path.join(ROOT, "benchmarks", "results", "gpt_training.md"), encoding="utf-8") as fh:
        committed = fh.read()
    quoted = [line for line in doc if re.match(r"^\d+ steps in \d+ s wall-clock|^Validation: ", line)]
    assert len(quoted) == 2
    assert all(line in committed for line in quoted)
