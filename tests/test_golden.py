"""The golden record: short seeded fits of every callback and option log exactly the stored scalars.

``tests/golden/scenarios.py`` defines the fits and regenerates ``tests/golden/records.json``; a change of what
the callbacks measure or log shows here as a list of (call, step, tag, value, stored value) differences.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).with_name("golden")))
import scenarios  # noqa: E402

STORED = json.loads(scenarios.RECORDS.read_text())
FAST = ["sgd_momentum", "sgd_options", "adamw", "adam_qn", "accumulate"]


def test_every_scenario_has_a_record():
    assert sorted(STORED) == sorted(scenarios.SCENARIOS)
    for name, records in STORED.items():
        assert len(records) >= 10, name  # each fit measured several times


@pytest.mark.parametrize("name", FAST)
def test_scenario_logs_the_stored_values_bit_for_bit(name):
    assert scenarios.differences(STORED[name], scenarios.run(name)) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resumed", "ddp"])
def test_slow_scenario_logs_the_stored_values_bit_for_bit(name):
    assert scenarios.differences(STORED[name], scenarios.run(name)) == []
