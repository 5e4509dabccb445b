"""Snapshot / restore of what a measurement could disturb: parameters, buffers, ``.grad``, modes, RNG."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["preserved_state", "preserved_modes", "rng_snapshot", "restore_rng"]


def rng_snapshot(cuda_devices: list[int] | None = None) -> dict:
    """The global RNG streams: the CPU generator and, when CUDA is initialised, the CUDA generators.

    Args:
        cuda_devices: CUDA device indices to snapshot; ``None`` = every device, but only when CUDA
            has already been initialised (a snapshot must not initialise CUDA as a side effect).
    """
    state: dict = {"cpu": torch.get_rng_state(), "cuda": {}}
    if cuda_devices is None:
        cuda_devices = (
            list(range(torch.cuda.device_count()))
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else []
        )
    for idx in cuda_devices:
        state["cuda"][idx] = torch.cuda.get_rng_state(idx)
    return state


def restore_rng(state: dict) -> None:
    """Set the global RNG streams to a :func:`rng_snapshot`."""
    torch.set_rng_state(state["cpu"])
    for idx, s in state["cuda"].items():
        torch.cuda.set_rng_state(s, idx)


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of every submodule on exit (without recursing through ``train()``)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (so NaNs and signed zeros count as they are stored)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().view(-1).view(torch.uint8)

    return torch.equal(raw(a), raw(b))


def _changed(t: torch.Tensor, version: int, saved: torch.Tensor) -> bool:
    # Version counters miss kernel-internal writes (BatchNorm's running statistics are updated
    # without a version bump), so compare the bits as well.
    return t._version != version or not _bitwise_equal(t, saved)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager that leaves ``model`` and the global RNG exactly as it found them.

    Restored on exit (also when the body raises): the values of every parameter and buffer
    (BatchNorm running statistics and ``num_batches_tracked`` included), every parameter's
    ``.grad`` (its values, or ``None``-ness), the ``training`` flag of every submodule, and the
    CPU and (initialised) CUDA RNG streams. Tensors are restored in place and only when they
    were modified, so untouched tensors keep their identity and version (graphs that saved them
    stay valid). A tensor counts as modified when its version counter moved or its bits differ
    (BatchNorm writes running statistics without a version bump). Cost: one copy of the
    parameters, gradients and buffers.

    Args:
        model: the module to protect.

    Example::

        with preserved_state(model):
            loss = model.training_loss(batch)   # BatchNorm stats, dropout RNG: all undone
            loss.backward()                     # .grad: undone too
    """
    params = list(model.named_parameters(remove_duplicate=True))
    buffers = list(model.named_buffers(remove_duplicate=True))
    saved_params = [(p, p._version, p.detach().clone()) for _, p in params]
    saved_grads = [
        (p, p.grad, None, None) if p.grad is None else (p, p.grad, p.grad._version, p.grad.detach().clone())
        for _, p in params
    ]
    # Buffers can be reassigned (module.buf = new) rather than modified; remember the owner too.
    saved_buffers = []
    for name, b in buffers:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        saved_buffers.append((owner, attr, b, b._version, b.detach().clone()))
    rng = rng_snapshot()
    try:
        with preserved_modes(model):
            yield model
    finally:
        with torch.no_grad():
            for p, version, value in saved_params:
                if _changed(p, version, value):
                    p.copy_(value)
            for p, grad, version, value in saved_grads:
                if grad is None:
                    if p.grad is not None:
                        p.grad = None
                else:
                    if p.grad is not grad:
                        p.grad = grad
                    if _changed(grad, version, value):
                        grad.copy_(value)
            for owner, attr, b, version, value in saved_buffers:
                if owner._buffers.get(attr) is not b:
                    owner._buffers[attr] = b
                if _changed(b, version, value):
                    b.copy_(value)
        restore_rng(rng)
