"""The rules of the results page's verdicts on constructed logs: the A/B boundary, the late-window λ, "did not
train", "not settled", D's tolerance and the counting of diverged runs."""

import math

import numpy as np
import pytest

from lyapunov_callbacks.analysis import summary
from lyapunov_callbacks.analysis.tb_reader import Scalar

STEPS = 1000


def _log(alpha=0.1, h0=None, every=20, probe_every=None, lam=None, lam_every=20, acc=0.9, loss=None,
         full=None):
    """Scalars of a constructed constant-α run of STEPS steps: h0(step) a function, or a number c (then
    c · (1 ± 0.001), alternating between estimates: a trained run's h0 is never constant to 1e-6)."""
    steps = np.arange(0, STEPS + 1, 5)
    loss = np.exp(-steps / 400.0) if loss is None else loss(steps)
    if not callable(h0):
        c = 10.0 if h0 is None else h0
        h0 = lambda s: c * (1.0 + 0.001 * (-1.0) ** np.arange(np.size(s)))
    out = {"train/loss": Scalar(steps, np.asarray(loss, float)),
           "optim/lr": Scalar(steps, np.full(steps.shape, alpha)),
           "val/acc": Scalar(np.array([STEPS]), np.array([acc]))}
    for prefix, period in (("hessian", every), ("hessian_probe", probe_every)):
        if period:
            s = np.arange(0, STEPS + 1, period)
            out[f"{prefix}/h0"] = Scalar(s, h0(s))
    if lam is not None:
        s = np.arange(0, STEPS + 1, lam_every)
        out["lyapunov/lambda"] = Scalar(s, lam(s))
    if full is not None:
        out["train_full/loss"] = Scalar(np.arange(len(full)), np.asarray(full, float))
    return out


def _row(name, *logs):
    recs = [summary.Record(summary.describe_run(name), f"seed{i}", "-", summary.run_stats(s))
            for i, s in enumerate(logs)]
    return summary.aggregate(recs)[0]


@pytest.mark.parametrize("value, side", [
    (0.70, "below A"), (1 / math.sqrt(2), "A"), (1.0, "A"), (1.39, "A"), (1.41, "A"), (1.415, "B"), (2.0, "B"),
    (2.82, "B"), (2.83, "above B"), (math.nan, "n/a")])
def test_a_and_b_exclude_each_other_at_root_two(value, side):
    # 1.39 (digits constant/lenet1_mse_lr0.05) agreed with both A and B under the old overlapping bands
    assert summary.ab_side(value) == side


