"""Tests of ``QuasiNewtonLR``: the LR it sets against exact Hessian eigenvalues, safety, resume, setup errors."""

import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks.callbacks.quasi_newton import QuasiNewtonLR, momentum_stability_factor
from recording_logger import RecordingLogger

# Spectrum of the quadratic test problem: a_max = 5 with a clear gap to the rest.
SPECTRUM = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)


def _orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


Q = _orthogonal(len(SPECTRUM))
A = Q @ torch.diag(SPECTRUM) @ Q.T
THETA0 = torch.linspace(1.0, 2.0, len(SPECTRUM), dtype=torch.float64)


class Quadratic(L.LightningModule):
    """Loss ½θᵀAθ of one parameter θ (the batch is ignored); SGD with the given settings.

    ``measured_mode`` changes only the loss the callback measures (``training_loss``) from step
    ``mode_from_step`` on: ``"concave"`` gives −½θᵀAθ (h0 = −a_min < 0), ``"nan"`` a NaN loss.
    """

    def __init__(self, lr=0.01, momentum=0.0, nesterov=False, dampening=0.0, measured_mode=None, mode_from_step=0):
        super().__init__()
        self.theta = nn.Parameter(THETA0.clone())
        self.lr, self.momentum, self.nesterov, self.dampening = lr, momentum, nesterov, dampening
        self.measured_mode, self.mode_from_step = measured_mode, mode_from_step

    def _loss(self):
        return 0.5 * self.theta @ (A @ self.theta)

    def training_loss(self, batch):
        loss = self._loss()
        if self.measured_mode is not None and self.trainer.global_step >= self.mode_from_step:
            loss = -loss if self.measured_mode == "concave" else loss * float("nan")
        return loss

    def training_step(self, batch, batch_idx):
        return self._loss()

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, dampening=self.dampening
        )


def _loader(n: int = 64, batch_size: int = 1) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch_size)


def _trainer(callbacks, max_steps=-1, max_epochs=None, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, max_steps=max_steps, max_epochs=max_epochs, **defaults)


