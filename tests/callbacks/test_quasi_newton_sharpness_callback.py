"""``QuasiNewtonLR(rule="batch_sharpness")`` in real fits: the LR the step used, the logged LR, the settings."""

import math

import lightning as L
import pytest
import torch
from torch import nn

from lyapunov_callbacks.callbacks.quasi_newton import QuasiNewtonLR
from recording_logger import RecordingLogger
from test_quasi_newton import A, THETA0, _loader, _trainer


class StepLRQuadratic(L.LightningModule):
    """½θᵀAθ; records θ and its gradient before each update (the module's hook runs after every callback's)
    and, from an optimiser step post-hook, θ after it and the param group's LR it used."""

    def __init__(self, optimizer="sgd", momentum=0.0, measured_mode=None):
        super().__init__()
        self.theta = nn.Parameter(THETA0.clone())
        self.optimizer_name, self.momentum, self.measured_mode = optimizer, momentum, measured_mode
        self.step_lrs: list[float] = []
        self.step_thetas: list[torch.Tensor] = []
        self.step_grads: list[torch.Tensor] = []
        self.after_thetas: list[torch.Tensor] = []

    def training_loss(self, batch):
        if self.measured_mode == "nan":
            return self.theta.sum() * float("nan")
        return 0.5 * self.theta @ (A @ self.theta)

    def training_step(self, batch, batch_idx):
        return 0.5 * self.theta @ (A @ self.theta)

    def on_before_optimizer_step(self, optimizer):
        self.step_thetas.append(self.theta.detach().clone())
        self.step_grads.append(self.theta.grad.detach().clone())

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=0.01)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=0.01, momentum=self.momentum)

        def record(optimizer, args, kwargs):
            self.step_lrs.append(optimizer.param_groups[0]["lr"])
            self.after_thetas.append(self.theta.detach().clone())

        opt.register_step_post_hook(record)
        return opt


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_logged_lr_is_the_lr_the_step_used_and_the_greedy_step(hvp):
    logger = RecordingLogger()
    qn = QuasiNewtonLR(rule="batch_sharpness", every_n_steps=1, sharpness_ema=0.0, max_lr_growth=math.inf, hvp=hvp)
    model = StepLRQuadratic()
    _trainer([qn], max_steps=6, logger=logger, log_every_n_steps=1).fit(model, _loader())
    logged = logger.series("quasi_newton/lr")
    assert sorted(logged) == list(range(6))
    for step in range(6):
        g = model.step_grads[step]
        torch.testing.assert_close(g, A @ model.step_thetas[step])
        # The LR the update really used, from its displacement θ − θ₊ = lr·g (plain SGD).
        used = float((model.step_thetas[step] - model.after_thetas[step]) @ g) / float(g @ g)
        assert logged[step] == pytest.approx(used, rel=1e-9) and logged[step] == model.step_lrs[step]
        assert used == pytest.approx(float(g @ g) / float(g @ (A @ g)), rel=1e-6)
    sharpness = logger.series("quasi_newton/sharpness")
    assert all(sharpness[s] * logged[s] == pytest.approx(1.0, rel=1e-9) for s in range(6))
    assert "quasi_newton/h0" not in logger.at(0) and "hessian/h0" not in logger.at(0)
    assert qn.total_hvps == 6


def test_momentum_run_uses_the_buffer_direction():
    mu = 0.9
    qn = QuasiNewtonLR(rule="batch_sharpness", every_n_steps=1, sharpness_ema=0.0, max_lr_growth=math.inf)
    model = StepLRQuadratic(momentum=mu)
    _trainer([qn], max_steps=5).fit(model, _loader())
    buf = None
    for step in range(5):
        g = A @ model.step_thetas[step]
        buf = g.clone() if buf is None else mu * buf + g
        assert model.step_lrs[step] == pytest.approx(float(g @ buf) / float(buf @ (A @ buf)), rel=1e-6)


def test_adam_first_step_before_state_exists():
    qn = QuasiNewtonLR(rule="batch_sharpness", every_n_steps=1, sharpness_ema=0.0, max_lr_growth=math.inf)
    model = StepLRQuadratic(optimizer="adam")
    _trainer([qn], max_steps=1).fit(model, _loader())
    g = A @ model.step_thetas[0]
    d = g / (g.abs() + 1e-8)
    assert model.step_lrs[0] == pytest.approx(float(g @ d) / float(d @ (A @ d)), rel=1e-6)


def test_nan_measurement_never_reaches_the_optimiser():
    qn = QuasiNewtonLR(rule="batch_sharpness", every_n_steps=1)
    model = StepLRQuadratic(measured_mode="nan")
    with pytest.warns(UserWarning, match="rejected"):
        _trainer([qn], max_steps=3).fit(model, _loader())
    assert model.step_lrs == [0.01, 0.01, 0.01] and qn.rule.rejected_estimates == 3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(batch="fixed"), "batch"),
        (dict(momentum_aware=True), "momentum_aware"),
        (dict(smoothing=0.5), "smoothing"),
        (dict(rayleigh_every=3), "rayleigh_every"),
        (dict(sharpness_ema=1.5), "sharpness_ema"),
        (dict(warmup_steps=-2), "warmup_steps"),
    ],
)
def test_settings_that_do_not_apply_are_refused_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        QuasiNewtonLR(rule="batch_sharpness", **kwargs)


def test_unknown_optimiser_is_refused_at_fit_start():
    class RMS(StepLRQuadratic):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=0.01)

    with pytest.raises(ValueError, match="SGD, Adam and AdamW"):
        _trainer([QuasiNewtonLR(rule="batch_sharpness")], max_steps=1).fit(RMS(), _loader())


def test_the_state_key_names_a_rule_other_than_the_default():
    newton, edge, sharp = QuasiNewtonLR(), QuasiNewtonLR(rule="edge"), QuasiNewtonLR(rule="batch_sharpness")
    assert "rule" not in newton.state_key  # checkpoints of the default rule keep their key
    assert len({newton.state_key, edge.state_key, sharp.state_key}) == 3 and "batch_sharpness" in sharp.state_key


def test_the_rule_state_read_through_the_callback_is_a_deprecated_alias():
    qn = QuasiNewtonLR(scale=0.5)
    with pytest.warns(DeprecationWarning, match=r"QuasiNewtonLR\.scale is deprecated; read QuasiNewtonLR\.rule\.scale"):
        assert qn.scale == qn.rule.scale == 0.5
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        qn.nonexistent
