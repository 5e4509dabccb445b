"""Tests of ``QuasiNewtonRule``, the quasi-Newton decision object, without a Trainer: simulated curvature traces,
exact quadratics, and plain PyTorch training loops driven by the core's Hessian eigen-solver."""

import math
import pickle

import pytest
import torch
from torch import nn

from lyapunov_callbacks import HessianOperator, top_hessian_eigenvalues
from lyapunov_callbacks.callbacks.quasi_newton import momentum_stability_factor
from lyapunov_callbacks.core.quasi_newton_rule import QuasiNewtonRule, adam_stability_factor


def _warm(rule: QuasiNewtonRule, h0: float, step: int = 0) -> None:
    """A warm-up that agrees at once (two equal estimates)."""
    while rule.needs_estimate(step):
        rule.update(h0, step)


# ---------------------------------------------------------------------------------------------------------------
# Responding to sharpening
# ---------------------------------------------------------------------------------------------------------------
def _sharpening_run(rule: QuasiNewtonRule, steps: int = 40, jump_at: int = 20, signal: str = "loss"):
    """SGD on ½Σ h_i θ_i² plus a small additive noise per step (SGD's gradient noise); the top curvature jumps
    from 1 to 100 at ``jump_at``. The rule sees the true h0 at each estimate and the chosen ``signal``.

    Returns (the LR used at every step, the loss at every step).
    """
    gen = torch.Generator().manual_seed(0)
    flat = torch.tensor([0.5, 0.1, 0.05], dtype=torch.float64)
    theta = torch.ones(4, dtype=torch.float64)
    lrs, losses = [], []
    previous = theta.clone()
    for step in range(steps):
        h = torch.cat([torch.tensor([1.0 if step < jump_at else 100.0], dtype=torch.float64), flat])
        loss = float(0.5 * (h * theta**2).sum())
        kwargs = {"loss": loss}
        if signal == "rayleigh" and rule.wants_rayleigh(step):
            kwargs["rayleigh"] = float(h[0])  # vᵀHv of the last eigenvector e_0
        if signal == "growth" and step > 0:
            kwargs["growth"] = float(abs(1 - lrs[-1] * h_prev).max())  # the last step's map on a tangent vector
        while rule.needs_estimate(step, **kwargs):
            rule.update(float(h.max()), step)
        lrs.append(rule.lr)
        losses.append(loss)
        previous = theta
        theta = theta - rule.lr * h * theta + 1e-4 * torch.randn(4, generator=gen, dtype=torch.float64)
        h_prev = h
    del previous
    return lrs, losses


@pytest.mark.parametrize(
    "signal, kwargs, max_delay",
    [
        ("loss", {}, 2),                                   # free: the training loss
        ("growth", {"loss_rise": None}, 1),                # free when a tangent vector is propagated anyway
        ("rayleigh", {"loss_rise": None, "rayleigh_every": 1}, 0),  # one HVP per step
    ],
)
def test_sudden_100x_sharpening_answered_within_two_steps(signal, kwargs, max_delay):
    jump = 20
    rule = QuasiNewtonRule(every_n_steps=100, **kwargs)
    lrs, losses = _sharpening_run(rule, jump_at=jump, signal=signal)
    assert lrs[jump - 1] == pytest.approx(1.0)
    answered = next(s for s in range(jump, len(lrs)) if lrs[s] * 100.0 <= 1.0 + 1e-12)
    assert answered - jump <= max_delay
    assert lrs[answered] == pytest.approx(0.01)
    assert rule.triggers[signal] == 1
    # After the answer the loss comes back below its level before the jump, and stays finite.
    assert losses[-1] < losses[jump - 1]
    assert max(losses) < 1e3 * losses[jump - 1]


def test_without_triggers_the_same_sharpening_diverges_until_the_schedule():
    rule = QuasiNewtonRule(every_n_steps=100, loss_rise=None)
    lrs, losses = _sharpening_run(rule, steps=30, jump_at=20)
    assert lrs[-1] == pytest.approx(1.0)        # never answered
    assert losses[-1] > 1e10 * losses[19]       # ×99² per step along the sharpened direction