class LRRecorder(Callback):
    """Records, at each optimiser step, the LR of every param group and the pre-step parameters."""

    def __init__(self):
        self.lrs: dict[int, list[float]] = {}
        self.params: dict[int, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = [g["lr"] for g in optimizer.param_groups]
        self.params[trainer.global_step] = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()


# ------------------------------------------------------------------------------------------------ the QN step
def test_quadratic_lr_is_inverse_top_eigenvalue_and_removes_top_component():
    qn = QuasiNewtonLR(every_n_steps=1, tol=1e-8, warmup_tol=1e-8)
    rec = LRRecorder()
    model = Quadratic(lr=0.01)
    _trainer([qn, rec], max_steps=1).fit(model, _loader())

    a_max = float(SPECTRUM[0])
    assert rec.lrs[0] == [pytest.approx(1.0 / a_max, rel=1e-4)]
    assert qn.rule.h0 == pytest.approx(a_max, rel=1e-6)
    # One GD step with α = 1/a_max multiplies the component along eigenvector i by 1 − a_i/a_max.
    coords0 = Q.T @ THETA0
    coords1 = Q.T @ model.theta.detach()
    assert abs(coords1[0]) <= 1e-6 * abs(coords0[0])
    expected = (1.0 - SPECTRUM / a_max) * coords0
    torch.testing.assert_close(coords1, expected, rtol=1e-6, atol=1e-10)
    # The warm-up ran to a stable estimate (two consecutive estimates) in few HVPs, and was logged.
    assert 2 <= qn.rule.warmup_hvps <= 20
    metrics = model.trainer.callback_metrics
    assert float(metrics["quasi_newton/warmup_hvps"]) == qn.rule.warmup_hvps
    assert float(metrics["quasi_newton/lr"]) == pytest.approx(1.0 / a_max, rel=1e-4)
    assert float(metrics["quasi_newton/h0"]) == pytest.approx(a_max, rel=1e-6)


def test_scale_clamp_and_every_n_steps():
    # scale 0.5 → α = 0.1; min_lr above it clamps to 0.15; re-estimates only at steps 0, 3, 6.
    qn = QuasiNewtonLR(scale=0.5, every_n_steps=3, min_lr=0.15, max_lr=1.0, tol=1e-8, warmup_tol=1e-8)
    rec = LRRecorder()
    _trainer([qn, rec], max_steps=7).fit(Quadratic(), _loader())
    assert all(lrs == [0.15] for lrs in rec.lrs.values())
    # Warm-up at 0 (two consecutive agreeing estimates), then scheduled estimates at 3 and 6 only.
    assert qn.rule.triggers["schedule"] == 2 and qn.rule.triggers["loss"] == 0
    assert qn.rule.num_estimates == qn.rule.triggers["warmup"] + 2


def test_momentum_stability_factor_matches_pytorch_sgd_map():
    """The stability limit 2c/h from the docstring vs the spectral radius of torch.optim.SGD's own linear map."""

    def sgd_map(h, lr, mu, nesterov):
        # Columns: images of (θ, m) = e1, e2 under one real SGD step on the loss ½hθ².
        cols = []
        for theta, m in ((1.0, 0.0), (0.0, 1.0)):
            p = nn.Parameter(torch.tensor([theta], dtype=torch.float64))
            opt = torch.optim.SGD([p], lr=lr, momentum=mu, nesterov=nesterov)
            opt.state[p]["momentum_buffer"] = torch.tensor([m], dtype=torch.float64)
            p.grad = h * p.detach().clone()
            opt.step()
            cols.append(torch.cat([p.detach(), opt.state[p]["momentum_buffer"]]))
        return torch.stack(cols, dim=1)

    h = 3.0
    for mu in (0.5, 0.9):
        for nesterov in (False, True):
            limit = 2.0 * momentum_stability_factor(mu, nesterov) / h
            below = torch.linalg.eigvals(sgd_map(h, limit * (1 - 1e-3), mu, nesterov)).abs().max()
            above = torch.linalg.eigvals(sgd_map(h, limit * (1 + 1e-3), mu, nesterov)).abs().max()
            assert below < 1.0 < above, (mu, nesterov, float(below), float(above))
    assert momentum_stability_factor(0.9) == pytest.approx(1.9)
    assert momentum_stability_factor(0.9, nesterov=True) == pytest.approx(1.9 / 2.8)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_aware_lr(nesterov):
    qn = QuasiNewtonLR(every_n_steps=1, momentum_aware=True, tol=1e-8, warmup_tol=1e-8)
    rec = LRRecorder()
    _trainer([qn, rec], max_steps=2).fit(Quadratic(momentum=0.9, nesterov=nesterov), _loader())
    c = (1.9 / 2.8) if nesterov else 1.9
    assert rec.lrs[0] == [pytest.approx(c / float(SPECTRUM[0]), rel=1e-4)]


def test_momentum_without_momentum_aware_warns():
    with pytest.warns(UserWarning, match="plain-SGD rule"):
        _trainer([QuasiNewtonLR()], max_steps=1).fit(Quadratic(momentum=0.9), _loader())


def test_momentum_aware_with_dampening_takes_the_dampened_heavy_ball_factor():
    # m <- μm + (1-τ)g is heavy ball with the step α(1-τ): stable for α h < 2(1+μ)/(1-τ), so c = (1+μ)/(1-τ),
    # the factor stability.stability_factor gives every caller.
    qn = QuasiNewtonLR(momentum_aware=True)
    _trainer([qn], max_steps=1).fit(Quadratic(momentum=0.9, dampening=0.1), _loader())
    assert qn.rule.stability_factor == pytest.approx((1 + 0.9) / (1 - 0.1), rel=1e-12)


# ---------------------------------------------------------------------------- linear least squares vs constant LR
class LeastSquares(L.LightningModule):
    """One ``nn.Linear(d, 1)``, mean squared error: H = (2/N)[X 1]ᵀ[X 1] on a full batch."""

    def __init__(self, d, lr):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(d, 1).double()
        self.lr = lr

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _least_squares_data(n=64, d=8, input_scale=2.5):
    g = torch.Generator().manual_seed(1)
    x = input_scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


class EpochLoss(Callback):
    """Full-data loss before training and after every epoch."""

    def __init__(self, x, y):
        self.x, self.y, self.losses = x, y, []

    def _record(self, pl_module):
        with torch.no_grad():
            self.losses.append(float(pl_module.training_loss((self.x, self.y))))

    def on_train_start(self, trainer, pl_module):
        self._record(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(pl_module)


def test_least_squares_constant_lr_diverges_quasi_newton_converges():
    x, y = _least_squares_data()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    h0_exact = float(torch.linalg.eigvalsh(2.0 / len(x) * design.T @ design)[-1])
    assert h0_exact > 2.0 / 0.3  # the data make the constant LR 0.3 unstable
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))  # full batch: the Hessian is exactly H

    constant = EpochLoss(x, y)
    _trainer([constant], max_epochs=5).fit(LeastSquares(x.shape[1], lr=0.3), loader)
    assert all(b > a for a, b in zip(constant.losses, constant.losses[1:]))  # grows every epoch
    assert constant.losses[-1] > 100 * constant.losses[0]

    qn_losses = EpochLoss(x, y)
    rec = LRRecorder()
    qn = QuasiNewtonLR(every_n_steps=1, max_lr=10.0)
    _trainer([qn, rec, qn_losses], max_epochs=5).fit(LeastSquares(x.shape[1], lr=0.3), loader)
    assert all(b < a for a, b in zip(qn_losses.losses, qn_losses.losses[1:]))  # decreases every epoch
    assert qn_losses.losses[-1] < 0.5 * qn_losses.losses[0]
    assert rec.lrs[0] == [pytest.approx(1.0 / h0_exact, rel=1e-3)]


