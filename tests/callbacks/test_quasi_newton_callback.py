"""``QuasiNewtonLR`` over ``QuasiNewtonRule`` in real fits: triggers, growth limit, weight decay, accumulation, Adam."""

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks.callbacks.quasi_newton import QuasiNewtonLR
from lyapunov_callbacks.core.stability import adam_stability_factor
from recording_logger import RecordingLogger
from test_quasi_newton import (
    A,
    Q,
    SPECTRUM,
    THETA0,
    LRRecorder,
    Quadratic,
    _least_squares_data,
    _loader,
    _trainer,
)

A_MAX = float(SPECTRUM[0])


class ChangingQuadratic(Quadratic):
    """½θᵀA_tθ with A_t = A before ``at_step`` and ``after`` (a matrix) from it on, in training and measuring."""

    def __init__(self, after, at_step, weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        self.after, self.at_step, self.weight_decay = after, at_step, weight_decay

    def _loss(self):
        matrix = self.after if self.trainer.global_step >= self.at_step else A
        return 0.5 * self.theta @ (matrix @ self.theta)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


# ------------------------------------------------------------------------------------------------ sharpening
@pytest.mark.parametrize("loss_rise", [1.0, None])
def test_sudden_100x_sharpening_is_answered_within_two_steps_by_the_loss_trigger(loss_rise):
    # From step 6 the second eigen-direction (curvature 2, where θ has weight) becomes 100 × a_max = 500.
    q1 = Q[:, 1]
    sharp = A + (100.0 * A_MAX - float(SPECTRUM[1])) * torch.outer(q1, q1)
    at = 6
    qn = QuasiNewtonLR(every_n_steps=100, tol=1e-8, warmup_tol=1e-8, loss_rise=loss_rise)
    rec = LRRecorder()
    model = ChangingQuadratic(sharp, at)
    _trainer([qn, rec], max_steps=at + 4).fit(model, _loader())
    assert rec.lrs[at - 1] == [pytest.approx(1.0 / A_MAX, rel=1e-6)]
    if loss_rise is None:
        # Without the trigger nothing answers before the next scheduled estimate (step 100): the LR stays 5×
        # above the new stability limit 2/500 and the sharp component grows 99× per step.
        assert all(rec.lrs[s] == [pytest.approx(1.0 / A_MAX, rel=1e-6)] for s in range(at, at + 4))
        assert float(q1 @ model.theta.detach()) ** 2 > 1e4 * float(q1 @ THETA0) ** 2
        return
    answered = [s for s in range(at, at + 4) if rec.lrs[s][0] == pytest.approx(1.0 / (100 * A_MAX), rel=1e-6)]
    assert answered and answered[0] <= at + 1       # the LR of the step at or after the sharpening is 1/500
    assert all(rec.lrs[s][0] <= 1.0 / (100 * A_MAX) * (1 + 1e-6) for s in range(answered[0], at + 4))
    assert qn.rule.triggers["loss"] >= 1 and qn.rule.triggers["schedule"] == 0
    # The step it answered at removes the sharp component (Newton's step along it): the run stays stable.
    assert abs(float(q1 @ model.theta.detach())) < abs(float(q1 @ rec.params[at]))


def test_rayleigh_trigger_sees_a_sharpening_of_the_top_direction_at_one_hvp_per_check():
    # From step 4 the top direction itself sharpens 100×. After the warm-up's Newton step θ has no weight
    # there, so the loss cannot show it yet; vᵀHv of the last eigenvector (one HVP) does, at once.
    q0 = Q[:, 0]
    at = 4
    qn = QuasiNewtonLR(every_n_steps=100, tol=1e-8, warmup_tol=1e-8, loss_rise=None, rayleigh_every=1)
    rec = LRRecorder()
    _trainer([qn, rec], max_steps=at + 2).fit(ChangingQuadratic(A + 99.0 * A_MAX * torch.outer(q0, q0), at), _loader())
    assert all(rec.lrs[s] == [pytest.approx(1.0 / A_MAX, rel=1e-6)] for s in range(at))
    assert rec.lrs[at] == [pytest.approx(1.0 / (100 * A_MAX), rel=1e-6)]
    assert qn.rule.triggers["rayleigh"] == 1 and qn.rule.triggers["schedule"] == 0
    # Cost: one HVP per check, at every step after the warm-up (1..at+1); the triggered estimate's own few.
    estimate = qn.total_hvps - qn.rule.warmup_hvps - (at + 1)
    assert 1 <= estimate <= 3, (qn.total_hvps, qn.rule.warmup_hvps)


def test_a_collapsing_h0_raises_the_lr_by_at_most_max_lr_growth_per_estimate():
    # From step 3 the curvature falls 1000×: 1/h0 jumps from 0.2 to 200, the LR may only double per estimate.
    at = 3
    qn = QuasiNewtonLR(every_n_steps=1, tol=1e-8, warmup_tol=1e-8, max_lr=1e3, max_lr_growth=2.0, loss_rise=None)
    rec = LRRecorder()
    _trainer([qn, rec], max_steps=at + 12).fit(ChangingQuadratic(1e-3 * A, at), _loader())
    lrs = [rec.lrs[s][0] for s in range(at + 12)]
    for s in range(at + 12):
        expected = 1.0 / A_MAX if s < at else min(2.0 ** (s - at + 1) / A_MAX, 1.0 / (1e-3 * A_MAX))
        assert lrs[s] == pytest.approx(expected, rel=1e-6), s
    assert max(b / a for a, b in zip(lrs, lrs[1:])) <= 2.0 * (1 + 1e-9)
    assert lrs[-1] == pytest.approx(200.0, rel=1e-6) and qn.rule.clamped_estimates == 0   # h0 sets it, not max_lr


def test_clamped_estimates_are_counted_and_logged():
    logger = RecordingLogger()
    qn = QuasiNewtonLR(every_n_steps=1, tol=1e-8, warmup_tol=1e-8, max_lr=0.1)   # 1/h0 = 0.2 > max_lr
    _trainer([qn], max_steps=3, logger=logger).fit(Quadratic(), _loader())
    assert qn.rule.lr == 0.1 and qn.rule.clamped_estimates == qn.rule.num_estimates
    assert logger.series("quasi_newton/clamped_estimates")[2] == float(qn.rule.num_estimates)


# ------------------------------------------------------------------------------------------------ weight decay
def test_coupled_weight_decay_enters_the_lr_and_the_step_removes_the_top_component():
    w = 3.0
    qn = QuasiNewtonLR(every_n_steps=1, tol=1e-8, warmup_tol=1e-8)
    rec = LRRecorder()
    model = ChangingQuadratic(A, 10**6, weight_decay=w)
    _trainer([qn, rec], max_steps=1).fit(model, _loader())
    assert rec.lrs[0] == [pytest.approx(1.0 / (A_MAX + w), rel=1e-8)]   # not 1/h0 = 0.2
    # The update map is I − α(A + wI): with α = 1/(a_max + w) the top component vanishes in one step.
    coords0, coords1 = Q.T @ THETA0, Q.T @ model.theta.detach()
    assert abs(float(coords1[0])) <= 1e-8 * abs(float(coords0[0]))
    torch.testing.assert_close(coords1, (1 - (SPECTRUM + w) / (A_MAX + w)) * coords0, rtol=1e-7, atol=1e-12)


# ------------------------------------------------------------------------------------------------ accumulation
class LeastSquares(L.LightningModule):
    def __init__(self, d, lr=0.01, optimizer="sgd"):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(d, 1).double()
        self.lr, self.optimizer = lr, optimizer

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.optimizer == "rmsprop":
            return torch.optim.RMSprop(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _design(x):
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def test_accumulated_step_is_estimated_on_the_mean_loss_of_its_micro_batches():
    x, y = _least_squares_data(n=16)
    logger = RecordingLogger()
    qn = QuasiNewtonLR(every_n_steps=1, tol=1e-10, warmup_tol=1e-10, max_iter=100)
    trainer = _trainer([qn], max_steps=1, logger=logger, accumulate_grad_batches=2)
    trainer.fit(LeastSquares(x.shape[1]), DataLoader(TensorDataset(x, y), batch_size=8))
    # The step optimises ½(L(B1) + L(B2)); its Hessian is the mean of the two micro-batch Hessians.
    h = [2.0 / 8 * _design(x[i : i + 8]).T @ _design(x[i : i + 8]) for i in (0, 8)]
    mean_top = float(torch.linalg.eigvalsh((h[0] + h[1]) / 2)[-1])
    first_top = float(torch.linalg.eigvalsh(h[0])[-1])
    assert abs(first_top - mean_top) > 1e-3 * mean_top                  # the two operators differ
    assert logger.series("quasi_newton/h0")[0] == pytest.approx(mean_top, rel=1e-8)


# ------------------------------------------------------------------------------------------------ Adam / AdamW
class AdamQuadratic(Quadratic):
    def __init__(self, optimizer="adamw", **kwargs):
        super().__init__(**kwargs)
        self.optimizer = optimizer

    def configure_optimizers(self):
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return cls(self.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


class AdamRecorder(LRRecorder):
    """Also records Adam's P = diag(√v̂ + ε) of the step about to be taken (its ``v`` before the step)."""

    def __init__(self):
        super().__init__()
        self.grads: dict[int, torch.Tensor] = {}
        self.state: dict[int, tuple] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        p = pl_module.theta
        self.grads[trainer.global_step] = p.grad.detach().clone()
        st = optimizer.state.get(p, {})
        self.state[trainer.global_step] = (
            None if "exp_avg_sq" not in st else (st["exp_avg_sq"].clone(), float(st["step"]))
        )


def _pre_h0(p_diag):
    d = p_diag.rsqrt()
    return float(torch.linalg.eigvalsh(d[:, None] * A * d[None, :])[-1])


def _frozen_adam_radius(alpha, p_diag, beta1=0.9):
    """Spectral radius of Adam's (θ, m) map on ½θᵀAθ with P frozen: m' = β1m + (1−β1)Aθ, θ' = θ − αP⁻¹m'."""
    n = len(p_diag)
    pinv = torch.diag(1.0 / p_diag)
    top = torch.cat([torch.eye(n, dtype=A.dtype) - alpha * (1 - beta1) * pinv @ A, -alpha * beta1 * pinv], dim=1)
    bottom = torch.cat([(1 - beta1) * A, beta1 * torch.eye(n, dtype=A.dtype)], dim=1)
    return float(torch.linalg.eigvals(torch.cat([top, bottom])).abs().max())


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_lr_is_half_the_frozen_preconditioner_limit_and_pre_h0_is_exact(optimizer):
    # No growth limit: the formula itself is under test (v̂ shrinks with the gradient, so the LR rises fast).
    qn = QuasiNewtonLR(every_n_steps=1, tol=1e-10, warmup_tol=1e-10, max_iter=100, max_lr=1e3, loss_rise=None,
                       max_lr_growth=math.inf)
    rec = AdamRecorder()
    logger = RecordingLogger()
    _trainer([qn, rec], max_steps=3, logger=logger).fit(AdamQuadratic(optimizer), _loader())
    c = adam_stability_factor(0.9)
    for step in range(3):
        if step == 0:
            # Before Adam has state: v̂₁ = g², P = |g| + ε, what the first step divides by.
            assert rec.state[0] is None
            p_diag = rec.grads[0].abs() + 1e-8
        else:
            v, t = rec.state[step]
            p_diag = (v / (1 - 0.999**t)).sqrt() + 1e-8
        pre_h0 = _pre_h0(p_diag)
        lr = rec.lrs[step][0]
        assert logger.series("quasi_newton/pre_h0")[step] == pytest.approx(pre_h0, rel=1e-6), step
        assert lr * pre_h0 == pytest.approx(c, rel=1e-6), step                 # α·λ1(P⁻¹H) = (1+β1)/(1−β1)
        # Half the limit: the frozen-P map is stable at α and at just under 2α, unstable just over it.
        assert _frozen_adam_radius(lr, p_diag) < 1.0
        assert _frozen_adam_radius(2 * lr * (1 - 1e-3), p_diag) < 1.0 < _frozen_adam_radius(2 * lr * (1 + 1e-3), p_diag)


def test_adamw_quasi_newton_trains_a_small_model_stably():
    from lyapunov_callbacks.datamodules import CIFAR10DataModule
    from lyapunov_callbacks.models import MLP

    class AdamWMLP(MLP):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-2)

    dm = CIFAR10DataModule(synthetic=True, synthetic_train_size=1000, synthetic_val_size=100, classes=[3, 5],
                           batch_size=32, val_fraction=0.0, download=False)
    dm.setup("fit")
    torch.manual_seed(0)
    model = AdamWMLP(num_classes=2, loss="ce", hidden_sizes=[32])
    full = next(iter(DataLoader(dm.train_set, batch_size=len(dm.train_set))))

    def full_loss():
        with torch.no_grad():
            return float(model.training_loss(full))

    start = full_loss()
    rec = LRRecorder()
    qn = QuasiNewtonLR(every_n_steps=10)
    _trainer([qn, rec], max_steps=100, max_epochs=-1, limit_val_batches=0).fit(model, datamodule=dm)
    end = full_loss()
    lrs = torch.tensor([v[0] for v in rec.lrs.values()])
    assert bool(torch.isfinite(lrs).all()) and bool((lrs > 1e-5).all()) and bool((lrs < 10.0).all())
    assert qn.rule.rejected_estimates == 0 and qn.rule.clamped_estimates == 0
    assert end < 0.8 * start, (start, end)


def test_other_optimisers_are_refused_at_setup_with_the_fix():
    x, y = _least_squares_data(n=16)
    with pytest.raises(ValueError, match="torch.optim.SGD, Adam or AdamW"):
        _trainer([QuasiNewtonLR()], max_steps=1).fit(
            LeastSquares(x.shape[1], optimizer="rmsprop"), DataLoader(TensorDataset(x, y), batch_size=8)
        )
