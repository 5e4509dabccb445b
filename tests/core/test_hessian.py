"""HessianOperator: exact HVPs against a dense autograd Hessian, finite differences, and zero side effects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lyapunov_callbacks import HessianOperator, preserved_state, top_hessian_eigenvalues
from lyapunov_callbacks.core.hessian import num_trainable_parameters

# ----------------------------------------------------------------------------- fixtures / references


def tanh_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def cnn_bn(dtype=torch.float64, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(3 * 4 * 4, 3))
    return nn.Sequential(*layers).to(dtype)


def data(model_kind, loss, dtype=torch.float64, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g) if model_kind == "mlp" else torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    if loss == "mse":
        y = F.one_hot(y, 3).to(dtype)
    return x.to(dtype), y


CRITERIA = {"ce": F.cross_entropy, "mse": F.mse_loss}


def make_loss_fn(loss):
    crit = CRITERIA[loss]
    return lambda model, batch: crit(model(batch[0]), batch[1])


def exact_hessian(model, loss, batch, rng_state=None):
    """Dense Hessian by torch.autograd.functional.hessian of a function of the flat parameters (float64)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    numels = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named]).to(torch.float64)
    buffers = {n: b for n, b in model.named_buffers()}
    x, y = batch
    x = x.to(torch.float64)
    y = y.to(torch.float64) if y.is_floating_point() else y
    saved = torch.get_rng_state()

    # The reference model runs in float64: cast a copy if needed.
    ref_model = model if flat.dtype == next(model.parameters()).dtype else _float64_copy(model)

    def f64(theta):
        d = {n: c.view(s) for n, c, s in zip(names, theta.split(numels), shapes)}
        d.update({n: (b.to(torch.float64) if b.is_floating_point() else b.clone()) for n, b in buffers.items()})
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        return CRITERIA[loss](torch.func.functional_call(ref_model, d, (x,)), y)

    H = torch.autograd.functional.hessian(f64, flat, vectorize=True)
    torch.set_rng_state(saved)
    return H


def _float64_copy(model):
    import copy

    return copy.deepcopy(model).to(torch.float64)


