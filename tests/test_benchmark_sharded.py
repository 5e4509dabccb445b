"""``benchmarks/sharded.py``: its table is computed from the ranks' step records as stated, and the user guide quotes
the committed results verbatim."""

import json
import os
import re

import pytest

from scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "sharded.md")
GUIDE = os.path.join(ROOT, "docs", "user-guide.md")


def test_the_table_takes_medians_per_rank_and_reports_the_larger_rank(tmp_path):
    bench = load_script("benchmarks/sharded.py", "bench_sharded")

    def rows(plain, monitored, extra_plain, extra_monitored, shard):
        out = []
        for i, cpu in enumerate(plain):
            out.append({"step": 4 + 2 * i, "monitored": False, "cpu_s": cpu, "extra_peak_mb": extra_plain,
                        "shard_mb": shard, "hvps": 0})
        for i, cpu in enumerate(monitored):
            out.append({"step": 5 + 2 * i, "monitored": True, "cpu_s": cpu, "extra_peak_mb": extra_monitored,
                        "shard_mb": shard, "hvps": 12})
        return out

    (tmp_path / "gpt_rank0.json").write_text(json.dumps(rows([0.1, 0.2, 0.3], [2.0, 3.0, 4.0], 1.0, 3.0, 0.5)))
    (tmp_path / "gpt_rank1.json").write_text(json.dumps(rows([0.1, 0.1, 0.1], [1.0, 1.0, 1.0], 1.0, 6.0, 0.25)))
    line = bench._table(tmp_path, ["gpt"]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    # medians: plain 0.2 (rank 0) vs 0.1; monitored 3.0 vs 1.0; extra memory 2.0 vs 5.0 MB; shards 0.5 vs 0.25 MB
    assert cells == ["gpt", "220,544", "0.50", "0.200", "3.000", "15.0", "12", "5.0", "10.0"]


def test_the_user_guide_quotes_the_committed_results_verbatim():
    with open(RESULTS, encoding="utf-8") as fh:
        committed = fh.read().splitlines()
    with open(GUIDE, encoding="utf-8") as fh:
        guide = fh.read()
    section = guide.split("## Sharded training (FSDP2)", 1)[1].split("\n## ", 1)[0]
    quoted = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(quoted) == 3  # the header and the two models
    assert all(line in committed for line in quoted), quoted
    assert "TABLE" not in section
    # Every measured number of the prose after the table is one of the table's cells.
    cells = {c.strip() for line in quoted for c in line.strip("|").split("|")}
    prose = section.split(quoted[-1], 1)[1].split("**Refused", 1)[0]
    numbers = re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", prose)
    assert numbers and all(n in cells for n in numbers), numbers


@pytest.mark.parametrize("model", ["gpt", "mlp"])
def test_the_committed_results_hold_both_models_with_a_measured_estimate(model):
    with open(RESULTS, encoding="utf-8") as fh:
        rows = [line for line in fh.read().splitlines() if line.startswith(f"| {model} |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[4]) > float(cells[3]) > 0 and int(cells[6]) >= 2