# ------------------------------------------------------------------------------------------------ safety
@pytest.mark.parametrize("mode", ["nan", "concave"])
def test_bad_estimates_keep_last_good_lr(mode):
    qn = QuasiNewtonLR(every_n_steps=1, tol=1e-8, warmup_tol=1e-8)
    rec = LRRecorder()
    model = Quadratic(lr=0.01, measured_mode=mode, mode_from_step=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer([qn, rec], max_steps=5).fit(model, _loader())
    good = 1.0 / float(SPECTRUM[0])
    for step in range(5):
        assert rec.lrs[step] == [pytest.approx(good, rel=1e-4)], step
    assert qn.rule.rejected_estimates == 3  # steps 2, 3, 4
    assert float(model.trainer.callback_metrics["quasi_newton/rejected_estimates"]) == 3.0
    rejections = [w for w in caught if "rejected the h0 estimate" in str(w.message)]
    assert len(rejections) == 1
    if mode == "concave":
        # The estimate is an eigenvalue of −A (from the warm start, the exact top eigenvector of A, the Krylov
        # space is invariant at once, so Lanczos reports −a_max): negative, logged as measured.
        logged = float(model.trainer.callback_metrics["quasi_newton/h0"])
        assert logged < 0 and torch.isclose(-SPECTRUM, torch.tensor(logged, dtype=torch.float64), rtol=1e-6).any()
    else:
        assert math.isnan(float(model.trainer.callback_metrics["quasi_newton/h0"]))


def test_rejected_warm_up_falls_back_to_configured_lr_clamped():
    qn = QuasiNewtonLR(every_n_steps=1, max_lr=0.05)
    rec = LRRecorder()
    with pytest.warns(UserWarning, match="rejected the h0 estimate"):
        _trainer([qn, rec], max_steps=3).fit(Quadratic(lr=0.2, measured_mode="concave"), _loader())
    assert all(lrs == [0.05] for lrs in rec.lrs.values())  # the configured 0.2, clamped to max_lr
    assert qn.rule.rejected_estimates == 3


# ------------------------------------------------------------------------------------------------ logging
def test_logged_lr_matches_optimizer_and_learning_rate_monitor():
    logger = RecordingLogger()
    rec = LRRecorder()
    # The LearningRateMonitor is listed first on purpose: the callback moves itself in front of it.
    lr_monitor = LearningRateMonitor(logging_interval="step")
    qn = QuasiNewtonLR(every_n_steps=2, tol=1e-8, warmup_tol=1e-8)
    x, y = _least_squares_data()
    model = LeastSquares(x.shape[1], lr=0.01)
    trainer = _trainer([lr_monitor, qn, rec], max_steps=6, logger=logger, log_every_n_steps=1)
    # Mini-batches of 8: h0, hence the LR, differs from one estimate to the next.
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert trainer.callbacks.index(qn) < trainer.callbacks.index(lr_monitor)
    monitor_lr = logger.series("lr-SGD")
    qn_lr = logger.series("quasi_newton/lr")
    assert sorted(qn_lr) == [0, 2, 4]
    assert len(set(qn_lr.values())) == 3
    assert sorted(monitor_lr) == sorted(rec.lrs) == list(range(6))
    for step, lrs in rec.lrs.items():
        assert monitor_lr[step] == lrs[0]  # what the LearningRateMonitor shows is what the step used
        assert lrs[0] == qn_lr[step - step % 2]  # the LR set at the last estimate
    for step, value in qn_lr.items():
        assert logger.series("optim/lr")[step] == value
        assert logger.series("quasi_newton/h0")[step] == pytest.approx(1.0 / value, rel=1e-12)  # 1/h0 in [min, max]
        assert logger.series("hessian/inv_h0")[step] == pytest.approx(value, rel=1e-12)  # the figure's curve
        assert logger.series("hessian/h0")[step] == logger.series("quasi_newton/h0")[step]


# ------------------------------------------------------------------------------------------------ resume
def test_resume_keeps_h0_and_lr_without_new_warm_up(tmp_path):
    qn = QuasiNewtonLR(every_n_steps=3, smoothing=0.5)
    first = _trainer([qn], max_steps=4)
    first.fit(Quadratic(lr=0.01), _loader())
    ckpt = tmp_path / "qn.ckpt"
    first.save_checkpoint(ckpt)
    saved = dict(qn.state_dict()["rule"])
    saved_vectors = qn._tracker.eigenvectors.clone()
    saved_hvps = qn.total_hvps

    class Probe(Callback):
        """Record the resumed callback's state at the first resumed step (4: not an estimate step)."""

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 4:
                self.lr = optimizer.param_groups[0]["lr"]
                self.hvps = resumed.total_hvps
                self.warmup_done = resumed.rule.warmup_done

    resumed = QuasiNewtonLR(every_n_steps=3, smoothing=0.5)
    probe = Probe()
    second = _trainer([resumed, probe], max_steps=7)
    second.fit(Quadratic(lr=0.01), _loader(), ckpt_path=ckpt)
    assert probe.lr == saved["lr"]
    assert probe.hvps == saved_hvps  # no warm-up re-run
    assert resumed.rule.warmup_hvps == saved["warmup_hvps"]
    assert resumed.rule.num_estimates == saved["num_estimates"] + 1  # only the step-6 re-estimate
    # The loaded warm-start vector is the saved one.
    loaded = QuasiNewtonLR(every_n_steps=3, smoothing=0.5)
    loaded.load_state_dict(torch.load(ckpt, weights_only=False)["callbacks"][qn.state_key])
    torch.testing.assert_close(loaded._tracker.eigenvectors, saved_vectors, rtol=0, atol=0)
    assert loaded.rule.h0_smoothed == saved["h0_smoothed"] and loaded.rule.lr == saved["lr"]


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"scale": 0.0}, "scale"),
        ({"scale": -1.0}, "scale"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"method": "newton"}, "method"),
        ({"hvp": "jvp"}, "hvp"),
        ({"batch": "random"}, "batch"),
        ({"probe_size": 0}, "probe_size"),
        ({"tol": 0.0}, "tol"),
        ({"warmup_max_hvps": 0}, "warmup_max_hvps"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"smoothing": -0.1}, "smoothing"),
        ({"min_lr": 0.0}, "min_lr"),
        ({"min_lr": 1.0, "max_lr": 0.5}, "min_lr"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_invalid_arguments(kwargs, param):
    with pytest.raises(ValueError, match=param):
        QuasiNewtonLR(**kwargs)


class WithScheduler(Quadratic):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1)}


