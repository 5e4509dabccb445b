"""Hessian-vector products on the training step's own graph: ``graph_hvp`` and the λ monitor's use of it."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lyapunov_callbacks.core.training_graph as graph_mod  # sums the products on the training graph
import lyapunov_callbacks.callbacks._lightning as glue_mod  # builds the monitors' operators
from lyapunov_callbacks.core.hessian import graph_hvp
from lyapunov_callbacks.callbacks.lyapunov_monitor import LyapunovExponentMonitor
from test_lyapunov_monitor import DropoutNet  # training_loss / training_step of a CE classifier on self.net


# ----------------------------------------------------------------------------- graph_hvp
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (7,), generator=g)


def test_graph_hvp_matches_the_exact_hessian_and_leaves_the_graph_to_the_caller():
    model = _net()
    x, y = _batch()
    params = list(model.parameters())
    shapes = [p.shape for p in params]

    def flat_loss(theta):
        pieces = torch.split(theta, [math.prod(s) for s in shapes])
        out = torch.func.functional_call(model, {n: t.view(s) for (n, _), t, s in
                                                 zip(model.named_parameters(), pieces, shapes)}, (x,))
        return nn.functional.cross_entropy(out, y)

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(flat_loss, theta)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    loss = nn.functional.cross_entropy(model(x), y)
    hv = graph_hvp(loss, params, v)
    torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in params)  # no .grad written
    loss.backward()  # the graph is still usable: the caller's training backward runs after
    expected = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    for p, g in zip(params, expected):
        assert torch.equal(p.grad, g)


def test_graph_hvp_zero_pieces_and_bad_arguments():
    w = nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    loss = (w**2).sum() * 1.5 + 3.0 * b.sum()  # linear in b: its piece of H v is zero
    hv = graph_hvp(loss, [w, b], torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    assert torch.equal(hv, torch.tensor([3.0, 6.0, 0.0], dtype=torch.float64))
    linear = 3.0 * b.sum()
    assert torch.equal(graph_hvp(linear, [b], torch.ones(1, dtype=torch.float64)), torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[dim="):
        graph_hvp(loss, [w, b], torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="requires grad"):
        graph_hvp(loss.detach(), [w, b], torch.ones(3, dtype=torch.float64))


# ----------------------------------------------------------------------------- the λ monitor
class Net(DropoutNet):
    """Tanh MLP with dropout and BatchNorm (train mode), momentum SGD with weight decay, or AdamW."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2)
        ).double()
        self.optimizer = optimizer

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (64,), generator=g))
    return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))