def snapshot(model):
    """Bitwise snapshot of everything the operator must leave alone."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "param_ids": [id(p) for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_bitwise_same(before, after):
    def same(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))

    assert before["param_ids"] == after["param_ids"]
    assert all(same(a, b) for a, b in zip(before["params"], after["params"]))
    assert len(before["buffers"]) == len(after["buffers"])
    assert all(same(a, b) for a, b in zip(before["buffers"], after["buffers"]))
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None) == (b is None)
        if a is not None:
            assert same(a, b)
    assert before["modes"] == after["modes"]
    assert torch.equal(before["rng"], after["rng"])


# ----------------------------------------------------------------------------- exact HVPs


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_autograd_hvp_matches_exact_hessian(kind, loss):
    model = tanh_mlp() if kind == "mlp" else cnn_bn()
    model.train()  # BatchNorm uses batch statistics
    batch = data(kind, loss)
    H = exact_hessian(model, loss, batch)
    g = torch.Generator().manual_seed(3)
    V = torch.randn(H.shape[0], 3, generator=g, dtype=torch.float64)
    with HessianOperator(model, make_loss_fn(loss), batch) as op:
        assert op.dim == H.shape[0] == num_trainable_parameters(model)
        assert op.dtype == torch.float64
        hv = op.matvec(V[:, 0])
        HV = op.matmat(V)
        assert op.num_hvps == 4  # one matvec + a matmat of 3 columns
    scale = (H @ V).abs().max()
    assert (hv - H @ V[:, 0]).abs().max() <= 1e-10 * scale
    assert (HV - H @ V).abs().max() <= 1e-10 * scale


def test_gradient_and_loss_match_direct_autograd():
    model = cnn_bn().train()
    batch = data("cnn", "ce")
    loss_fn = make_loss_fn("ce")
    with preserved_state(model):
        direct = loss_fn(model, batch)
        grads = torch.autograd.grad(direct, list(model.parameters()))
    flat = torch.cat([g.reshape(-1) for g in grads])
    for backend in ("autograd", "finite_difference"):
        with HessianOperator(model, loss_fn, batch, backend=backend) as op:
            assert torch.equal(op.loss(), direct.detach())
            assert torch.allclose(op.gradient(), flat, rtol=0, atol=1e-14)


def test_frozen_parameters_are_excluded():
    model = tanh_mlp()
    model[0].weight.requires_grad_(False)
    batch = data("mlp", "ce")
    H_full = exact_hessian(tanh_mlp(), "ce", batch)  # same init (seeded) with everything trainable
    n0 = model[0].weight.numel()
    with HessianOperator(model, make_loss_fn("ce"), batch) as op:
        assert op.dim == H_full.shape[0] - n0
        v = torch.randn(op.dim, dtype=torch.float64)
        assert torch.allclose(op.matvec(v), H_full[n0:, n0:] @ v, atol=1e-12)


# ----------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize(
    ("dtype", "fd_rel_eps", "rel_tol"),
    # Forward differences: error ~ fd_rel_eps (truncation) + eps_dtype / fd_rel_eps (rounding).
    [(torch.float32, 1e-3, 1e-3), (torch.float64, 1e-3, 1e-3), (torch.float64, 1e-6, 2e-6)],
)
def test_finite_difference_close_on_smooth_net(dtype, fd_rel_eps, rel_tol):
    model = tanh_mlp(dtype)
    batch = data("mlp", "ce", dtype=dtype)
    H = exact_hessian(model, "ce", batch)
    g = torch.Generator().manual_seed(5)
    errors = []
    with HessianOperator(model, make_loss_fn("ce"), batch, backend="finite_difference", fd_rel_eps=fd_rel_eps) as op:
        assert op.dtype == dtype
        for _ in range(4):
            v = torch.randn(op.dim, generator=g, dtype=torch.float64)
            hv = op.matvec(v.to(dtype)).to(torch.float64)
            exact = H @ v
            errors.append(float((hv - exact).norm() / exact.norm()))
        assert op.num_hvps == 4
    assert max(errors) < rel_tol, errors
    assert min(errors) > 0  # a finite difference, not the exact product


def test_finite_difference_reuses_given_gradient_and_handles_zero_vector():
    model = tanh_mlp()
    batch = data("mlp", "mse")
    loss_fn = make_loss_fn("mse")
    with HessianOperator(model, loss_fn, batch, backend="finite_difference") as op:
        grad = op.gradient()
        v = torch.randn(op.dim, dtype=torch.float64)
        hv = op.matvec(v)
        assert torch.equal(op.matvec(torch.zeros(op.dim, dtype=torch.float64)), torch.zeros(op.dim, dtype=torch.float64))
    with HessianOperator(model, loss_fn, batch, backend="finite_difference", gradient=grad) as op2:
        assert torch.equal(op2.matvec(v), hv)
        assert torch.equal(op2.gradient(), grad)


def test_finite_difference_takes_the_gradient_per_parameter():
    """``gradient=`` as one tensor per parameter (e.g. each ``.grad``): the same products as the flat vector."""
    model = tanh_mlp()
    batch = data("mlp", "mse")
    loss_fn = make_loss_fn("mse")
    params = [p for p in model.parameters() if p.requires_grad]
    with HessianOperator(model, loss_fn, batch, backend="finite_difference") as op:
        grad = op.gradient()
        v = torch.randn(op.dim, dtype=torch.float64)
        hv = op.matvec(v)
    pieces = [c.view(p.shape).clone() for c, p in zip(torch.split(grad, [p.numel() for p in params]), params)]
    for snapshot in (True, False):
        with HessianOperator(model, loss_fn, batch, backend="finite_difference", gradient=pieces,
                             snapshot=snapshot) as op2:
            assert torch.equal(op2.matvec(v), hv)
            assert torch.equal(op2.gradient(), grad)
    with pytest.raises(ValueError, match="gradient given per parameter"):
        HessianOperator(model, loss_fn, batch, backend="finite_difference", gradient=pieces[:-1])
    with pytest.raises(ValueError, match="gradient given per parameter"):
        HessianOperator(model, loss_fn, batch, backend="finite_difference", gradient=[p.T for p in pieces])


def test_finite_difference_step_scale_and_floor():
    model = tanh_mlp()
    batch = data("mlp", "ce")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # ||theta|| = 0: the dtype floor sqrt(eps) must keep the step finite
    H = exact_hessian(model, "ce", batch)
    with HessianOperator(model, make_loss_fn("ce"), batch, backend="finite_difference") as op:
        v = torch.randn(op.dim, dtype=torch.float64)
        hv = op.matvec(v)
    assert torch.isfinite(hv).all()
    assert float((hv - H @ v).norm() / (H @ v).norm()) < 1e-5


# ----------------------------------------------------------------------------- side effects


def _model_with_everything():
    model = cnn_bn(dropout=0.3)
    model.train()
    # Some gradients set, some None; one submodule deliberately in eval mode.
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    model[1].bias.grad = torch.randn_like(model[1].bias)
    model[2].eval()
    # Non-trivial running statistics.
    with torch.no_grad():
        model[1].running_mean.uniform_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
@pytest.mark.parametrize("method", ["lanczos", "lyapunov"])
def test_no_side_effects_bn_dropout_train_mode(hvp, method):
    model = _model_with_everything()
    batch = data("cnn", "ce")
    torch.manual_seed(1234)
    before = snapshot(model)
    res = top_hessian_eigenvalues(model, make_loss_fn("ce"), batch, k=2, method=method, hvp=hvp, max_iter=12)
    after = snapshot(model)
    assert_bitwise_same(before, after)
    assert res.num_hvps > 0 and torch.isfinite(res.eigenvalues).all()


def test_dropout_operator_is_one_fixed_symmetric_matrix():
    model = cnn_bn(dropout=0.5).train()
    batch = data("cnn", "ce")
    torch.manual_seed(99)
    rng_at_construction = torch.get_rng_state()
    g = torch.Generator().manual_seed(7)
    u = torch.randn(num_trainable_parameters(model), generator=g, dtype=torch.float64)
    v = torch.randn(num_trainable_parameters(model), generator=g, dtype=torch.float64)
    # The exact Hessian with the dropout masks drawn from the construction-time RNG state.
    H = exact_hessian(model, "ce", batch, rng_state=rng_at_construction)
    for backend, tol in (("autograd", 1e-10), ("finite_difference", 2e-3)):
        with HessianOperator(model, make_loss_fn("ce"), batch, backend=backend) as op:
            hv1, hv2 = op.matvec(v), op.matvec(v)
            hu = op.matvec(u)
        assert torch.equal(hv1, hv2)  # deterministic: same masks every product
        assert abs(float(u @ hv1 - v @ hu)) <= tol * float(hv1.norm() * u.norm())
        assert float((hv1 - H @ v).norm() / (H @ v).norm()) <= tol
        assert torch.equal(torch.get_rng_state(), rng_at_construction)


def test_operator_built_before_training_step_sees_the_training_masks():
    model = cnn_bn(dropout=0.5).train()
    batch = data("cnn", "ce")
    loss_fn = make_loss_fn("ce")
    torch.manual_seed(2024)
    op = HessianOperator(model, loss_fn, batch)
    # The training step's own forward, drawing masks from the same (untouched) RNG stream.
    train_loss = loss_fn(model, batch)
    train_loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(op.loss(), train_loss.detach())
    assert torch.allclose(op.gradient(), grad, rtol=0, atol=1e-14)
    op.close()


def test_mixed_precision_and_dtype_override():
    model32 = tanh_mlp(torch.float32)
    batch32 = data("mlp", "ce", dtype=torch.float32)
    H = exact_hessian(model32, "ce", batch32)  # float64 reference at the float32 parameters
    v = torch.randn(H.shape[0], dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the operator must switch autocast off
        with HessianOperator(model32, make_loss_fn("ce"), batch32) as op:
            assert op.dtype == torch.float32
            hv32 = op.matvec(v.float())
        with HessianOperator(model32, make_loss_fn("ce"), batch32, dtype=torch.float64) as op64:
            assert op64.dtype == torch.float64
            hv64 = op64.matvec(v)
    assert hv32.dtype == torch.float32 and hv64.dtype == torch.float64
    assert float((hv32.double() - H @ v).norm() / (H @ v).norm()) < 1e-5  # bfloat16 would give ~1e-2
    assert float((hv64 - H @ v).norm() / (H @ v).norm()) < 1e-12
    # Half-precision parameters default to float32 computation.
    model16 = tanh_mlp(torch.bfloat16)
    with HessianOperator(model16, make_loss_fn("ce"), data("mlp", "ce", dtype=torch.bfloat16)) as op16:
        assert op16.dtype == torch.float32
        assert op16.matvec(v.float()).dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())


def test_preserved_state_undoes_a_training_step():
    model = _model_with_everything()
    batch = data("cnn", "ce")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = snapshot(model)
    with preserved_state(model):
        model.eval()
        model.train()
        loss = make_loss_fn("ce")(model, batch)
        loss.backward()
        opt.step()
        torch.randn(10)
        model[1].num_batches_tracked += 5
    assert_bitwise_same(before, snapshot(model))


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
def test_matvec_direct_path_equals_matmat_column_and_returns_a_new_tensor(backend):
    model = cnn_bn().train()
    batch = data("cnn", "ce")
    g = torch.Generator().manual_seed(4)
    with HessianOperator(model, make_loss_fn("ce"), batch, backend=backend) as op:
        V = torch.randn(op.dim, 2, generator=g, dtype=torch.float64)
        v = V[:, 0].clone()
        hv = op.matvec(v)
        assert op.num_hvps == 1
        HV = op.matmat(V)
        assert op.num_hvps == 3
        # The single-vector path does the same arithmetic as a matmat column, bit for bit.
        assert torch.equal(hv, HV[:, 0])
        # The result is the caller's to modify: neither the input nor the operator's state aliases it.
        hv.mul_(0.0)
        assert torch.equal(v, V[:, 0])
        assert torch.equal(op.matvec(v), HV[:, 0])
        assert hv.data_ptr() not in {op.gradient().data_ptr(), v.data_ptr()}


class _OneLayerUsed(nn.Module):
    """Two linear layers, only the first of which the forward reads."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 2), nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