def test_loss_trigger_ignores_noise_below_threshold_and_fires_above():
    rule = QuasiNewtonRule(every_n_steps=1000, loss_rise=0.5, loss_window=4)
    _warm(rule, 2.0)
    for step, loss in enumerate([1.0, 1.2, 0.9, 1.1, 1.4], start=1):   # each below 1.5 × the mean before it
        assert not rule.needs_estimate(step, loss=loss)
    # Mean of the last 4 losses: (1.2 + 0.9 + 1.1 + 1.4) / 4 = 1.15; 1.15 × 1.5 = 1.725.
    assert not rule.needs_estimate(6, loss=1.72)
    # Now the window is (0.9, 1.1, 1.4, 1.72), mean 1.28: the threshold is 1.92.
    assert rule.needs_estimate(7, loss=1.93)
    assert rule.last_trigger == "loss"
    rule.update(4.0, 7)
    # The loss at the estimate is the new reference: a lower loss does not trigger, a NaN one does.
    assert not rule.needs_estimate(8, loss=1.0)
    assert rule.needs_estimate(9, loss=float("nan"))
    rule.update(float("nan"), 9)                # a diverged loss: no reference, so no trigger on every step
    assert not rule.needs_estimate(10, loss=float("nan"))
    assert not rule.needs_estimate(11, loss=1.0)
    assert rule.needs_estimate(12, loss=2.5)    # the reference is the first finite loss after the estimate


def test_rayleigh_check_schedule_and_threshold():
    rule = QuasiNewtonRule(every_n_steps=1000, rayleigh_every=3, rayleigh_rise=0.1, loss_rise=None)
    assert not rule.wants_rayleigh(0)            # no eigenvector before the warm-up
    _warm(rule, 2.0)
    assert [s for s in range(1, 10) if rule.wants_rayleigh(s)] == [3, 6, 9]
    assert not rule.needs_estimate(3, rayleigh=2.2)        # 10 % exactly is not above the threshold
    assert rule.needs_estimate(6, rayleigh=2.21)
    assert rule.last_trigger == "rayleigh"
    assert rule.update(2.5, 6) == pytest.approx(0.4)
    assert not rule.needs_estimate(7, rayleigh=1.0)         # a fall is left to the schedule


# ---------------------------------------------------------------------------------------------------------------
# The LR an estimate gives
# ---------------------------------------------------------------------------------------------------------------
def test_collapsing_h0_raises_lr_by_at_most_the_stated_factor_per_estimate():
    rule = QuasiNewtonRule(every_n_steps=1, max_lr_growth=2.0, max_lr=10.0, loss_rise=None)
    _warm(rule, 1.0)
    lrs = [rule.lr]
    for step in range(1, 8):
        assert rule.needs_estimate(step)
        lrs.append(rule.update(1e-4, step))     # h0 collapsed 10⁴×: 1/h0 = 1e4
    assert lrs == pytest.approx([1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0])
    assert all(b / a <= 2.0 + 1e-12 for a, b in zip(lrs, lrs[1:]))
    assert rule.clamped                       # the clamp, not h0, sets the last LRs: visible to the caller
    # A rise of h0 is applied at once, however large.
    assert rule.update(50.0, 8) == pytest.approx(0.02)
    assert not rule.clamped


def test_growth_limit_can_be_disabled():
    rule = QuasiNewtonRule(max_lr_growth=math.inf, max_lr=1e9)
    _warm(rule, 1.0)
    assert rule.update(1e-4, 10) == pytest.approx(1e4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -3.0])
def test_nan_or_nonpositive_estimate_never_reaches_the_lr(bad):
    rule = QuasiNewtonRule(every_n_steps=1, min_lr=1e-3, max_lr=1.0)
    rule.reset(initial_lr=5.0)
    assert rule.lr == 1.0                     # configured LR, clamped
    while rule.needs_estimate(0):
        rule.update(bad, 0)                    # a rejected warm-up estimate ends the warm-up
    assert rule.warmup_done and rule.lr == 1.0 and rule.h0 is None
    rule.update(4.0, 1)
    assert rule.lr == pytest.approx(0.25)
    for step in range(2, 5):
        assert rule.update(bad, step) == pytest.approx(0.25)
    assert rule.rejected_estimates == 4 and rule.h0 == 4.0 and rule.h0_smoothed == 4.0
    fresh = QuasiNewtonRule(min_lr=1e-3)
    fresh.update(bad, 0)
    assert fresh.lr == 1e-3                    # no configured LR: the lower clamp


def test_lr_formula_rules_momentum_and_adam_factor():
    h0 = 4.0
    c = momentum_stability_factor(0.9)
    newton = QuasiNewtonRule(scale=0.5, stability_factor=c)
    _warm(newton, h0)
    assert newton.lr == pytest.approx(0.5 * 1.9 / 4.0)
    edge = QuasiNewtonRule(rule="edge", edge=1.8, stability_factor=c)
    _warm(edge, h0)
    assert edge.lr == pytest.approx(1.8 * 1.9 / 4.0)
    assert adam_stability_factor(0.9) == pytest.approx(19.0)
    adam = QuasiNewtonRule(stability_factor=adam_stability_factor(0.9), max_lr=100.0)
    _warm(adam, 1000.0)                         # λ1(P⁻¹H)
    assert adam.lr == pytest.approx(19.0 / 1000.0)   # half of Adam's limit 38/λ1


