"""torch.compile'd models, in the three ways of writing it, measured through their eager code.

For each style (``self.net = torch.compile(net)``, ``module.compile()``, ``trainer.fit(torch.compile(module))``) a
float64 tanh MLP trains a few steps with the callbacks attached: nothing is refused, h0 at step 0 equals the top
eigenvalue of the dense Hessian of the uncompiled model at the same weights, every logged value (h0, pre_h0, λ,
the quasi-Newton LR) equals the one of the same run without torch.compile, and the compiled step's graphs are
the same ones (same number) as in a run without the callbacks: measuring compiles nothing.

The styles compile with a counting ``aot_eager`` backend (AOTAutograd, as the default backend: its graphs have no
double backward) to keep compile times short on a CPU; ``module.compile()`` is also run with the default
(inductor) backend.
"""

from __future__ import annotations

import copy
import logging

import lightning as L
import pytest
import torch
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch.utils.data import DataLoader, TensorDataset

from lyapunov_callbacks import HessianEigenvalueMonitor, HessianOperator, LyapunovExponentMonitor, QuasiNewtonLR
from lyapunov_callbacks.core.compiled import CompiledModelError, compiled_modules, eager_evaluation
from recording_logger import RecordingLogger

pytestmark = pytest.mark.skipif(
    not callable(getattr(torch.compiler, "set_stance", None)), reason="eager evaluation needs PyTorch >= 2.6"
)

STYLES = ("attribute", "module_compile", "fit_compiled")
STEPS = 4


class CountingBackend:
    """``aot_eager`` (AOTAutograd with eager kernels), counting the graphs dynamo hands it."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return lookup_backend("aot_eager")(gm, example_inputs)


class Net(L.LightningModule):
    """Float64 tanh MLP 4 -> 6 -> 3, mean cross-entropy, Adam or SGD; ``training_loss`` goes through ``forward``."""

    def __init__(self, optimizer: str = "adam") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        return self.training_loss(batch)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.05)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _monitors() -> list[L.Callback]:
    return [
        HessianEigenvalueMonitor(every_n_steps=1, tol=1e-10, max_iter=60, pre_h0=True),
        LyapunovExponentMonitor(window=2),
    ]


def _fit(style: str | None, callbacks: list[L.Callback], optimizer: str = "adam", backend=None):
    """Fit ``Net`` for ``STEPS`` steps, compiled in ``style`` (``None``: not compiled). Returns the logger, the
    number of graphs the backend compiled, dynamo's unique-graph count and the module."""
    torch._dynamo.reset()
    start = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    backend = CountingBackend() if backend is None else backend
    model = Net(optimizer)
    fitted = model
    if style == "attribute":
        model.net = torch.compile(model.net, backend=backend)
    elif style == "module_compile":
        model.compile(backend=backend)
    elif style == "fit_compiled":
        fitted = torch.compile(model, backend=backend)
    rec = RecordingLogger()
    trainer = L.Trainer(
        max_steps=STEPS, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0, log_every_n_steps=1000,
    )
    trainer.loggers = [rec]
    trainer.fit(fitted, _loader())
    unique = torch._dynamo.utils.counters["stats"]["unique_graphs"] - start
    return rec, getattr(backend, "graphs", None), unique, model


