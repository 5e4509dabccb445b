"""HessianOperator on the models users bring: Transformer layers, partly frozen models in another dtype, weights
written through ``.data``, and non-smooth models under finite differences — each against an exact float64 Hessian."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lyapunov_callbacks import HessianOperator, top_hessian_eigenvalues
from lyapunov_callbacks.core.hessian import (
    AutogradHessian,
    FiniteDifferenceHessian,
    StaleOperatorError,
    nonsmooth_modules,
)


class Encoder(nn.Module):
    """One stock ``nn.TransformerEncoderLayer`` on a sequence, mean-pooled into a linear head."""

    def __init__(self, activation: str = "gelu", d_model: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=6, dropout=0.0, activation=activation, batch_first=True
        )
        self.head = nn.Linear(d_model, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=1))


def encoder_batch(dtype=torch.float64, n=6, seq=4, d_model=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, seq, d_model, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def exact_hessian(model: nn.Module, batch) -> torch.Tensor:
    """Dense float64 Hessian over the trainable parameters by ``torch.autograd.functional.hessian``."""
    model = model.double() if any(p.dtype != torch.float64 for p in model.parameters()) else model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    numels = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names]).double()
    x = batch[0].double()

    def f(theta):
        pieces = dict(zip(names, [c.view(s) for c, s in zip(torch.split(theta, numels), shapes)]))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = torch.func.functional_call(model, pieces, (x,))
        return F.cross_entropy(out, batch[1])

    return torch.autograd.functional.hessian(f, flat, vectorize=True)


def top_eig(H: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(H)[-1])


# ----------------------------------------------------------------------------- backends as classes


def test_hessian_operator_dispatches_to_one_class_per_backend():
    model = Encoder()
    batch = encoder_batch()
    with HessianOperator(model, loss_fn, batch) as op:
        assert type(op) is AutogradHessian and isinstance(op, HessianOperator) and op.backend == "autograd"
    with HessianOperator(model, loss_fn, batch, backend="finite_difference") as op:
        assert type(op) is FiniteDifferenceHessian and op.backend == "finite_difference"
    with FiniteDifferenceHessian(model, loss_fn, batch) as op:  # the subclasses are usable directly
        assert op.dim == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="backend"):
        AutogradHessian(model, loss_fn, batch, backend="finite_difference")


# ----------------------------------------------------------------------------- attention


def test_transformer_encoder_layer_exact_hessian_autograd():
    model = Encoder("gelu").train()
    batch = encoder_batch()
    H = exact_hessian(model, batch)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with HessianOperator(model, loss_fn, batch) as op:
        hv = op.matvec(v)
    assert float((hv - H @ v).norm() / (H @ v).norm()) < 1e-10
    res = top_hessian_eigenvalues(model, loss_fn, batch, k=2, tol=1e-8, max_iter=200)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-6, atol=0)
    assert res.converged


def test_transformer_encoder_layer_finite_difference_smooth_activation():
    model = Encoder("gelu")
    batch = encoder_batch()
    h0 = top_eig(exact_hessian(model, batch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a smooth model: no warning
        res = top_hessian_eigenvalues(model, loss_fn, batch, hvp="finite_difference", tol=1e-6, max_iter=200)
    assert res.converged
    assert abs(float(res.eigenvalues[0]) - h0) <= 5e-3 * abs(h0)  # forward-difference truncation


def test_finite_difference_on_relu_transformer_is_reported_unconverged():
    # Stock activation (ReLU): forward differences cross kinks, so h0 is far off the exact one; it must be
    # reported unconverged (it used to come back converged=True).
    model = Encoder("relu")
    batch = encoder_batch()
    assert nonsmooth_modules(model) == ["layer"]
    h0 = top_eig(exact_hessian(model, batch))
    exact = top_hessian_eigenvalues(model, loss_fn, batch, tol=1e-8, max_iter=200)
    assert exact.converged and abs(float(exact.eigenvalues[0]) - h0) <= 1e-6 * abs(h0)
    with pytest.warns(UserWarning, match="non-smooth model.*layer.*hvp='autograd'"):
        res = top_hessian_eigenvalues(model, loss_fn, batch, hvp="finite_difference", tol=1e-6, max_iter=200)
    assert not res.converged
    # Far off means far beyond the tolerance: 1.8 % at tol=1e-6 on this layer (the docstring of
    # FiniteDifferenceHessian quotes this test).
    assert abs(float(res.eigenvalues[0]) - h0) > 1e-2 * abs(h0)
    assert nonsmooth_modules(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))) == []
    assert nonsmooth_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.MaxPool1d(1))) == ["1", "2"]


# ----------------------------------------------------------------------------- frozen parameters and dtypes


def partly_frozen(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    model[0].requires_grad_(False)  # a frozen backbone
    return model


def mlp_batch(dtype):
    g = torch.Generator().manual_seed(2)
    return torch.randn(10, 5, generator=g).to(dtype), torch.randint(0, 3, (10,), generator=g)


def mlp_exact(model, batch):
    ref = partly_frozen(torch.float64)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = dict(ref.named_parameters())
    numels = [params[n].numel() for n in names]
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(theta):
        pieces = dict(zip(names, [c.view(s) for c, s in zip(torch.split(theta, numels), shapes)]))
        return F.cross_entropy(torch.func.functional_call(ref, pieces, (batch[0].double(),)), batch[1])

    return torch.autograd.functional.hessian(f, flat, vectorize=True)


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
def test_partly_frozen_float32_model_in_float64(backend):
    model = partly_frozen(torch.float32)
    batch = mlp_batch(torch.float32)
    H = mlp_exact(model, batch)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with HessianOperator(model, loss_fn, batch, backend=backend, dtype=torch.float64) as op:
        assert op.dim == H.shape[0] and op.dtype == torch.float64
        hv = op.matvec(v)
    err = float((hv - H @ v).norm() / (H @ v).norm())
    assert err < (1e-10 if backend == "autograd" else 2e-3), err
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
def test_partly_frozen_bfloat16_model_defaults_to_float32(backend):
    model = partly_frozen(torch.bfloat16)
    batch = mlp_batch(torch.bfloat16)
    H = mlp_exact(model, batch)  # float64 at the bf16 weights (exactly representable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with HessianOperator(model, loss_fn, batch, backend=backend) as op:
        assert op.dtype == torch.float32
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3))
        hv = op.matvec(v)
    # float32 computation on bf16 inputs: the batch is bf16-rounded in both, so only float32 rounding remains.
    err = float((hv.double() - H @ v.double()).norm() / (H @ v.double()).norm())
    assert err < (1e-5 if backend == "autograd" else 3e-2), err
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- stale operators


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
@pytest.mark.parametrize("frozen", [False, True])
def test_data_write_after_building_the_operator_raises(backend, frozen):
    model = partly_frozen(torch.float64)
    batch = mlp_batch(torch.float64)
    op = HessianOperator(model, loss_fn, batch, backend=backend)
    v = torch.randn(op.dim, dtype=torch.float64)
    before = op.matvec(v)
    target = model[0].weight if frozen else model[2].weight
    version = target._version
    target.data.mul_(0.5)  # weight clipping / EMA through .data: no version bump
    assert target._version == version
    with pytest.raises(StaleOperatorError, match=r"\.data"):
        op.matvec(v)
    with pytest.raises(RuntimeError, match="modified in place"):
        op.matmat(v[:, None])
    target.data.mul_(2.0)  # restored bit for bit (a power of two): the snapshot matches again
    torch.testing.assert_close(op.matvec(v), before, rtol=0, atol=0)
    op.close()