def _fit(monitor, model, steps: int = 12, **kw) -> list[float]:
    """Per-step log growth of δ (``tangent.last_log_growth``), read after every optimiser step."""
    growth: dict[int, float] = {}

    class Read(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if monitor.tangent.num_steps:  # keyed by step: with accumulation several batches end per step
                growth[trainer.global_step] = monitor.tangent.last_log_growth

    torch.manual_seed(1)
    L.Trainer(
        max_steps=steps, callbacks=[monitor, Read()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, **kw,
    ).fit(model, _loader())
    return [growth[k] for k in sorted(growth)]


def _count(monkeypatch) -> dict[str, int]:
    calls = {"graph": 0, "operator": 0}
    graph, operator = graph_mod.graph_hvp, glue_mod.HessianOperator

    def counted_graph(*args, **kwargs):
        calls["graph"] += 1
        return graph(*args, **kwargs)

    def counted_operator(*args, **kwargs):
        calls["operator"] += 1
        return operator(*args, **kwargs)

    monkeypatch.setattr(graph_mod, "graph_hvp", counted_graph)
    monkeypatch.setattr(glue_mod, "HessianOperator", counted_operator)
    return calls


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_products_on_the_training_graph_give_the_operators_bits(monkeypatch, optimizer):
    # Same weights, batch, dropout masks and BatchNorm batch statistics: the product on the training step's
    # graph is the operator's (which evaluates training_loss again with the RNG replayed), bit for bit.
    calls = _count(monkeypatch)
    on = _fit(LyapunovExponentMonitor(window=4), Net(optimizer))
    assert calls == {"graph": 12, "operator": 0}
    off = _fit(LyapunovExponentMonitor(window=4, reuse_training_graph=False), Net(optimizer))
    assert calls == {"graph": 12, "operator": 12}
    assert on == off and all(math.isfinite(g) for g in on)


def test_accumulation_sums_the_micro_batch_products(monkeypatch):
    # Lightning divides each micro-batch loss by k before its backward: the products add up to H of the mean
    # loss, which the operator differentiates as one graph (equal up to the order of the sums).
    calls = _count(monkeypatch)
    on = _fit(LyapunovExponentMonitor(window=3), Net(), steps=6, accumulate_grad_batches=2)
    assert calls == {"graph": 12, "operator": 0} and len(on) == 6
    off = _fit(LyapunovExponentMonitor(window=3, reuse_training_graph=False), Net(), steps=6, accumulate_grad_batches=2)
    assert calls["operator"] == 6
    assert on == pytest.approx(off, rel=1e-9, abs=1e-12)


def test_every_n_steps_takes_products_only_in_the_windows(monkeypatch):
    calls = _count(monkeypatch)
    _fit(LyapunovExponentMonitor(window=2, every_n_steps=5), Net(), steps=12)
    assert calls == {"graph": 6, "operator": 0}  # steps 0, 1, 5, 6, 10, 11


@pytest.mark.parametrize(
    "monitor_kw, model_setup",
    [
        ({"hvp": "finite_difference"}, None),  # the perturbed gradient needs a forward of its own
        ({"dtype": "float32"}, None),  # the tangent's dtype differs from the float64 parameters
        ({}, lambda m: m.net[0].weight.register_hook(lambda g: g)),  # it would run during the extra passes
    ],
    ids=["finite_difference", "other_dtype", "parameter_hook"],
)
def test_the_operator_is_used_where_the_training_graph_cannot_be(monkeypatch, monitor_kw, model_setup):
    calls = _count(monkeypatch)
    model = Net()
    if model_setup is not None:
        model_setup(model)
    _fit(LyapunovExponentMonitor(window=4, **monitor_kw), model, steps=4)
    assert calls == {"graph": 0, "operator": 4}


class _TanhDerivative(torch.autograd.Function):
    """``grad · (1 − y²)`` with no derivative of its own (like a fused kernel without a double backward)."""

    @staticmethod
    def forward(ctx, grad, y):
        return grad * (1 - y * y)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this kernel has no double backward")


class NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _TanhDerivative.apply(grad, y)


class FusedNet(Net):
    """Uses the non-twice-differentiable tanh in training_step only; training_loss is the differentiable twin."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = NoDoubleBackward.apply(self.net[1](self.net[0](x)))
        return nn.functional.cross_entropy(self.net[4](self.net[3](h)), y)


def test_a_graph_without_double_backward_falls_back_to_the_operator(monkeypatch):
    calls = _count(monkeypatch)
    monitor = LyapunovExponentMonitor(window=4)
    growth = _fit(monitor, FusedNet(), steps=4)
    # The first step's product fails on the graph (retained: the training backward still runs), then every
    # step evaluates training_loss again through the operator.
    assert calls == {"graph": 1, "operator": 4}
    assert not monitor._graph.enabled
    off = _fit(LyapunovExponentMonitor(window=4, reuse_training_graph=False), FusedNet(), steps=4)
    assert growth == off and all(math.isfinite(g) for g in growth)


def test_reuse_training_graph_must_be_a_bool():
    with pytest.raises(ValueError, match="reuse_training_graph"):
        LyapunovExponentMonitor(reuse_training_graph="yes")


class PoisonedNet(Net):
    """The loss training_step returns is NaN at the last step (the step λ must skip)."""

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch)
        return loss * float("nan") if self.trainer.global_step == 3 else loss


def test_a_non_finite_product_on_the_graph_is_skipped():
    monitor = LyapunovExponentMonitor(window=4)
    with pytest.warns(RuntimeWarning, match="skipped_steps"):
        growth = _fit(monitor, PoisonedNet(), steps=4)
    reference = _fit(LyapunovExponentMonitor(window=4), Net(), steps=4)
    assert growth[:3] == reference[:3] and growth[3] == growth[2]  # δ and its last growth are kept
    assert monitor.skipped_steps == 1 and monitor.tangent.num_steps == 3
    assert monitor.last_metrics["lyapunov/lambda"] == pytest.approx(sum(reference[:3]) / 3, rel=1e-12)