def test_a_parameter_outside_the_loss_has_a_zero_block_and_the_rest_matches_the_dense_hessian(backend):
    """A trainable parameter the loss never reads has no gradient anywhere: its rows of H v are zero, and the
    other rows are the dense Hessian's (a least-squares loss is quadratic, so finite differences are exact up to
    rounding). Under finite differences the perturbed point and the result share one buffer: every row of the
    result must still be the difference quotient, none a leftover of θ + εv."""
    torch.manual_seed(0)
    model = _OneLayerUsed().to(torch.float64)
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g, dtype=torch.float64))
    H = exact_hessian(model, "mse", batch)
    unused = torch.cat([torch.full((p.numel(),), n.startswith("unused")) for n, p in model.named_parameters()])
    assert int(unused.sum()) == 12
    v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
    with HessianOperator(model, make_loss_fn("mse"), batch, backend=backend) as op:
        hv = op.matvec(v)
    assert torch.equal(hv[unused], torch.zeros(12, dtype=torch.float64))
    assert torch.allclose(hv, H @ v, rtol=1e-6, atol=1e-8)


def test_preserved_state_without_copies_restores_references_and_flags_in_place_writes():
    model = _model_with_everything()
    batch = data("cnn", "ce")
    before = snapshot(model)
    grad0, running_mean = model[0].weight.grad, model[1].running_mean
    with preserved_state(model, copy_tensors=False):
        model.eval()
        loss = make_loss_fn("ce")(model, batch)  # eval mode: BatchNorm statistics are read, not written
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for p, gp in zip(model.parameters(), grads):  # .grad replaced or set where it was None ...
            p.grad = gp
        torch.randn(10)  # ... the global RNG moves ...
        model[1].running_mean = running_mean.clone()  # ... a buffer is reassigned, not modified
    assert_bitwise_same(before, snapshot(model))  # ... and all of it is undone, references included
    assert model[0].weight.grad is grad0 and model[1].running_mean is running_mean
    assert model[0].bias.grad is None

    weight = model[0].weight
    with pytest.raises(RuntimeError, match=r"0\.weight modified in place"):
        with preserved_state(model, copy_tensors=False):
            with torch.no_grad():
                weight.add_(1.0)
    # The body's own exception wins over the guard's (and modes / RNG are still restored).
    rng = torch.get_rng_state()
    with pytest.raises(KeyError):
        with preserved_state(model, copy_tensors=False):
            model.eval()
            torch.randn(3)
            with torch.no_grad():
                weight.add_(1.0)
            raise KeyError("body")
    assert model.training and torch.equal(torch.get_rng_state(), rng)


