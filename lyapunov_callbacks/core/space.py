"""The parameter space the eigen-solvers work in: where flat vectors live and how their inner products are taken.

A solver never touches a vector's entries beyond element-wise updates; every reduction (a dot product, a norm, the
Gram matrix of a block, an orthonormalisation) and every random draw goes through the operator's ``space``:

- :data:`LOCAL` (an operator without a ``space``): a flat vector holds every parameter entry, and the reductions are
  the plain ``torch`` expressions (what the solvers computed before there was a space, bit for bit).
- :class:`ShardedSpace`: parameters sharded over a process group (FSDP2's ``DTensor`` shards). A flat vector holds
  only this rank's shards, concatenated in parameter order; a reduction is the local one followed by one
  ``all_reduce(SUM)`` over the group, so every rank gets the same scalars (bit-identical, the all-reduce's result)
  and no rank ever holds a full-length vector.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lyapunov_callbacks.core import distributed as _dist

__all__ = ["LOCAL", "LocalSpace", "ShardedSpace", "local_tensor", "space_of"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: ``t.to_local()`` for a ``DTensor`` (a view of the local shard), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class LocalSpace:
    """Whole vectors on one process (or replicated under DDP): the plain reductions."""

    sharded = False

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b)

    def dots(self, basis: list[torch.Tensor], w: torch.Tensor) -> list[float]:
        """``[q @ w for q in basis]``, read in one transfer."""
        return torch.stack([q @ w for q in basis]).tolist() if basis else []

    def norm(self, v: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(v))

    def column_norms(self, block: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(block, dim=0)

    def gram(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``Aᵀ B`` for blocks ``[n, a]`` and ``[n, b]``."""
        return A.T @ B

    def randn(self, n: int, cols: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """``[n, cols]`` standard normal numbers from the CPU generator ``gen``."""
        return torch.randn(n, cols, generator=gen, dtype=dtype)

    def qr(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.linalg.qr(block)


class ShardedSpace(LocalSpace):
    """Vectors sharded over ``process_group``: each rank holds its own entries, reductions are all-reduced.

    Scalars are summed in float64 (one ``all_reduce`` per call, however many scalars it returns). Random vectors are
    drawn per rank from a generator seeded by the caller's generator and the rank, so the shards of a random vector
    are independent draws. :meth:`qr` is Cholesky QR applied twice (CholQR2: the Gram matrix is the only global
    quantity; the second pass restores orthogonality to working precision).

    Args:
        process_group: the group the parameters are sharded over (``None``: the default group).
    """

    sharded = True

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self.rank = _dist.rank(process_group)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the group, in float64, as a new flat tensor (one ``all_reduce``)."""
        t = t.detach().to(torch.float64).reshape(-1).clone()
        torch.distributed.all_reduce(t, group=self.process_group)
        return t

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(self.all_sum(a @ b)[0])

    def dots(self, basis: list[torch.Tensor], w: torch.Tensor) -> list[float]:
        return self.all_sum(torch.stack([q @ w for q in basis])).tolist() if basis else []

    def norm(self, v: torch.Tensor) -> float:
        return math.sqrt(float(self.all_sum(v @ v)[0]))

    def column_norms(self, block: torch.Tensor) -> torch.Tensor:
        return self.all_sum((block * block).sum(dim=0)).sqrt().to(block.dtype)

    def gram(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return self.all_sum(A.T @ B).reshape(A.shape[1], B.shape[1]).to(A.dtype)

    def randn(self, n: int, cols: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=gen)) + 7919 * self.rank
        own = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(n, cols, generator=own, dtype=dtype)

    def qr(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, r_total = block, None
        for _ in range(2):
            gram = self.all_sum(q.T @ q).reshape(q.shape[1], q.shape[1])
            cholesky, info = torch.linalg.cholesky_ex(gram)
            if int(info) != 0:  # rank-deficient: R with a zero diagonal marks the columns to replace
                r = torch.zeros_like(gram)
                r.diagonal().copy_(gram.diagonal().clamp_min(0).sqrt())
                r[int(info) - 1 :, int(info) - 1 :].diagonal().zero_()
                return q, (r if r_total is None else r @ r_total).to(block.dtype)
            r = cholesky.T  # upper triangular, gram = rᵀ r
            q = torch.linalg.solve_triangular(r.to(q.dtype), q, upper=True, left=False)  # q r = previous q
            r_total = r if r_total is None else r @ r_total
        return q, r_total.to(block.dtype)


#: The space of every operator that does not declare one.
LOCAL = LocalSpace()


def space_of(op: Any) -> LocalSpace:
    """The operator's ``space`` (:data:`LOCAL` when it declares none)."""
    return getattr(op, "space", None) or LOCAL
