"""The adaptive cadence (``every_n_steps="auto"``) on constructed h0 sequences: bounds, reaction, determinism."""

import math
import random

import pytest

from lyapunov_callbacks.core.checks import NotAnIntegerError, NotPositiveError
from lyapunov_callbacks.core.cadence import AdaptiveCadence, check_every_n_steps, is_auto


def run(cadence: AdaptiveCadence, h0_of_step, steps: int, loss_of_step=None) -> list[int]:
    """Drive ``cadence`` over ``steps`` steps; return the steps at which it estimated."""
    estimated = []
    for step in range(steps):
        if cadence.due(step):
            cadence.update(step, h0_of_step(step))
            estimated.append(step)
        if loss_of_step is not None:
            cadence.observe_loss(step, loss_of_step(step))
    return estimated


def test_constant_h0_grows_the_interval_to_max_every_by_doubling():
    cadence = AdaptiveCadence(drift_tol=0.05, min_every=5, max_every=160)
    steps = run(cadence, lambda s: 3.0, 2000)
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    # first interval min_every, then doubling (max_growth=2) up to max_every, then max_every for good
    assert gaps[:6] == [5, 10, 20, 40, 80, 160]
    assert set(gaps[6:]) == {160}
    assert cadence.every_n_steps == 160


def test_steady_exponential_drift_gives_interval_drift_tol_over_rate():
    # h0 = exp(r t): the rate is r exactly, the interval floor(drift_tol / r) = 25 once the growth limit allows.
    r = 0.002
    cadence = AdaptiveCadence(drift_tol=0.05, min_every=2, max_every=1000)
    steps = run(cadence, lambda s: math.exp(r * s), 600)
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert cadence.rate == pytest.approx(r, rel=1e-9)
    assert set(gaps[-5:]) <= {24, 25}  # floor(0.05 / 0.002), up to the rounding of the fitted slope
    # the predicted change over each interval is at most drift_tol
    assert all(r * g <= 0.05 + 1e-12 for g in gaps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_hold_on_noisy_jumping_sequences(seed):
    rng = random.Random(seed)
    jumps = {rng.randrange(50, 3000): rng.uniform(0.3, 5.0) for _ in range(8)}
    levels = {}
    level = 1.0
    for s in range(3000):
        level *= jumps.get(s, 1.0)
        levels[s] = level

    cadence = AdaptiveCadence(drift_tol=0.03, min_every=7, max_every=90)
    steps = run(cadence, lambda s: levels[s] * (1.0 + 0.2 * rng.uniform(-1, 1)), 3000)
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert min(gaps) >= 7 and max(gaps) <= 90
    # every interval is at most twice the one before it
    assert all(b <= 2 * a for a, b in zip(gaps, gaps[1:]))


def test_a_sharpening_is_reacted_to_at_the_first_estimate_after_it():
    # Flat h0 until the interval reached max_every, then h0 grows by 1 % per step (a progressive sharpening).
    cadence = AdaptiveCadence(drift_tol=0.05, min_every=5, max_every=200)
    onset, r = 1000, 0.01

    def h0(step):
        return 10.0 * math.exp(r * max(0, step - onset))

    steps = run(cadence, h0, 1600)
    before = [s for s in steps if s <= onset]
    after = [s for s in steps if s > onset]
    assert before[-1] - before[-2] == 200  # the flat phase ran at max_every
    # The first estimate after the onset comes within one interval of it and schedules a far shorter interval
    # (its line through 4 points sees 0.3 of the jump); each following one at least halves it until it is
    # within a factor 2 of the ideal drift_tol / r = 5 steps, where it stays.
    assert after[0] - onset <= 200
    gaps = [b - a for a, b in zip(after, after[1:])]
    assert gaps[0] <= 200 / 4
    assert all(b <= max(a / 2, 2 * 0.05 / r) for a, b in zip(gaps, gaps[1:]))
    assert max(gaps[4:]) <= 2 * 0.05 / r
    # from the third estimate after the onset the change of h0 between estimates is at most 2 × drift_tol,
    # against r × 200 = 2 for the unreacted max_every interval
    worst = max(abs(math.log(h0(b) / h0(a))) for a, b in zip(after[2:], after[3:]))
    assert worst <= 0.1 < r * 200


def test_loss_spike_brings_the_next_estimate_forward():
    cadence = AdaptiveCadence(min_every=5, max_every=100, loss_rise=1.0, loss_window=10)
    spike = 537
    steps = run(cadence, lambda s: 2.0, 800, loss_of_step=lambda s: 10.0 if s == spike else 1.0)
    assert spike + 1 in steps
    assert cadence.loss_triggers == 1
    # it came before the scheduled one (max_every after the last), and the schedule continues from it
    i = steps.index(spike + 1)
    assert steps[i] - steps[i - 1] < 100 and steps[i + 1] - steps[i] == 100
    # without the trigger the same sequence does not estimate there
    quiet = run(AdaptiveCadence(min_every=5, max_every=100, loss_rise=None), lambda s: 2.0, 800,
                loss_of_step=lambda s: 10.0 if s == spike else 1.0)
    assert spike + 1 not in quiet


def test_bad_estimate_is_not_used_and_schedules_min_every():
    cadence = AdaptiveCadence(min_every=4, max_every=64)
    steps = run(cadence, lambda s: 1.0, 200)
    assert cadence.every_n_steps == 64
    step = cadence.next_step
    assert cadence.update(step, float("nan")) == 4
    assert cadence.next_step == step + 4
    assert cadence.update(step + 4, -1.0) == 4
    assert len(cadence._points) == cadence.history and all(s < step for s, _ in cadence._points)
    assert steps


def test_same_values_give_the_same_steps_and_state_dict_resumes():
    def h0(step):
        return 5.0 + 3.0 * math.sin(step / 97.0) + 0.1 * ((step * 7919) % 13) / 13

    a = AdaptiveCadence(drift_tol=0.02, min_every=3, max_every=120)
    b = AdaptiveCadence(drift_tol=0.02, min_every=3, max_every=120)
    full = run(a, h0, 3000)
    assert full == run(b, h0, 3000)
    # resume from a state saved at step 1500 into a fresh object: the same steps after it
    c = AdaptiveCadence(drift_tol=0.02, min_every=3, max_every=120)
    first = run(c, h0, 1500)
    d = AdaptiveCadence(drift_tol=0.02, min_every=3, max_every=120)
    d.load_state_dict(c.state_dict())
    rest = []
    for s in range(1500, 3000):
        if d.due(s):
            d.update(s, h0(s))
            rest.append(s)
    assert first + rest == full
    assert len(set(b - a for a, b in zip(full, full[1:]))) > 3  # the cadence really adapted


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(drift_tol=0.0), NotPositiveError, "drift_tol"),
        (dict(drift_tol=float("inf")), NotPositiveError, "drift_tol"),
        (dict(min_every=0), NotAnIntegerError, "min_every"),
        (dict(min_every=2.5), NotAnIntegerError, "min_every"),
        (dict(min_every=10, max_every=5), NotAnIntegerError, "max_every"),
        (dict(history=1), NotAnIntegerError, "history"),
        (dict(max_growth=1.0), NotPositiveError, "max_growth"),
        (dict(loss_rise=-1.0), NotPositiveError, "loss_rise"),
        (dict(loss_window=0), NotAnIntegerError, "loss_window"),
    ],
)
def test_bad_settings_raise_naming_the_parameter(kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        AdaptiveCadence(**kwargs)


def test_every_n_steps_check_accepts_auto_and_positive_ints_only():
    assert is_auto("auto") and not is_auto(10) and not is_auto("Auto")
    check_every_n_steps("auto")
    check_every_n_steps(3)
    for bad in (0, "10", "adaptive", 2.0, True, None):
        with pytest.raises(NotAnIntegerError, match='every_n_steps="auto"'):
            check_every_n_steps(bad)