# ----------------------------------------------------------------------------- lifecycle and validation


def test_stale_closed_and_bad_arguments():
    model = tanh_mlp()
    batch = data("mlp", "ce")
    loss_fn = make_loss_fn("ce")
    op = HessianOperator(model, loss_fn, batch)
    v = torch.randn(op.dim, dtype=torch.float64)
    with torch.no_grad():
        model[0].bias.add_(1.0)  # an optimiser step happened
    with pytest.raises(RuntimeError, match="modified in place"):
        op.matvec(v)
    op.close()
    with pytest.raises(RuntimeError, match="closed"):
        op.matvec(v)
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(model, loss_fn, batch, backend="jvp")
    with pytest.raises(ValueError, match="fd_rel_eps"):
        HessianOperator(model, loss_fn, batch, backend="finite_difference", fd_rel_eps=0.0)
    with pytest.raises(ValueError, match="dtype"):
        HessianOperator(model, loss_fn, batch, dtype=torch.int64)
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, lambda m, b: m(b[0]), batch)
    frozen = tanh_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(frozen, loss_fn, batch)
    with HessianOperator(model, loss_fn, batch) as op:
        with pytest.raises(ValueError, match=r"shape \[dim="):
            op.matvec(torch.zeros(op.dim + 1, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"\[dim="):
            op.matmat(torch.zeros(op.dim, dtype=torch.float64))


def test_usable_from_inference_and_no_grad_contexts():
    model = cnn_bn().train()
    batch = data("cnn", "ce")
    H = exact_hessian(model, "ce", batch)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    for ctx in (torch.inference_mode, torch.no_grad):
        for backend, tol in (("autograd", 1e-10), ("finite_difference", 1e-2)):
            with ctx():
                inf_batch = (batch[0].clone(), batch[1].clone())  # inference tensors under inference_mode
                with HessianOperator(model, make_loss_fn("ce"), inf_batch, backend=backend) as op:
                    hv = op.matvec(v.clone())
            assert float((hv - H @ v).norm() / (H @ v).norm()) < tol, (ctx, backend)


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
def test_snapshot_false_gives_the_same_bits_without_copying_the_parameters(backend):
    # BatchNorm, dropout and an eval-mode submodule: the paths where a copy could have mattered.
    model = _model_with_everything()
    batch = data("cnn", "ce")
    loss_fn = make_loss_fn("ce")
    V = torch.randn(num_trainable_parameters(model), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(99)  # the operators capture the RNG: the same dropout masks for both
    rng = torch.get_rng_state()
    results = {}
    for snap in (True, False):
        torch.set_rng_state(rng)
        before = snapshot(model)
        with HessianOperator(model, loss_fn, batch, backend=backend, snapshot=snap) as op:
            results[snap] = (op.matvec(V[:, 0]), op.matmat(V), op.gradient(), op.loss())
            shares = {t.data_ptr() for t in op._theta} & {p.data_ptr() for p in model.parameters()}
            # snapshot=False differentiates at the parameters' own storage, snapshot=True at copies.
            assert bool(shares) is (not snap)
        assert_bitwise_same(before, snapshot(model))
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


def test_snapshot_false_still_catches_an_optimiser_step_but_not_a_data_write():
    model = tanh_mlp()
    batch = data("mlp", "ce")
    loss_fn = make_loss_fn("ce")
    v = torch.randn(num_trainable_parameters(model), dtype=torch.float64)
    for snap in (True, False):
        op = HessianOperator(model, loss_fn, batch, snapshot=snap)
        with torch.no_grad():
            model[0].bias.add_(1.0)  # an optimiser step: a version-counter bump
        with pytest.raises(RuntimeError, match="modified in place"):
            op.matvec(v)
    # A `.data` write bumps no version counter: only the checked copy (snapshot=True) sees it.
    checked = HessianOperator(model, loss_fn, batch)
    unchecked = HessianOperator(model, loss_fn, batch, snapshot=False)
    model[0].bias.data.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        checked.matvec(v)
    assert torch.isfinite(unchecked.matvec(v)).all()
    with pytest.raises(ValueError, match="snapshot"):
        HessianOperator(model, loss_fn, batch, snapshot=1)


def test_rng_snapshot_does_not_query_cuda_availability(monkeypatch):
    # Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, under which every torch.cuda.is_available() re-loads
    # NVML; the per-step snapshots of the callbacks must not pay that when CUDA is not initialised.
    from lyapunov_callbacks.core.state import restore_rng, rng_snapshot

    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process: its RNG streams are snapshotted")

    def fail(*args, **kwargs):
        raise AssertionError("torch.cuda.is_available() called")

    monkeypatch.setattr(torch.cuda, "is_available", fail)
    monkeypatch.setattr(torch.cuda, "device_count", fail)
    state = rng_snapshot()
    assert state["cuda"] == {}
    expected = torch.rand(3)
    restore_rng(state)
    assert torch.equal(torch.rand(3), expected)
