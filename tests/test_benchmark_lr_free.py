"""The learning-rate-free benchmark's smoke run (``benchmarks/lr_free.py --quick``) end to end."""

import pytest

from scripts import load_script


@pytest.mark.slow
def test_quick_run_prints_every_row_with_finite_numbers(tmp_path):
    pytest.importorskip("prodigyopt")
    pytest.importorskip("dadaptation")
    pytest.importorskip("schedulefree")
    lr_free = load_script("benchmarks/lr_free.py")
    out = tmp_path / "table.md"
    text = lr_free.main(["--quick", "--out", str(out)])
    assert out.read_text().endswith(text)
    every = text.split("## Every row")[1]
    rows = [line for line in every.splitlines() if line.startswith("| synthetic linear ce |")]
    assert [r.split(" | ")[1].split(" (")[0] for r in rows] == list(lr_free.ROWS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        loss = float(cells[2].split(" ± ")[0])
        acc, time_ratio = float(cells[3]), float(cells[5])
        assert 0.0 < loss < 10.0 and 0.0 <= acc <= 1.0 and time_ratio > 0
    best = rows[0]
    assert any(f"lr {lr:g})" in best for lr in lr_free.QUICK_GRID)
    assert "0/1" in best                                  # the tuned SGD LR does not diverge
    qn = [r for r in rows if "QN newton (" in r][0]
    assert " HVPs, " in qn and " 0 HVPs, " not in qn     # the estimates really ran
    # The best LR is the best one among the grid fits that did not diverge: with 0.03 diverging on this task
    # (h0 of the linear CE model is a few hundred), a table that picked it would show "1/1" here.
    for row in rows:
        if row.split(" | ")[1].startswith("QN"):
            assert "0/1" in row                           # the quasi-Newton LR never diverges


def test_qn_rule_settings_and_batch_sequence_are_reproducible():
    import torch

    lr_free = load_script("benchmarks/lr_free.py")
    data = (torch.arange(10.0).reshape(10, 1), torch.arange(10))
    a = lr_free.batches(data, 4, 7, seed=1)
    b = lr_free.batches(data, 4, 7, seed=1)
    assert len(a) == 7 and all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    # Every epoch (2 full batches of 4 from 10 images) draws distinct images.
    first_epoch = torch.cat([a[0][1], a[1][1]])
    assert len(set(first_epoch.tolist())) == 8


def test_summary_counts_targets_from_the_fits():
    lr_free = load_script("benchmarks/lr_free.py")
    Fit = lr_free.Fit

    def fits(loss, diverged=False, seconds=1.0):
        return [Fit(loss, loss, 0.5, diverged, seconds, {}) for _ in range(2)]

    def task(qn_loss, prodigy_loss, qn_div=False):
        res = {r: fits(1.0) for r in lr_free.ROWS}
        res["Prodigy"] = fits(prodigy_loss)
        for r in lr_free.ROWS:
            if r.startswith("QN"):
                res[r] = fits(float("nan") if qn_div else qn_loss, diverged=qn_div, seconds=2.0)
        return res

    tasks = [("synthetic mlp ce", 0.1, task(1.4, 1.2)),      # within 1.5x, loses to Prodigy
             ("synthetic mlp mse", 0.1, task(1.6, 1.7)),     # over 1.5x, beats Prodigy
             ("digits mlp ce", 0.1, task(0.9, 0.8, qn_div=True))]  # diverged: fails both
    text = "\n".join(lr_free.summary_lines(tasks))
    row = [line for line in text.splitlines() if line.startswith("| QN newton |")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1/3" and cells[2] == "1/3"
    assert cells[3] == "0/3"  # D-Adapt SGD's loss 1.0 is below both of QN's finite losses
    assert cells[5].startswith("2.00×")
    assert "**2/2 div.**" in text


def test_divergence_is_a_non_finite_or_tenfold_loss_not_a_fit_that_learned_nothing():
    """A fit that ends a little above its initial loss (TinyResNet at a tiny LR in 100 steps) is not a
    divergence; a non-finite loss, or one above 10x the initial loss (the results page's criterion), is."""
    import torch
    from torch import nn

    lr_free = load_script("benchmarks/lr_free.py")

    class Quadratic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0]))

        def training_loss(self, batch):
            return 0.5 * 4.0 * (self.w ** 2).sum()  # h0 = 4: SGD diverges for lr > 0.5

    def evaluate(model, data):
        loss = float(model.training_loss(None))
        return loss, 0.5

    lr_free.evaluate = evaluate
    data = {"train": None, "val": None}
    steps = [None] * 5
    calm = lr_free.fit("SGD", Quadratic(), data, steps, lr=0.25, initial_loss=2.0)
    assert not calm.diverged and calm.train_loss < 2.0
    # lr 0.55: |1 - 0.55*4| = 1.2 per step, loss x1.44 per step: 2 -> 12.4 after 5 steps (6.2x, not 10x).
    slow = lr_free.fit("SGD", Quadratic(), data, steps, lr=0.55, initial_loss=2.0)
    assert not slow.diverged and 2.0 < slow.train_loss < 20.0
    # lr 1: |1 - 4| = 3 per step, loss x9 per step: far above 10x after 5 steps.
    blown = lr_free.fit("SGD", Quadratic(), data, steps, lr=1.0, initial_loss=2.0)
    assert blown.diverged


@pytest.mark.slow
def test_a_run_of_several_tasks_writes_the_partial_table_after_each_but_the_last(tmp_path, monkeypatch):
    pytest.importorskip("prodigyopt")
    pytest.importorskip("dadaptation")
    pytest.importorskip("schedulefree")
    lr_free = load_script("benchmarks/lr_free.py")
    writes: list[str] = []
    write = lr_free.C.write_results

    def spy(out, script, argv, title, text, details=""):
        writes.append(text)
        write(out, script, argv, title, text, details)

    monkeypatch.setattr(lr_free.C, "write_results", spy)
    out = tmp_path / "table.md"
    text = lr_free.main(["--quick", "--losses", "ce,mse", "--steps", "3", "--out", str(out)])
    assert len(writes) == 2 and writes[0].startswith("Partial: 1 of 2 tasks done.")
    assert "| synthetic linear ce |" in writes[0] and "| synthetic linear mse |" not in writes[0]
    assert writes[1] == text and out.read_text().endswith(text) and "| synthetic linear mse |" in text