def _heavy_ball_loss(lr: float, momentum: float, h: torch.Tensor, steps: int = 300) -> float:
    theta = nn.Parameter(torch.ones(len(h), dtype=torch.float64))
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (h * theta**2).sum()).backward()
        opt.step()
    return float(0.5 * (h * theta.detach() ** 2).sum())


def test_edge_rule_with_momentum_factor_is_stable_for_pytorch_heavy_ball():
    h = torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64)
    c = momentum_stability_factor(0.5)
    rule = QuasiNewtonRule(rule="edge", edge=1.9, stability_factor=c)
    _warm(rule, 10.0)
    assert _heavy_ball_loss(rule.lr, 0.5, h) < 1e-3
    # The same target without the momentum factor's complement, above the limit 2c/h, diverges.
    assert _heavy_ball_loss(2.1 * c / 10.0, 0.5, h) > 1e3


def test_coupled_weight_decay_term_sets_the_lr_and_keeps_sgd_stable():
    # Loss ½·h·θ² with h = 0.1 and SGD's coupled weight decay w = 1: the update map is 1 − α(h + w).
    h, w = torch.tensor([0.1, 0.05], dtype=torch.float64), 1.0
    rule = QuasiNewtonRule(weight_decay=w, max_lr=100.0)
    _warm(rule, 0.1)
    assert rule.lr == pytest.approx(1.0 / 1.1)

    def final_norm(lr):
        theta = nn.Parameter(torch.ones(2, dtype=torch.float64))
        opt = torch.optim.SGD([theta], lr=lr, weight_decay=w)
        for _ in range(50):
            opt.zero_grad()
            (0.5 * (h * theta**2).sum()).backward()
            opt.step()
        return float(theta.detach().norm())

    assert final_norm(rule.lr) < 1e-10
    # The LR without the w term, 1/h0 = 10, makes the map 1 − 10·1.1 = −10: SGD diverges.
    assert final_norm(1.0 / 0.1) > 1e40


def test_smoothing_averages_a_fall_but_takes_a_rise_at_once():
    rule = QuasiNewtonRule(smoothing=0.5, max_lr_growth=math.inf, max_lr=100.0)
    _warm(rule, 4.0)
    rule.update(2.0, 10)
    assert rule.h0_smoothed == pytest.approx(3.0) and rule.lr == pytest.approx(1 / 3)
    rule.update(12.0, 20)
    assert rule.h0_smoothed == pytest.approx(12.0) and rule.lr == pytest.approx(1 / 12)


# ---------------------------------------------------------------------------------------------------------------
# Warm-up, schedule, state
# ---------------------------------------------------------------------------------------------------------------
def test_warm_up_stops_when_consecutive_estimates_agree():
    rule = QuasiNewtonRule(warmup_tol=1e-3)
    estimates = iter([5.0, 4.0, 4.003, 4.0021, 9.0])
    seen = []
    while rule.needs_estimate(0, loss=1.0):
        seen.append(next(estimates))
        rule.update(seen[-1], 0, hvps=5)
    # |4.003 − 4.0| / 4.003 = 7.5e-4 ≤ 1e-3: done after the third estimate.
    assert seen == [5.0, 4.0, 4.003]
    assert rule.warmup_done and rule.warmup_converged and rule.warmup_hvps == 15
    assert rule.lr == pytest.approx(1 / 4.003)
    assert rule.triggers["warmup"] == 3
    assert not rule.needs_estimate(0)
    assert [s for s in range(1, 31) if rule.needs_estimate(s) and rule.update(4.0, s)] == [10, 20, 30]


def test_warm_up_stops_at_the_hvp_budget_unconverged():
    rule = QuasiNewtonRule(warmup_tol=1e-3, warmup_max_hvps=25)
    estimates = iter([5.0, 4.0, 3.0, 2.0])
    budgets = []
    while rule.needs_estimate(0):
        budgets.append(rule.warmup_hvps_left)
        rule.update(next(estimates), 0, hvps=min(10, budgets[-1]))
    assert budgets == [25, 15, 5]
    assert rule.warmup_done and rule.warmup_hvps == 25 and not rule.warmup_converged and rule.warmup_hvps_left == 0
    assert rule.lr == pytest.approx(1 / 3.0)


