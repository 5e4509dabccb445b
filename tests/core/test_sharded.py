"""``ShardedHessian`` and the sharded parameter space on FSDP2 ``DTensor`` shards (a 1-process gloo group here; the
2-process fits under Lightning's ModelParallelStrategy are in ``tests/callbacks/test_sharded_fit.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dense_hessian import dense_hessian
from lyapunov_callbacks.core.eigen import solve
from lyapunov_callbacks.core.hessian import HessianOperator
from lyapunov_callbacks.core.sharded import ShardedHessian, ShardingError, default_fd_rel_eps, is_sharded, shard_group
from lyapunov_callbacks.core.space import LOCAL, ShardedSpace

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


def _loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _pair(mesh, dtype=torch.float32, dropout=0.0, norm=False):
    """A sharded tanh MLP and an unsharded copy with the same weights."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)]
    if norm:
        layers.insert(1, nn.BatchNorm1d(16))
    net = nn.Sequential(*layers).to(dtype)
    ref = copy.deepcopy(net)
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net, ref


def _batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g, dtype=dtype), torch.randn(32, 3, generator=g, dtype=dtype)


def test_parameters_are_dtensor_shards_and_the_space_is_sharded(gloo_mesh):
    net, ref = _pair(gloo_mesh)
    assert is_sharded(net) and not is_sharded(ref)
    assert shard_group(ref) is None and shard_group(net) is not None
    with ShardedHessian(net, _loss, _batch()) as op:
        assert isinstance(op.space, ShardedSpace) and op.space.sharded and not LOCAL.sharded
        assert op.global_dim == sum(p.numel() for p in ref.parameters()) == op.dim  # one rank holds every entry


@pytest.mark.parametrize("scheme, rel", [("central", 2e-5), ("forward", 5e-4)])
def test_top3_in_float32_match_the_exact_hessian_within_the_stated_error(gloo_mesh, scheme, rel):
    net, ref = _pair(gloo_mesh)
    batch = _batch()
    exact = torch.linalg.eigvalsh(_dense_hessian(ref.double(), (batch[0].double(), batch[1].double()))).flip(0)[:3]
    with ShardedHessian(net, _loss, batch, scheme=scheme) as op:
        result = solve(op, "lanczos", k=3, tol=1e-6, max_iter=60)
    assert result.eigenvalues.double() == pytest.approx(exact, rel=rel)
    # Central differences are the more accurate scheme at the same dtype (the stated rule for each).
    assert op.fd_rel_eps == pytest.approx(default_fd_rel_eps(torch.float32, scheme))


