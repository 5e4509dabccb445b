"""The curvature core under torch.distributed (2 gloo processes): shards averaged = one process on the union."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lyapunov_callbacks import HessianOperator, TangentDynamics, top_hessian_eigenvalues
from lyapunov_callbacks.core import distributed as ddp

WORLD = 2
N_PER_RANK = 10


def make_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def make_data(dtype):
    """Rank r's shard holds only the samples of label r (shards differ), equal sizes."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(WORLD * N_PER_RANK, 4, generator=g).to(dtype)
    y = torch.arange(WORLD).repeat_interleave(N_PER_RANK)
    x = x + y.to(dtype).unsqueeze(1)  # class-dependent inputs
    return x, y


def shard(batch, rank):
    x, y = batch
    keep = y == rank
    return x[keep], y[keep]


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def measure(dtype, batch, process_group=None):
    """Everything compared between the 2-rank run and the single process on the union."""
    model = make_model(dtype)
    out = {
        "h0": top_hessian_eigenvalues(model, loss_fn, batch, k=1, tol=1e-8, process_group=process_group).eigenvalues,
        "top3": top_hessian_eigenvalues(model, loss_fn, batch, k=3, tol=1e-8, process_group=process_group).eigenvalues,
        "lyap": top_hessian_eigenvalues(
            model, loss_fn, batch, k=2, method="lyapunov", max_iter=40, process_group=process_group
        ).eigenvalues,
        "fd_h0": top_hessian_eigenvalues(model, loss_fn, batch, hvp="finite_difference", tol=1e-6).eigenvalues,
    }
    dim = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    tangent = TangentDynamics.from_optimizer(opt, dim, seed=1, dtype=dtype)
    growths = []
    for _ in range(3):
        with HessianOperator(model, loss_fn, batch, process_group=process_group) as H:
            growths.append(tangent.step(H.matvec, lr=0.5))
        opt.zero_grad()
        loss_fn(model, batch).backward()
        if dist.is_initialized():  # the DDP gradient average, done by hand
            for p in model.parameters():
                ddp.all_reduce_mean_(p.grad)
        opt.step()
    out["growths"] = torch.tensor(growths, dtype=torch.float64)
    out["delta"] = tangent.delta_theta
    return out


def _worker(rank, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = {}
        # Exactly one all-reduce per matvec / matmat (and one at construction).
        calls = []
        original = torch.distributed.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append(tensor.shape)
            return original(tensor, *args, **kwargs)

        torch.distributed.all_reduce = counting
        try:
            batch = shard(make_data(torch.float64), rank)
            with HessianOperator(make_model(torch.float64), loss_fn, batch) as op:
                after_init = len(calls)
                op.matvec(torch.ones(op.dim, dtype=torch.float64))
                after_matvec = len(calls)
                op.matmat(torch.ones(op.dim, 3, dtype=torch.float64))
                after_matmat = len(calls)
            results["allreduce_counts"] = (after_init, after_matvec - after_init, after_matmat - after_matvec)
        finally:
            torch.distributed.all_reduce = original
        group = dist.new_group(list(range(WORLD)))
        for dtype in (torch.float64, torch.float32):
            res = measure(dtype, shard(make_data(dtype), rank), process_group=group if dtype == torch.float32 else None)
            results[str(dtype)] = res
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_union(tmp_path):
    env_before = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    out_path = str(tmp_path / "ranks.pt")
    mp.spawn(_worker, args=(_free_port(), out_path), nprocs=WORLD, join=True)
    assert {k: os.environ.get(k) for k in env_before} == env_before  # nothing leaked into the parent
    ranks = torch.load(out_path, weights_only=False)

    assert ranks[0]["allreduce_counts"] == (1, 1, 1)
    assert ranks[1]["allreduce_counts"] == (1, 1, 1)
    for dtype, rtol in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
        single = measure(dtype, make_data(dtype))
        r0, r1 = ranks[0][str(dtype)], ranks[1][str(dtype)]
        for key, ref in single.items():
            # Bit-identical across ranks ...
            assert torch.equal(r0[key], r1[key]), (dtype, key)
            # ... and equal to one process on the union of the shards.
            assert torch.allclose(r0[key].to(ref.dtype), ref, rtol=rtol, atol=rtol * float(ref.abs().max())), (
                dtype,
                key,
                r0[key],
                ref,
            )
        # The shards differ: each alone has another spectrum than the union.
        x, y = make_data(dtype)
        alone = top_hessian_eigenvalues(make_model(dtype), loss_fn, shard((x, y), 0), tol=1e-8).eigenvalues
        assert not torch.allclose(alone, single["h0"], rtol=1e-2)


def test_helpers_are_no_ops_without_a_process_group():
    assert not ddp.is_distributed()
    assert ddp.world_size() == 1 and ddp.rank() == 0
    t = torch.arange(4.0)
    assert ddp.all_reduce_mean_(t) is t and torch.equal(t, torch.arange(4.0))
    assert ddp.broadcast_(t) is t and torch.equal(t, torch.arange(4.0))
    model = make_model(torch.float64)
    op = HessianOperator(model, loss_fn, make_data(torch.float64))
    assert op.distributed is False
    with pytest.raises(ValueError, match="process group"):  # forcing distributed=True needs a group
        HessianOperator(model, loss_fn, make_data(torch.float64), distributed=True)
