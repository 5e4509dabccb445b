"""Small ``torch.distributed`` helpers for the curvature core; every one is a no-op without a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "all_reduce_mean_", "broadcast_"]


def is_distributed(process_group: Any = None) -> bool:
    """Whether collectives should run: ``torch.distributed`` is available and initialised.

    Args:
        process_group: unused for the decision (kept for a uniform signature); a group only
            makes sense once the default process group is initialised.

    Example::

        if is_distributed():
            all_reduce_mean_(tensor)
    """
    del process_group
    return dist.is_available() and dist.is_initialized()


def world_size(process_group: Any = None) -> int:
    """Number of ranks in ``process_group`` (the default group when ``None``); ``1`` without one."""
    if not is_distributed():
        return 1
    return dist.get_world_size(group=process_group)


def rank(process_group: Any = None) -> int:
    """Rank of this process in ``process_group``; ``0`` without a process group."""
    if not is_distributed():
        return 0
    return dist.get_rank(group=process_group)


def all_reduce_mean_(tensor: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    """Average ``tensor`` in place over the ranks of ``process_group`` with ONE all-reduce.

    The reduction is ``SUM`` followed by a division by the world size (``ReduceOp.AVG`` is not
    implemented by gloo). Without a process group the tensor is returned unchanged.

    Args:
        tensor: the local tensor; overwritten with the mean over ranks.
        process_group: the group to reduce over; ``None`` = the default group.

    Returns:
        ``tensor`` itself.

    Example::

        grad = all_reduce_mean_(grad)   # identical on every rank afterwards
    """
    if not is_distributed():
        return tensor
    n = dist.get_world_size(group=process_group)
    if n == 1:
        return tensor
    # Look the collective up at call time so tests can count calls by patching torch.distributed.
    torch.distributed.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    tensor.div_(n)
    return tensor


def broadcast_(tensor: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank 0's copy (rank 0 *of the group*).

    Args:
        tensor: the tensor to synchronise (same shape and dtype on every rank).
        process_group: the group; ``None`` = the default group.

    Returns:
        ``tensor`` itself.

    Example::

        v0 = broadcast_(torch.randn(dim, generator=gen))   # same start vector everywhere
    """
    if not is_distributed() or dist.get_world_size(group=process_group) == 1:
        return tensor
    src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
    torch.distributed.broadcast(tensor, src=src, group=process_group)
    return tensor