class NoLrOptimizer(torch.optim.Optimizer):
    """A (sign-)descent optimiser with a fixed step and no ``lr`` in its param groups."""

    def __init__(self, params):
        super().__init__(params, defaults={"step_size": 0.01})

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad.sign(), alpha=-group["step_size"])
        return loss


class WithoutLr(Quadratic):
    def configure_optimizers(self):
        return NoLrOptimizer(self.parameters())


def test_setup_errors():
    with pytest.raises(ValueError, match="remove lr_scheduler"):
        _trainer([QuasiNewtonLR()], max_steps=1).fit(WithScheduler(), _loader())
    with pytest.raises(ValueError, match="no 'lr'"):
        _trainer([QuasiNewtonLR()], max_steps=1).fit(WithoutLr(), _loader())

    class Manual(Quadratic):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimisation"):
        _trainer([QuasiNewtonLR()], max_steps=1).fit(Manual(), _loader())


# ------------------------------------------------------------------------------------------------ MLP runs
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mlp_short_run_lowers_loss_with_lr_in_bounds(loss):
    from lyapunov_callbacks.datamodules import CIFAR10DataModule
    from lyapunov_callbacks.models import MLP

    dm = CIFAR10DataModule(synthetic=True, synthetic_train_size=2000, synthetic_val_size=100, classes=[3, 5],
                           batch_size=16, val_fraction=0.0, download=False)
    dm.setup("fit")
    torch.manual_seed(0)
    model = MLP(num_classes=2, loss=loss, hidden_sizes=[32])
    full = next(iter(DataLoader(dm.train_set, batch_size=len(dm.train_set))))

    def full_loss():
        with torch.no_grad():
            return float(model.training_loss(full))

    start = full_loss()
    rec = LRRecorder()
    qn = QuasiNewtonLR(every_n_steps=10, min_lr=1e-3, max_lr=2.0)
    _trainer([qn, rec], max_steps=200, max_epochs=-1, limit_val_batches=0).fit(model, datamodule=dm)
    end = full_loss()
    assert len(rec.lrs) == 200
    lrs = torch.tensor([v for lrs in rec.lrs.values() for v in lrs])
    assert bool(((lrs >= 1e-3) & (lrs <= 2.0)).all())
    assert end < 0.9 * start, (start, end)
    assert qn.rule.rejected_estimates == 0
    # One warm-up, then an estimate at least every 10 steps (a loss trigger restarts the count).
    assert qn.rule.triggers["schedule"] + qn.rule.triggers["loss"] >= 19


def test_default_re_estimate_tolerance_is_1e_2_and_warm_up_stays_tight():
    qn = QuasiNewtonLR()
    assert qn.tol == qn._tracker.tol == 1e-2  # re-estimates: h0 within 1e-2 of an eigenvalue
    assert qn.rule.warmup_tol == 1e-3  # the warm-up still converges tightly from its cold start