def test_a_settled_run_sides_with_the_nearer_target_and_shows_its_spread():
    # α = 0.1, h0 = 13.9 +- 0.1 alternating: α·h0 = 1.39 +- 0.01 -> A, never B
    h0 = lambda s: 13.9 + 0.1 * (-1.0) ** (s // 20)
    row = _row("constant/mlp_ce_lr0.1", _log(h0=h0), _log(h0=13.0))
    assert row["n_h0_minibatch"] == 16  # steps 700, 720, ..., 1000
    assert row["alpha_h0_minibatch_min"] == pytest.approx(1.30, rel=2e-3)
    assert row["alpha_h0_minibatch_max"] == pytest.approx(1.39, abs=0.011)
    assert row["alpha_h0_minibatch"] == pytest.approx(1.345, abs=0.01)  # the median of the two seeds
    assert row["alpha_h0_minibatch_q10"] < row["alpha_h0_minibatch"] < row["alpha_h0_minibatch_q90"]
    assert summary.ab_label(row, "minibatch") == "A"
    v = {(x["claim"][0], x["h0"]): x for x in summary.verdicts([row])}
    assert v[("A", "minibatch")]["verdict"] == "agrees" and v[("B", "minibatch")]["verdict"] == "disagrees"
    assert "seeds 1.3–1.39" in v[("A", "minibatch")]["evidence"] and "n=16" in v[("A", "minibatch")]["evidence"]
    assert v[("A", "probe")]["verdict"] == "no data"


def test_the_median_over_seeds_decides_the_side():
    one = _row("constant/mlp_ce_lr0.1", _log(h0=13.0), _log(h0=15.0), _log(h0=16.0))
    assert one["alpha_h0_minibatch"] == pytest.approx(1.5, rel=2e-3) and summary.ab_label(one, "minibatch") == "B"


def test_few_late_estimates_or_a_drifting_late_h0_is_not_settled():
    # a probe every 100 steps: estimates at 700, 800, 900, 1000 -> 4 late ones
    few = _row("constant/mlp_ce_lr0.1", _log(probe_every=100))
    assert few["n_h0_probe"] == 4
    assert summary.ab_label(few, "probe").startswith("not settled (4 late estimates < 10)")
    # 1/h0 rising 30 % across the late window (h0 falling linearly from 10 to 7.7): drift > 10 %
    drifting = _row("constant/mlp_ce_lr0.1", _log(h0=lambda s: 10.0 - 3.0 * np.clip(s - 700, 0, None) / 300 - 0.0))
    assert drifting["drift_minibatch"] > 0.1
    assert summary.ab_label(drifting, "minibatch").startswith("not settled (late 1/h0 drifts")
    # the same fall over the first 700 steps only: settled in the late window
    early = _row("constant/mlp_ce_lr0.1", _log(h0=lambda s: 20.0 - 10.0 * np.clip(s, 0, 700) / 700))
    assert early["drift_minibatch"] == 0.0 and summary.ab_label(early, "minibatch") == "A"
    # a 5 % drift is settled
    slow = _row("constant/mlp_ce_lr0.1", _log(h0=lambda s: 10.0 / (1 + 0.07 * np.clip(s - 700, 0, None) / 300)))
    assert 0.0 < slow["drift_minibatch"] < 0.1 and summary.ab_label(slow, "minibatch") == "A"
    v = {(x["claim"][0], x["h0"]): x for x in summary.verdicts([few])}
    assert v[("A", "probe")]["verdict"] == "not settled" and v[("A", "probe")]["counts"] == {"not settled": 1}


def test_late_drift_reference():
    s = Scalar(np.arange(10), np.array([1.0] * 5 + [1.2] * 5))
    assert summary.late_drift(s, 0, None) == pytest.approx(0.2 / 1.1)
    assert summary.late_drift(s, 5, None) == 0.0
    assert math.isnan(summary.late_drift(s, 9, None))


def test_lambda_comes_from_the_late_window_only():
    # λ = 1.34 over the first 700 steps (a transient), 0.001 after: the late median is 0.001, not a mix
    lam = lambda s: np.where(s < 700, 1.34, 0.001)
    stats = summary.run_stats(_log(lam=lam, lam_every=20))
    assert stats["lambda_median"] == pytest.approx(0.001) and stats["lambda_n"] == 16
    assert stats["lambda_q10"] == pytest.approx(0.001) and stats["lambda_pos_frac"] == 1.0
    assert len(stats["lambda_values"]) == 51 and stats["lambda_steps"][-1] == 1000  # all, for the distribution
    assert summary.lambda_label(_row("constant/mlp_ce_lr0.1", _log(lam=lam))) == "≈ 0"
    # TinyResNet's committed two estimates [1.34, 0.038] at steps 0, 125: none in the late window of 250 steps
    sparse = _row("constant/mlp_ce_lr0.1", _log(lam=lam, lam_every=400))  # steps 0, 400, 800: one late
    assert sparse["lambda_n"] == 1
    assert summary.lambda_label(sparse) == "not settled (1 late λ < 10)"
    chaotic = _row("constant/mlp_ce_lr0.1", _log(lam=lambda s: np.full(s.shape, 0.2)))
    assert summary.lambda_label(chaotic) == "> 0"


def test_a_run_that_did_not_train_is_counted_apart():
    at_chance = _row("constant/tinyresnet_ce_lr0.1", _log(acc=0.54))
    assert at_chance["did_not_train"] == ["validation accuracy 54 % (chance 50 %)"]
    assert summary.ab_label(at_chance, "minibatch") == "did not train"
    assert summary.lambda_label(at_chance) == "did not train"
    trained = _row("constant/tinyresnet_ce_lr0.1", _log(acc=0.56), _log(acc=0.9))
    assert trained["did_not_train"] == [None, None]
    # h0 = 1.000 exactly at every estimate (a dead MSE network), whatever the accuracy
    dead = _row("constant/tinyresnet_mse_lr0.3", _log(h0=lambda s: np.ones(s.shape), acc=0.7))
    assert dead["did_not_train"] == ["minibatch h0 constant to 1e-06"]
    # the linear model with MSE is a quadratic: its constant h0 is no sign of a dead run
    assert _row("constant/linear_mse_lr0.3", _log(h0=lambda s: np.ones(s.shape), acc=0.7))["did_not_train"] == [None]
    moving = _row("constant/tinyresnet_mse_lr0.3", _log(h0=lambda s: 1.0 + 1e-5 * (s % 40 == 0), acc=0.7))
    assert moving["did_not_train"] == [None]
    # ten classes: chance is 10 %
    assert summary.did_not_train({"val_acc": 0.14}, "resnet18") is not None
    assert summary.did_not_train({"val_acc": 0.16}, "resnet18") is None
    v = {(x["claim"][0], x["h0"]): x for x in summary.verdicts([at_chance, trained])}
    a = v[("A", "minibatch")]
    assert a["counts"] == {"did not train": 1, "A": 1}
    assert "did not train in 1 of 1 seeds (validation accuracy 54 %" in a["evidence"]


def test_diverged_runs_are_listed_with_their_step():
    blow = lambda s: np.where(s < 400, 1.0, np.inf)
    row = _row("constant/mlp_mse_lr0.3", _log(loss=blow), _log())
    assert row["diverged_at"] == [400, None]
    assert summary.ab_label(row, "minibatch") == "diverged"
    v = {(x["claim"][0], x["h0"]): x for x in summary.verdicts([row])}
    assert "constant/mlp_mse_lr0.3: diverged in 1 of 2 seeds, at step 400" in v[("A", "minibatch")]["evidence"]
    assert v[("A", "minibatch")]["counts"] == {"diverged": 1}


def test_d_rises_below_one_percent_are_not_rises():
    assert summary.full_loss_rises([1.0, 0.9, 0.905, 0.8]) == (0, pytest.approx(0.005 / 0.9))
    assert summary.full_loss_rises([1.0, 0.9, 0.95, 0.8]) == (1, pytest.approx(0.05 / 0.9))
    assert summary.full_loss_rises([1.0, 2.6, 0.5]) == (1, pytest.approx(1.6))
    assert summary.full_loss_rises([1.0, math.inf]) == (1, math.inf)
    assert summary.full_loss_rises([1.0])[0] == 0 and math.isnan(summary.full_loss_rises([1.0])[1])
    qn_full = list(np.linspace(1.0, 0.5, 12))
    qn_full[5] = qn_full[4] * 1.005  # one 0.5 % bump: no rise
    qn = _row("quasi_newton/mlp_ce", _log(full=qn_full))
    const = _row("constant/mlp_ce_lr0.3", _log(full=[1.0, 0.5, 1.3, 0.4] + [0.3] * 8))
    assert qn["full_loss_rises"] == [0] and summary.d_label(qn) == "agrees"
    assert const["full_loss_max_rise"] == pytest.approx(1.6)
    d = [x for x in summary.verdicts([qn, const]) if x["claim"].startswith("D")][0]
    assert d["verdict"] == "agrees"
    assert "largest full-train loss rise 0.5 %" in d["evidence"] and "lr0.3 1.6e+02 %" in d["evidence"]
    qn_full[5] = qn_full[4] * 1.025  # a 2.5 % bump: a rise
    assert summary.d_label(_row("quasi_newton/mlp_ce", _log(full=qn_full))) == "disagrees"
    # three loss values (ResNet-18's ten steps) cannot show a monotone loss
    assert summary.d_label(_row("quasi_newton/mlp_ce", _log(full=[1.0, 0.9, 0.8]))).startswith("too short (3")


def test_the_gpt_section_quotes_the_run_table_and_computes_its_sentence(tmp_path):
    from lyapunov_callbacks.analysis.summary import gpt_section

    path = tmp_path / "gpt_training.md"
    path.write_text(
        "# GPT run file trained to the end\n\n400 steps in 857 s wall-clock, 295 s CPU (737 ms CPU per step).\n\n"
        "| step | train loss | h0 | pre_h0 | pre_stability | λ (window step .. step + 9) |\n"
        "|---|---|---|---|---|---|\n"
        "| 0 | 4.4 | 137 | nan | nan | 0.251 |\n"
        "| 50 | 3.0 | 50 | 1.1e+04 | 0.585 | 0.003 |\n"
        "| 100 | 2.7 | 39 | 9.0e+03 | 0.435 | -0.002 |\n"
    )
    lines = gpt_section(path)
    assert lines[0] == "## Beyond the paper: a byte-level GPT with AdamW"
    assert "| 100 | 2.7 | 39 | 9.0e+03 | 0.435 | -0.002 |" in lines  # quoted as committed
    sentence = next(line for line in lines if line.startswith("From step"))
    # the first window (no Adam v yet, λ of the transient) is left out of the ranges
    assert sentence.startswith("From step 50 on, `pre_stability`")
    assert "between 0.435 and 0.585, inside the edge" in sentence and "between -0.002 and 0.003" in sentence
    assert "400 steps in 857 s wall-clock, 295 s CPU" in lines[2]
    assert gpt_section(tmp_path / "missing.md")[2].startswith("`missing.md` is not in this checkout")