def test_state_dict_round_trip_continues_identically():
    def drive(rule, start, stop):
        out = []
        for step in range(start, stop):
            loss = 1.0 + 0.1 * math.sin(step) + (5.0 if step in (13, 27) else 0.0)
            if rule.needs_estimate(step, loss=loss, rayleigh=2.0 + 0.05 * step if rule.wants_rayleigh(step) else None):
                rule.update(2.0 + 0.05 * step, step)
            out.append((rule.lr, rule.last_trigger, rule.num_estimates))
        return out

    settings = dict(every_n_steps=7, rayleigh_every=4, loss_window=3, smoothing=0.3)
    a = QuasiNewtonRule(**settings)
    a.reset(initial_lr=0.1)
    _warm(a, 3.0)
    drive(a, 1, 20)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = QuasiNewtonRule(**settings)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    assert drive(b, 20, 40) == drive(a, 20, 40)
    assert a.triggers["loss"] >= 2 and a.triggers["schedule"] >= 2


def test_reset_forgets_everything():
    rule = QuasiNewtonRule()
    _warm(rule, 3.0)
    rule.reset(initial_lr=0.2)
    fresh = QuasiNewtonRule()
    fresh.reset(initial_lr=0.2)
    assert rule.state_dict() == fresh.state_dict()
    assert rule.needs_estimate(0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"rule": "cdat"}, "rule"),
        ({"scale": 0}, "scale"),
        ({"edge": 2.0}, "edge"),
        ({"stability_factor": -1}, "stability_factor"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"warmup_tol": float("nan")}, "warmup_tol"),
        ({"warmup_max_hvps": 0}, "warmup_max_hvps"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"min_lr": 0}, "min_lr"),
        ({"min_lr": 1.0, "max_lr": 0.5}, "max_lr"),
        ({"max_lr_growth": 1.0}, "max_lr_growth"),
        ({"loss_rise": 0}, "loss_rise"),
        ({"loss_window": 0}, "loss_window"),
        ({"rayleigh_every": 0}, "rayleigh_every"),
        ({"rayleigh_rise": -1}, "rayleigh_rise"),
        ({"growth_limit": 0}, "growth_limit"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        QuasiNewtonRule(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# A plain PyTorch training loop, h0 from the core solver
# ---------------------------------------------------------------------------------------------------------------
def _least_squares(seed: int = 0, n: int = 64, d: int = 8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.3, 1.0, d, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return x, y


def _mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _exact_h0(x: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(2.0 * x.T @ x / len(x))[-1])    # Hessian of mean((xw − y)²)


def _train(rule: QuasiNewtonRule, schedule: dict, steps: int):
    """Full-batch SGD on least squares. At the steps in ``schedule`` the input columns are rescaled by the given
    factors and the weights by their inverses: the same predictions and loss, a Hessian D·H·D."""
    torch.manual_seed(0)
    x0, y = _least_squares()
    model = nn.Linear(x0.shape[1], 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rule.reset(initial_lr=0.1)
    vec, scale = None, torch.ones(x0.shape[1], dtype=torch.float64)
    log = []
    for step in range(steps):
        if step in schedule:
            new = torch.as_tensor(schedule[step], dtype=torch.float64).expand_as(scale)
            with torch.no_grad():
                model.weight.mul_(scale / new)
            scale = new
        batch = (x0 * scale, y)
        loss = _mse(model, batch)
        rayleigh = None
        if rule.wants_rayleigh(step):
            with HessianOperator(model, _mse, batch) as hess:
                rayleigh = float(vec[:, 0] @ hess.matvec(vec[:, 0]))
        while rule.needs_estimate(step, loss=float(loss.detach()), rayleigh=rayleigh):
            budget = rule.warmup_hvps_left if not rule.warmup_done else 50
            res = top_hessian_eigenvalues(model, _mse, batch, tol=1e-8, max_iter=budget, init=vec)
            vec = res.eigenvectors
            rule.update(float(res.eigenvalues[0]), step, hvps=res.num_hvps)
        for group in opt.param_groups:
            group["lr"] = rule.lr
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append((float(loss.detach()), rule.lr, _exact_h0(x0 * scale)))
    return log


# Sharpening: the flattest input column ×35 (weights ÷35): same loss, top curvature ×~100 along a direction
# whose error is not yet trained away (a uniform rescaling would leave the error along the top direction 0).
SHARPEN = [35.0] + [1.0] * 7


def test_plain_loop_answers_a_100x_sharpening_with_exact_h0():
    jump = 15
    rule = QuasiNewtonRule(every_n_steps=50)
    log = _train(rule, {jump: SHARPEN}, steps=30)
    losses, lrs, h_exact = zip(*log)
    assert lrs[0] == pytest.approx(1.0 / h_exact[0], rel=1e-6)                 # warm-up: exact h0
    assert h_exact[jump] / h_exact[0] > 80
    answered = next(s for s in range(jump, len(lrs)) if lrs[s] * h_exact[s] <= 1.0 + 1e-6)
    assert answered - jump <= 2
    assert lrs[answered] == pytest.approx(1.0 / h_exact[jump], rel=1e-6)
    assert rule.triggers["loss"] == 1 and rule.triggers["schedule"] == 0
    assert losses[-1] < losses[jump - 1]                                       # trained through the jump
    # Without the loss trigger the unstable direction grows ×(α·h − 1)² per step until step 50.
    control = _train(QuasiNewtonRule(every_n_steps=50, loss_rise=None), {jump: SHARPEN}, steps=30)
    assert control[-1][0] > 1e20 * losses[-1]


def test_plain_loop_rayleigh_check_answers_at_the_sharpening_step():
    jump = 15
    rule = QuasiNewtonRule(every_n_steps=50, loss_rise=None, rayleigh_every=1)
    log = _train(rule, {jump: SHARPEN}, steps=25)
    losses, lrs, h_exact = zip(*log)
    assert lrs[jump - 1] == pytest.approx(1.0 / h_exact[0], rel=1e-6)
    assert lrs[jump] == pytest.approx(1.0 / h_exact[jump], rel=1e-6)   # before the first unstable update
    assert rule.triggers["rayleigh"] == 1 and rule.triggers["schedule"] == 0
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))   # monotone, through the jump


def test_plain_loop_collapse_raises_lr_by_at_most_twice_per_estimate():
    rule = QuasiNewtonRule(every_n_steps=3, max_lr_growth=2.0, max_lr=1e3, loss_rise=None)
    log = _train(rule, {5: 0.1}, steps=27)          # every column ÷10: curvature ÷100
    _, lrs, h_exact = zip(*log)
    assert h_exact[5] == pytest.approx(h_exact[0] / 100)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(2.0)
    assert all(r <= 2.0 + 1e-9 for r in ratios)
    assert ratios.count(pytest.approx(2.0)) == 6     # estimates at 6, 9, …, 21 double; 24 reaches 1/h0
    assert lrs[-1] == pytest.approx(1.0 / h_exact[-1], rel=1e-6)


def test_configure_for_takes_c_and_w_from_the_optimiser_and_warns_for_momentum_under_the_sgd_factor():
    params = [torch.zeros(3, requires_grad=True)]
    rule = QuasiNewtonRule()
    warning = rule.configure_for(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01))
    assert (rule.stability_factor, rule.weight_decay) == (1.0, 0.01) and "momentum_aware=True" in warning
    assert rule.configure_for(torch.optim.SGD(params, lr=0.1, momentum=0.9), momentum_aware=True) is None
    assert rule.stability_factor == pytest.approx(1.9) and rule.weight_decay == 0.0
    assert QuasiNewtonRule().configure_for(torch.optim.AdamW(params, weight_decay=0.1)) is None
    adam = QuasiNewtonRule()
    adam.configure_for(torch.optim.AdamW(params, betas=(0.9, 0.999), weight_decay=0.1))
    assert (adam.stability_factor, adam.weight_decay) == (pytest.approx(adam_stability_factor(0.9)), 0.0)
    with pytest.raises(ValueError, match="Fix: use the same betas in every group"):
        QuasiNewtonRule().configure_for(
            torch.optim.Adam([{"params": params}, {"params": [torch.zeros(1, requires_grad=True)], "betas": (0.5, 0.9)}])
        )


def test_log_values_name_the_measured_curvature_and_the_counters():
    rule = QuasiNewtonRule(every_n_steps="auto")
    rule.update(4.0, 0, hvps=10)
    values = rule.log_values(4.0, preconditioned=True, warmup=True)
    assert values == {
        "warmup_hvps": 10.0, "pre_h0": 4.0, "lr": rule.lr, "rejected_estimates": 0.0, "clamped_estimates": 0.0,
        "triggered_estimates": 0.0, "every_n_steps": float(rule.every_n_steps_in_use),
    }
    assert set(QuasiNewtonRule().log_values(float("inf"))) >= {"h0", "lr"}
    assert QuasiNewtonRule().log_values(float("inf"))["h0"] != QuasiNewtonRule().log_values(float("inf"))["h0"]
    sharp = QuasiNewtonRule(rule="batch_sharpness")
    assert "sharpness" in sharp.log_values(2.0) and sharp.warmup_warning(2.0) is None
