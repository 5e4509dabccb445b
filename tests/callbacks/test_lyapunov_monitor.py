"""LyapunovExponentMonitor: λ on quadratics (SGD, momentum, Nesterov) against exact spectral radii; dropout masks;
windows; validation; resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lyapunov_callbacks.callbacks._lightning as glue_mod  # builds the monitors' operators
from lyapunov_callbacks.callbacks.lyapunov_monitor import LyapunovExponentMonitor
from recording_logger import RecordingLogger

A_SPECTRUM = torch.tensor([1.0, 3.0, 7.0], dtype=torch.float64)


def _rotation() -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    return q


class Quadratic(L.LightningModule):
    """L(θ) = ½ θᵀAθ with A = Q diag(a) Qᵀ (known spectrum), one parameter θ; the batch is ignored."""

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False) -> None:
        super().__init__()
        q = _rotation()
        self.register_buffer("A", q @ torch.diag(A_SPECTRUM) @ q.T)
        self.theta = nn.Parameter(torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64))
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov

    def training_loss(self, batch):
        return 0.5 * self.theta @ self.A @ self.theta

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([self.theta], lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)


class QuadraticNoHook(Quadratic):
    training_loss = None  # type: ignore[assignment]

    def training_step(self, batch, batch_idx):
        loss = 0.5 * self.theta @ self.A @ self.theta
        self.log("train/loss", loss)
        return loss


def _loader(n: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1, dtype=torch.float64)), batch_size=1)


def _trainer(callbacks, logger=None, max_steps: int = 30, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=logger if logger is not None else False,
        enable_checkpointing=kw.pop("enable_checkpointing", False), enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, log_every_n_steps=1000, **kw,
    )


def _momentum_map(lr: float, mu: float, nesterov: bool) -> torch.Tensor:
    """The true linear map of one torch.optim.SGD momentum step on (θ, m) for L = ½θᵀAθ (after the first step)."""
    n = A_SPECTRUM.numel()
    q = _rotation()
    A = q @ torch.diag(A_SPECTRUM) @ q.T
    eye = torch.eye(n, dtype=torch.float64)
    # m' = μm + Aθ;  θ' = θ − α m'  (heavy ball)  or  θ' = θ − α(Aθ + μ m')  (Nesterov)
    if nesterov:
        top = torch.cat([eye - lr * (1 + mu) * A, -lr * mu * mu * eye], 1)
    else:
        top = torch.cat([eye - lr * A, -lr * mu * eye], 1)
    bottom = torch.cat([A, mu * eye], 1)
    return torch.cat([top, bottom], 0)


@pytest.mark.parametrize("lr", [0.2, 0.3], ids=["stable", "unstable"])
def test_lambda_on_quadratic_sgd_equals_log_max_multiplier(lr):
    # multipliers 1 - lr·a: lr=0.2 → (0.8, 0.4, -0.4), λ = log 0.8; lr=0.3 → (0.7, 0.1, -1.1), λ = log 1.1
    exact = math.log(float((1 - lr * A_SPECTRUM).abs().max()))
    rec = RecordingLogger()
    trainer = _trainer([LyapunovExponentMonitor(window=10)], logger=rec, max_steps=30)
    trainer.fit(Quadratic(lr), _loader())
    lam = rec.series("lyapunov/lambda")
    assert sorted(lam) == [9, 19, 29]  # logged at the last step of each window of 10
    # the first window holds the transient from a random δ; the third is converged (ratio ≤ 0.64 per step)
    assert lam[29] == pytest.approx(exact, abs=1e-3)
    assert lam[19] == pytest.approx(exact, abs=1e-3)
    assert rec.series("optim/lr")[29] == lr
    assert float(trainer.callback_metrics["lyapunov/lambda"]) == pytest.approx(lam[29], abs=1e-6)


@pytest.mark.parametrize("nesterov, lr", [(False, 0.6), (True, 0.3)], ids=["heavy_ball", "nesterov"])
def test_lambda_with_momentum_equals_log_spectral_radius_of_momentum_map(nesterov, lr):
    # μ = 0.9: the map's eigenvalues are complex with modulus √μ except where lr·a is large enough for a real
    # pair; lr is chosen so a real multiplier dominates (heavy ball: -1.8; Nesterov: ≈ -2.49; λ > 0)
    mu = 0.9
    moduli = torch.linalg.eigvals(_momentum_map(lr, mu, nesterov)).abs().sort(descending=True).values
    assert moduli[1] / moduli[0] < 0.75  # a dominant real multiplier: the window average converges fast
    exact = math.log(float(moduli[0]))
    rec = RecordingLogger()
    _trainer([LyapunovExponentMonitor(window=10)], logger=rec, max_steps=30).fit(
        Quadratic(lr, momentum=mu, nesterov=nesterov), _loader()
    )
    assert rec.series("lyapunov/lambda")[29] == pytest.approx(exact, abs=1e-3)


def test_fallback_without_training_loss_gives_the_same_lambda_and_windows_keep_delta():
    lr = 0.2
    values = []
    for cls in (Quadratic, QuadraticNoHook):
        rec = RecordingLogger()
        # windows of 5 steps starting at steps 0, 15, 30: δ is kept (no HVP) between windows
        _trainer([LyapunovExponentMonitor(window=5, every_n_steps=15)], logger=rec, max_steps=35).fit(
            cls(lr), _loader()
        )
        values.append(rec.series("lyapunov/lambda"))
    assert sorted(values[0]) == [4, 19, 34]
    assert values[0] == pytest.approx(values[1], abs=1e-12)
    assert values[0][34] == pytest.approx(math.log(0.8), abs=1e-3)


class DropoutNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


def test_hvp_uses_the_training_steps_dropout_masks(monkeypatch):
    """The operator built in on_before_optimizer_step replays the training forward's RNG: its gradient is the
    gradient the optimiser is about to apply (a different dropout mask would give a different gradient)."""
    grads: list[torch.Tensor] = []

    build_operator = glue_mod.HessianOperator

    def spy_operator(*args, **kwargs):
        op = build_operator(*args, **kwargs)
        grads.append(op.gradient())
        return op

    class CompareGrad(L.Callback):  # placed after the monitor
        def __init__(self):
            self.diffs: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            flat = torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()])
            self.diffs.append(float((grads[-1] - flat).abs().max() / flat.abs().max()))

    monkeypatch.setattr(glue_mod, "HessianOperator", spy_operator)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (48,), generator=g))
    compare = CompareGrad()
    # The operator path (products on the training graph need no replay; tests/test_lyapunov_training_graph.py).
    monitor = LyapunovExponentMonitor(window=3, reuse_training_graph=False)
    _trainer([monitor, compare], max_steps=6).fit(DropoutNet(), DataLoader(data, batch_size=8, shuffle=True))
    assert len(compare.diffs) == 6 and len(grads) == 6  # one operator (one HVP) per step
    assert max(compare.diffs) < 1e-12
    assert monitor.tangent.num_steps == 6 and math.isfinite(monitor.last_metrics["lyapunov/lambda"])


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"window": 0}, "window"),
        ({"window": 2.0}, "window"),
        ({"window": 10, "every_n_steps": 5}, "every_n_steps"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"hvp": "jvp"}, "hvp"),
        ({"dtype": "half"}, "dtype"),
    ],
)
def test_invalid_arguments_raise_naming_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        LyapunovExponentMonitor(**kwargs)


def test_an_adaptive_cadence_is_refused_with_the_reason_and_the_fix():
    with pytest.raises(ValueError, match=r"every_n_steps='auto'.*changes sign.*every_n_steps=None.*>= window=20"):
        LyapunovExponentMonitor(every_n_steps="auto")


class RMSpropQuadratic(Quadratic):
    def configure_optimizers(self):
        return torch.optim.RMSprop([self.theta], lr=self.lr)


class ManualQuadratic(Quadratic):
    def __init__(self, lr):
        super().__init__(lr)
        self.automatic_optimization = False


@pytest.mark.parametrize(
    "model, trainer_kw, error, match",
    [
        (RMSpropQuadratic(0.1), {}, ValueError, "RMSprop"),
        (ManualQuadratic(0.1), {}, ValueError, "automatic optimisation"),
    ],
    ids=["rmsprop", "manual"],
)
def test_unsupported_training_setups_fail_at_fit_start(model, trainer_kw, error, match):
    steps = []

    class CountSteps(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(error, match=match):
        _trainer([LyapunovExponentMonitor(window=2), CountSteps()], max_steps=2, **trainer_kw).fit(model, _loader())
    assert steps == []  # before any training step


def test_state_dict_round_trip_continues_delta_and_partial_window(tmp_path):
    lr = 0.2
    monitor = LyapunovExponentMonitor(window=4)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    _trainer([monitor, ckpt], max_steps=6, enable_checkpointing=True).fit(Quadratic(lr, momentum=0.5), _loader())
    saved = monitor.state_dict()["tangent"]
    window = monitor.state_dict()["window"]
    assert saved["num_steps"] == 6 and window["steps"] == 2  # a partial window of 2 steps

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = resumed.tangent.state_dict()
            self.window = resumed.state_dict()["window"]

    resumed, probe, rec = LyapunovExponentMonitor(window=4), Probe(), RecordingLogger()
    _trainer([resumed, probe], logger=rec, max_steps=8).fit(
        Quadratic(lr, momentum=0.5), _loader(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    for key in ("delta_theta", "delta_m"):
        assert torch.equal(probe.state[key], saved[key])
    assert probe.state["num_steps"] == 6 and probe.window == window
    assert probe.state["momentum_initialized"] is True
    # the partial window is completed by steps 6 and 7 and logged at step 7
    assert sorted(rec.series("lyapunov/lambda")) == [7]
    assert resumed.tangent.num_steps == 8


class CountingQuadratic(Quadratic):
    """Counts the loss evaluations: the training step's and the monitor's."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr)
        self.loss_calls = 0

    def training_loss(self, batch):
        self.loss_calls += 1
        return super().training_loss(batch)


def test_finite_difference_reuses_the_training_gradient_and_is_exact_on_a_quadratic():
    # Finite differences are exact on a quadratic (up to round-off), so λ must match log max|1 - lr·a|; and
    # with the training step's own ∇L(θ) from .grad each propagated step evaluates the loss once (at θ+εδ).
    lr = 0.3
    exact = math.log(float((1 - lr * A_SPECTRUM).abs().max()))
    model = CountingQuadratic(lr)
    rec = RecordingLogger()
    _trainer([LyapunovExponentMonitor(window=10, hvp="finite_difference")], logger=rec, max_steps=30).fit(
        model, _loader()
    )
    assert rec.series("lyapunov/lambda")[29] == pytest.approx(exact, abs=1e-6)
    assert model.loss_calls == 30 + 30  # 30 training steps + one perturbed gradient per propagated step