def _dense_top_eigenvalue(model: Net, batch) -> float:
    """Top eigenvalue of the dense Hessian of the uncompiled model's loss at its current weights."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        pieces, offset = {}, 0
        for name, shape in zip(names, shapes):
            pieces[name] = theta[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, pieces, (batch[0],)), batch[1])

    hessian = torch.autograd.functional.hessian(loss, flat)
    return float(torch.linalg.eigvalsh(hessian)[-1])


@pytest.fixture(scope="module")
def eager_run():
    """The uncompiled reference run with the monitors."""
    rec, _, unique, _ = _fit(None, _monitors())
    assert unique == 0
    return rec


@pytest.mark.parametrize("style", STYLES)
def test_compiled_model_is_measured_eagerly_with_the_values_of_an_uncompiled_run(style, eager_run, caplog):
    with caplog.at_level(logging.INFO):
        rec, graphs, unique, model = _fit(style, _monitors())
    assert compiled_modules(model)  # the run really was compiled, in this style
    h0 = rec.series("hessian/h0")
    assert sorted(h0) == list(range(STEPS))
    # Step 0: the weights are the initial ones, the batch the loader's first: the dense reference.
    first_batch = next(iter(_loader()))
    reference = _dense_top_eigenvalue(Net(), first_batch)
    assert h0[0] == pytest.approx(reference, rel=1e-6)
    # Every logged value equals the uncompiled run's (same weights up to rounding of the compiled step).
    for tag in ("hessian/h0", "hessian/pre_h0", "hessian/stability", "lyapunov/lambda"):
        expected = eager_run.series(tag)
        got = rec.series(tag)
        assert sorted(got) == sorted(expected) and got, tag
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-9), (tag, step)
    # λ on the training graph is not attempted on a compiled step: one message says so, once.
    assert caplog.text.count("LyapunovExponentMonitor: the training step runs torch.compile'd code") == 1
    assert "the Hessian-vector product on the training step's graph failed" not in caplog.text
    # Measuring compiled nothing: the same graphs as a compiled run without any callback.
    _, bare_graphs, bare_unique, _ = _fit(style, [])
    assert graphs == bare_graphs >= 1
    assert unique == bare_unique


@pytest.mark.parametrize("style", STYLES)
def test_quasi_newton_lr_on_a_compiled_model_follows_the_uncompiled_run(style):
    def qn():
        return [QuasiNewtonLR(every_n_steps=2, warmup_tol=1e-8, tol=1e-8)]

    rec, graphs, _, _ = _fit(style, qn(), optimizer="sgd")
    eager, _, _, _ = _fit(None, qn(), optimizer="sgd")
    _, bare_graphs, _, _ = _fit(style, [], optimizer="sgd")
    lr, expected = rec.series("quasi_newton/lr"), eager.series("quasi_newton/lr")
    assert lr and sorted(lr) == sorted(expected)
    for step in expected:
        assert lr[step] == pytest.approx(expected[step], rel=1e-6), step
    assert graphs == bare_graphs


def test_module_compile_with_the_default_inductor_backend():
    # The default backend (inductor) generates and compiles C++ for the step; the measurement runs eagerly.
    rec, _, unique, model = _fit("module_compile", [HessianEigenvalueMonitor(every_n_steps=1, tol=1e-10)],
                                 backend="inductor")
    _, _, bare_unique, _ = _fit("module_compile", [], backend="inductor")
    first_batch = next(iter(_loader()))
    assert rec.series("hessian/h0")[0] == pytest.approx(_dense_top_eigenvalue(Net(), first_batch), rel=1e-6)
    assert unique == bare_unique >= 1


def test_operator_on_a_compiled_plain_module_matches_the_eager_module_and_compiles_nothing():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    backend = CountingBackend()
    compiled = torch.compile(copy.deepcopy(net), backend=backend)

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    loss_fn(compiled, (x, y)).backward()  # one compiled training step's forward and backward
    assert backend.graphs == 1
    v = torch.randn(sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    for backend_name in ("autograd", "finite_difference"):
        with HessianOperator(net, loss_fn, (x, y), backend=backend_name) as eager_op, \
                HessianOperator(compiled, loss_fn, (x, y), backend=backend_name) as compiled_op:
            torch.testing.assert_close(compiled_op.matvec(v), eager_op.matvec(v), rtol=1e-12, atol=1e-12)
    # A float32 operator on the float64 module casts the weights: still nothing compiled.
    with HessianOperator(compiled, loss_fn, (x, y), dtype=torch.float32) as op:
        assert torch.isfinite(op.matvec(v)).all()
    loss_fn(compiled, (x, y)).backward()  # the next training step reuses the compiled graph
    assert backend.graphs == 1


def test_eager_evaluation_runs_compiled_code_eagerly_and_restores_the_stance():
    torch._dynamo.reset()
    backend = CountingBackend()
    f = torch.compile(lambda t: torch.sin(t) * 2, backend=backend)
    t = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with eager_evaluation():
        (g,) = torch.autograd.grad(f(t).sum(), t, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), t)  # a double backward through the "compiled" function
    torch.testing.assert_close(h, -2 * torch.sin(t.detach()))
    assert backend.graphs == 0
    f(t)
    assert backend.graphs == 1  # outside, the function compiles as usual


def test_a_compiled_model_on_pytorch_before_2_6_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr("lyapunov_callbacks.core.compiled.can_evaluate_eagerly", lambda: False)
    net = torch.compile(nn.Linear(2, 1))
    with pytest.raises(CompiledModelError, match=r"AutogradHessian measures .*compiled: OptimizedModule.*Upgrade PyTorch"):
        HessianOperator(net, lambda m, b: m(b).sum(), torch.ones(1, 2))
