"""``docs/quasi-newton-rules.md``: its code runs as written and its measured table is the results file's."""

import os
import re


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "quasi-newton-rules.md")


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def test_every_python_block_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", _read(DOC), flags=re.S)
    assert len(blocks) == 3
    for block in blocks:
        namespace = {}
        exec(compile(block, DOC, "exec"), namespace)
    rule = namespace["rule"]
    # Measured at every step; a step whose momentum buffer points uphill on its batch (gᵀb ≤ 0) is rejected,
    # which on this random-target data happens, but rarely.
    assert rule.num_estimates == 40 and rule.rejected_estimates < 10
    assert rule.min_lr < rule.lr < rule.max_lr


def test_measured_tables_are_the_results_files():
    doc = _read(DOC)
    sources = re.findall(r"`(benchmarks/results/[\w.]+\.md)`", doc)
    assert sources, "the measured section names its results file"
    quoted = [line for line in doc.splitlines() if line.startswith(("| digits ", "| synthetic "))]
    assert quoted
    results = "\n".join(_read(os.path.join(ROOT, s)) for s in sorted(set(sources)))
    for line in quoted:
        assert line in results.splitlines(), line