def test_float64_central_products_equal_autograd_products(gloo_mesh):
    net, ref = _pair(gloo_mesh, dtype=torch.float64)
    batch = _batch(torch.float64)
    v = torch.randn(sum(p.numel() for p in ref.parameters()), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with HessianOperator(ref, _loss, batch) as exact, ShardedHessian(net, _loss, batch) as op:
        assert op.matvec(v) == pytest.approx(exact.matvec(v), rel=1e-7, abs=1e-9)
        assert op.gradient() == pytest.approx(exact.gradient(), rel=1e-12, abs=1e-14)
        assert float(op.loss()) == pytest.approx(float(exact.loss()), rel=1e-12)


def test_a_measurement_leaves_shards_grads_buffers_modes_and_rng_exactly_as_they_were(gloo_mesh):
    net, _ = _pair(gloo_mesh, dropout=0.3, norm=True)
    batch = _batch()
    _loss(net, batch).backward()  # a step's gradient in .grad
    shards = [p.to_local().clone() for p in net.parameters()]
    grads = [p.grad for p in net.parameters()]
    grad_values = [g.to_local().clone() for g in grads]
    buffers = [b.clone() for b in net.buffers()]
    net[3].eval()
    rng = torch.get_rng_state()
    with ShardedHessian(net, _loss, batch) as op:
        solve(op, "lanczos", k=1, tol=1e-4, max_iter=10)
    assert all(torch.equal(p.to_local(), s) for p, s in zip(net.parameters(), shards))
    assert all(p.grad is g for p, g in zip(net.parameters(), grads))
    assert all(torch.equal(g.to_local(), v) for g, v in zip(grads, grad_values))
    assert all(torch.equal(b, s) for b, s in zip(net.buffers(), buffers))
    assert net.training and not net[3].training
    assert torch.equal(torch.get_rng_state(), rng)


def test_one_matrix_under_dropout_every_gradient_uses_the_captured_masks(gloo_mesh):
    net, _ = _pair(gloo_mesh, dtype=torch.float64, dropout=0.5)
    with ShardedHessian(net, _loss, _batch(torch.float64)) as op:
        v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        w = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        assert torch.equal(op.matvec(v), op.matvec(v))
        assert float(w @ op.matvec(v)) == pytest.approx(float(v @ op.matvec(w)), rel=1e-6)  # symmetric


def test_a_tensor_parallel_layout_is_refused_naming_what_works(gloo_mesh):
    from torch.distributed.tensor import Replicate, distribute_tensor

    net = nn.Linear(4, 2)
    net.weight = nn.Parameter(distribute_tensor(net.weight.detach(), gloo_mesh, [Replicate()]))
    net.bias = nn.Parameter(distribute_tensor(net.bias.detach(), gloo_mesh, [Replicate()]))
    with pytest.raises(ShardingError, match=r"tensor_parallel_size=1.*fully_shard"):
        shard_group(net)


def test_a_mix_of_sharded_and_plain_parameters_is_refused(gloo_mesh):
    from torch.distributed.fsdp import fully_shard

    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    fully_shard(net[0], mesh=gloo_mesh)
    with pytest.raises(ShardingError, match=r"fully_shard to the root"):
        ShardedHessian(net, _loss, _batch())


def test_only_lanczos_takes_its_inner_products_over_the_shards(gloo_mesh):
    net, _ = _pair(gloo_mesh)
    with ShardedHessian(net, _loss, _batch()) as op:
        with pytest.raises(ValueError, match=r"method='lanczos'"):
            solve(op, "power", k=1)


def test_sharded_space_reductions_equal_the_plain_ones_on_one_rank(gloo_mesh):
    space = ShardedSpace()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, dtype=torch.float64, generator=g), torch.randn(50, dtype=torch.float64, generator=g)
    block = torch.randn(50, 4, dtype=torch.float64, generator=g)
    assert space.dot(a, b) == pytest.approx(LOCAL.dot(a, b), rel=1e-14)
    assert space.norm(a) == pytest.approx(LOCAL.norm(a), rel=1e-14)
    assert space.gram(block, block) == pytest.approx(LOCAL.gram(block, block), rel=1e-12)
    q, r = space.qr(block)
    assert q.T @ q == pytest.approx(torch.eye(4, dtype=torch.float64), abs=1e-12)
    assert q @ r == pytest.approx(block, rel=1e-10, abs=1e-12)


def _dense_hessian(model, batch):
    return dense_hessian(model, _loss, batch)


def test_top_hessian_eigenvalues_measures_a_sharded_model_in_a_plain_loop(gloo_mesh):
    from lyapunov_callbacks.core.eigen import top_hessian_eigenvalues

    net, ref = _pair(gloo_mesh, dtype=torch.float64)
    batch = _batch(torch.float64)
    sharded = top_hessian_eigenvalues(net, _loss, batch, k=2, tol=1e-8)
    exact = top_hessian_eigenvalues(ref, _loss, batch, k=2, tol=1e-8)
    assert sharded.eigenvalues == pytest.approx(exact.eigenvalues, rel=1e-6)
    warm = top_hessian_eigenvalues(net, _loss, batch, k=2, tol=1e-8, init=sharded.eigenvectors)
    assert warm.num_hvps < sharded.num_hvps  # the warm start is this rank's entries, accepted as such
    with pytest.raises(ValueError, match=r"dtype=None"):
        top_hessian_eigenvalues(net, _loss, batch, dtype=torch.float32)


def test_sharded_orthonormalisation_replaces_a_rank_deficient_column(gloo_mesh):
    from lyapunov_callbacks.core.eigen import _orthonormalize

    g = torch.Generator().manual_seed(3)
    block = torch.randn(40, 3, dtype=torch.float64, generator=g)
    block[:, 2] = 2.0 * block[:, 0] - block[:, 1]  # in the span of the first two: Cholesky of the Gram matrix fails
    fallback = torch.randn(40, 3, dtype=torch.float64, generator=g)
    q = _orthonormalize(block, lambda: fallback, ShardedSpace())
    assert q.T @ q == pytest.approx(torch.eye(3, dtype=torch.float64), abs=1e-12)
    # the first column is the normalised first input column; the first two span the input's first two
    assert q[:, 0] == pytest.approx(block[:, 0] / torch.linalg.vector_norm(block[:, 0]), rel=1e-12)
    residual = block[:, :2] - q[:, :2] @ (q[:, :2].T @ block[:, :2])
    assert float(torch.linalg.vector_norm(residual)) < 1e-10
