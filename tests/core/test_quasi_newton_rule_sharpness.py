"""``QuasiNewtonRule(rule="batch_sharpness")``: EMA with bias correction, growth limit, brake, schedule, safety."""

import math

import pytest

from lyapunov_callbacks.core.quasi_newton_rule import QuasiNewtonRule


def _rule(**kwargs):
    rule = QuasiNewtonRule(rule="batch_sharpness", **kwargs)
    rule.reset(initial_lr=0.1)
    return rule


def test_first_measurement_is_the_warmup_and_sets_the_lr_without_the_growth_limit():
    rule = _rule(scale=0.8, max_lr=100.0)
    assert rule.needs_estimate(0) and rule.last_trigger == "warmup"
    assert rule.update(0.02, 0, hvps=1) == pytest.approx(40.0)   # 400× the initial 0.1: no growth limit
    assert rule.warmup_done and rule.warmup_hvps == 1 and not rule.clamped
    assert not rule.needs_estimate(0)                             # one measurement per step
    rule = _rule(scale=0.8)
    rule.needs_estimate(0)
    assert rule.update(0.02, 0, hvps=1) == 10.0 and rule.clamped  # the clamp holds


def test_bias_corrected_ema_of_the_measurement():
    rule = _rule(sharpness_ema=0.9, every_n_steps=1, max_lr_growth=math.inf)
    values = [2.0, 4.0, 1.0]
    for step, s in enumerate(values):
        assert rule.needs_estimate(step)
        rule.update(s, step, hvps=1)
    ema = 0.0
    for s in values:
        ema = 0.9 * ema + 0.1 * s
    expected = ema / (1 - 0.9**3)
    assert rule.h0_smoothed == pytest.approx(expected, rel=1e-12)
    assert rule.lr == pytest.approx(1.0 / expected, rel=1e-12)
    assert rule.h0 == 1.0                                      # the raw last measurement


def test_growth_limit_and_a_fall_applied_at_once():
    rule = _rule(sharpness_ema=0.0, every_n_steps=1)
    rule.needs_estimate(0)
    rule.update(10.0, 0)                                       # lr 0.1
    rule.needs_estimate(1)
    assert rule.update(0.1, 1) == pytest.approx(0.2)           # would be 10: at most 2× per estimate
    rule.needs_estimate(2)
    assert rule.update(100.0, 2) == pytest.approx(0.01)        # a fall is taken at once


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -3.0])
def test_nan_inf_and_nonpositive_measurements_never_reach_the_lr(bad):
    rule = _rule(every_n_steps=1)
    rule.needs_estimate(0)
    rule.update(bad, 0)                                        # a bad warm-up keeps the initial LR
    assert rule.lr == 0.1 and rule.rejected_estimates == 1 and rule.warmup_done
    rule.needs_estimate(1)
    rule.update(5.0, 1)
    good = rule.lr
    rule.needs_estimate(2)
    assert rule.update(bad, 2) == good and rule.rejected_estimates == 2
    assert rule.h0_smoothed == pytest.approx(5.0)              # the EMA does not see it


def test_loss_rise_brake_takes_the_sharper_measurement_at_once():
    rule = _rule(sharpness_ema=0.9, every_n_steps=100, loss_rise=1.0)
    rule.needs_estimate(0, loss=1.0)
    rule.update(1.0, 0)
    assert not rule.needs_estimate(1, loss=1.0)
    assert rule.needs_estimate(2, loss=5.0) and rule.last_trigger == "loss"
    rule.update(10.0, 2)
    assert rule.h0_smoothed == 10.0 and rule.lr == pytest.approx(0.1)
    # The EMA continues from the brake's value: a scheduled 10 keeps it at 10.
    assert rule.needs_estimate(102, loss=5.0) and rule.last_trigger == "schedule"
    rule.update(10.0, 102)
    assert rule.h0_smoothed == pytest.approx(10.0, rel=1e-12)


def test_without_the_loss_trigger_the_same_rise_is_averaged():
    rule = _rule(sharpness_ema=0.9, every_n_steps=2)
    rule.needs_estimate(0)
    rule.update(1.0, 0)
    assert rule.needs_estimate(2) and rule.last_trigger == "schedule"
    rule.update(10.0, 2)
    assert rule.h0_smoothed == pytest.approx((0.09 * 1.0 + 0.1 * 10.0) / 0.19, rel=1e-12)


def test_dense_warmup_steps_then_the_schedule():
    rule = _rule(every_n_steps=5, warmup_steps=3)
    measured = []
    for step in range(20):
        if rule.needs_estimate(step):
            rule.update(1.0, step)
            measured.append(step)
    assert measured == [0, 1, 2, 7, 12, 17]


def test_state_dict_round_trip_keeps_the_ema():
    rule = _rule(every_n_steps=1)
    for step, s in enumerate([3.0, 1.0, 2.0]):
        rule.needs_estimate(step)
        rule.update(s, step)
    other = _rule(every_n_steps=1)
    other.load_state_dict(rule.state_dict())
    for r in (rule, other):
        r.needs_estimate(3)
        r.update(0.5, 3)
    assert other.lr == rule.lr and other.h0_smoothed == rule.h0_smoothed


def test_newton_rule_ignores_the_new_settings():
    # warmup_steps=7 would measure at steps 1..6 under batch_sharpness; the newton rule keeps its schedule.
    a, b = QuasiNewtonRule(every_n_steps=5), QuasiNewtonRule(every_n_steps=5, sharpness_ema=0.5, warmup_steps=7)
    for rule in (a, b):
        rule.reset(initial_lr=0.1)
        for step in range(8):
            while rule.needs_estimate(step):
                rule.update(4.0 if step < 5 else 2.0, step, hvps=5)
    assert a.state_dict() == b.state_dict()
    assert a.num_estimates == 3 and a.lr == pytest.approx(0.5)       # warm-up (2 agreeing), step 5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sharpness_ema=1.0), "sharpness_ema"),
        (dict(sharpness_ema=-0.1), "sharpness_ema"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=1.5), "warmup_steps"),
        (dict(smoothing=0.5), "smoothing"),
        (dict(rayleigh_every=5), "rayleigh_every"),
    ],
)
def test_bad_settings_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        QuasiNewtonRule(rule="batch_sharpness", **kwargs)
