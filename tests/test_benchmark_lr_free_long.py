"""The long-horizon benchmark of ``rule="batch_sharpness"`` (``benchmarks/lr_free_long.py --quick``) end to end."""

import pytest
import torch

from scripts import load_script


@pytest.mark.slow
def test_quick_run_prints_every_row_with_finite_numbers(tmp_path):
    pytest.importorskip("sklearn")
    lr_free_long = load_script("benchmarks/lr_free_long.py")
    out = tmp_path / "table.md"
    text = lr_free_long.main(["--quick", "--threads", "1", "--rows", "QN newton,QN sharpness,QN sharpness /5 wu50",
                              "--out", str(out)])
    assert out.read_text().endswith(text)
    rows = [line for line in text.split("## Every row")[1].splitlines() if line.startswith("| digits mlp ce sgd |")]
    assert [r.split(" | ")[1].split(" (")[0] for r in rows] == ["best", "QN newton", "QN sharpness",
                                                                 "QN sharpness /5 wu50"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        loss, ratio, time_ratio, grid_ratio = float(cells[2]), float(cells[3]), float(cells[5]), float(cells[6])
        assert 0.0 < loss < 10.0 and ratio > 0 and time_ratio > 0 and 0 < grid_ratio
        assert cells[4] == "0/1"                            # nothing diverges in 20 steps
    sharp = [r for r in rows if "| QN sharpness |" in r][0]
    assert sharp.strip("|").split("|")[-1].strip() == "20"  # one HVP per step
    assert float(rows[0].strip("|").split("|")[3]) == 1.0    # the best constant over itself


def test_qn_rows_use_the_rules_they_name():
    lr_free_long = load_script("benchmarks/lr_free_long.py")
    rule, backend = lr_free_long.qn_rule("QN sharpness /5 wu50", "momentum")
    assert (rule.rule, rule.every_n_steps, rule.warmup_steps, backend) == ("batch_sharpness", 5, 50,
                                                                            "finite_difference")
    assert rule.scale == 1.0  # the greedy step along d
    sparse, _ = lr_free_long.qn_rule("QN sharpness /10 wu50", "adamw")
    assert (sparse.every_n_steps, sparse.warmup_steps, sparse.scale) == (10, 50, 1.0)
    edge, _ = lr_free_long.qn_rule("QN sharpness ×2 /5 wu50", "sgd")
    assert (edge.rule, edge.scale, edge.every_n_steps, edge.warmup_steps) == ("batch_sharpness", 2.0, 5, 50)
    assert edge.lr_for(4.0) == 0.5  # α·s = 2
    rule, backend = lr_free_long.qn_rule("QN newton", "momentum")
    assert rule.rule == "newton" and rule.stability_factor == pytest.approx(1.9)
    assert lr_free_long.qn_rule("QN sharpness autograd", "sgd")[1] == "autograd"
    opt = lr_free_long.make_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], 1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == lr_free_long.ADAMW_DECAY
    assert all(len(grid) == 7 for grid in lr_free_long.GRIDS.values())


def test_data_option_loads_the_stand_in(monkeypatch):
    lr_free_long = load_script("benchmarks/lr_free_long.py")
    asked = []

    def load_data(name, train_size, val_size):
        asked.append((name, train_size, val_size))
        raise SystemExit("stop: only the data set asked for is checked")

    monkeypatch.setattr(lr_free_long.LF, "load_data", load_data)
    with pytest.raises(SystemExit):
        lr_free_long.main(["--quick", "--data", "synthetic"])
    assert asked == [("synthetic", 256, 128)]
