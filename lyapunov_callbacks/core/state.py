"""Snapshot / restore of what a measurement could disturb: parameters, buffers, ``.grad``, modes, RNG."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["bitwise_equal", "preserved_state", "preserved_modes", "rng_snapshot", "restore_rng"]


def rng_snapshot(cuda_devices: list[int] | None = None) -> dict:
    """The global RNG streams: the CPU generator and, when CUDA is initialised, the CUDA generators.

    Args:
        cuda_devices: CUDA device indices to snapshot; ``None`` = every device, but only when CUDA
            has already been initialised (a snapshot must not initialise CUDA as a side effect).
    """
    state: dict = {"cpu": torch.get_rng_state(), "cuda": {}}
    if cuda_devices is None:
        # ``is_initialized`` first: it reads a flag, while ``is_available`` (and ``device_count``) re-query
        # NVML (a dlopen, ~0.3 ms) on every call once Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1.
        cuda_devices = list(range(_cuda_device_count())) if torch.cuda.is_initialized() else []
    for idx in cuda_devices:
        state["cuda"][idx] = torch.cuda.get_rng_state(idx)
    return state


_CUDA_DEVICE_COUNT: list[int] = []


def _cuda_device_count() -> int:
    """``torch.cuda.device_count()`` of an initialised CUDA context, asked once per process (it cannot change then)."""
    if not _CUDA_DEVICE_COUNT:
        _CUDA_DEVICE_COUNT.append(torch.cuda.device_count())
    return _CUDA_DEVICE_COUNT[0]


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


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (so NaNs and signed zeros count as they are stored)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False

    # Compared as integers of the element's width: bits, not values (NaN == NaN), and as fast as a float
    # comparison (a uint8 view is ~40x slower for torch.equal on CPU).
    width = _INT_OF_SIZE.get(a.element_size(), torch.uint8) if not a.is_complex() else torch.uint8

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().view(-1).view(width)

    return torch.equal(raw(a), raw(b))


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _changed(t: torch.Tensor, version: int, saved: torch.Tensor) -> bool:
    # Version counters miss kernel-internal writes (BatchNorm's running statistics are updated
    # without a version bump), so compare the bits as well.
    return t._version != version or not bitwise_equal(t, saved)


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, copy_tensors: bool = True) -> Iterator[nn.Module]:
    """Context manager that leaves ``model`` and the global RNG exactly as it found them.

    Restored on exit (also when the body raises): the values of every parameter and buffer
    (BatchNorm running statistics and ``num_batches_tracked`` included), every parameter's
    ``.grad`` (its values, or ``None``-ness), the ``training`` flag of every submodule, and the
    CPU and (initialised) CUDA RNG streams. Tensors are restored in place and only when they
    were modified, so untouched tensors keep their identity and version (graphs that saved them
    stay valid). A tensor counts as modified when its version counter moved or its bits differ
    (BatchNorm writes running statistics without a version bump). Cost: one copy of the
    parameters, gradients and buffers, and one comparison of each on exit.

    With ``copy_tensors=False`` nothing is copied or compared (cost independent of the model's
    size): only references, version counters, modes and the RNG are recorded. On exit the modes,
    the RNG, ``.grad`` references (and ``None``-ness) and reassigned buffers are restored as above,
    and a parameter, buffer or gradient modified in place (its version counter moved) raises
    ``RuntimeError`` since its old value was not kept. Meant for code known not to write to the
    model's tensors — e.g. :class:`~lyapunov_callbacks.core.hessian.HessianOperator`, which evaluates
    the loss on detached leaves and cloned buffers — as a cheap guard on a hot path. Writes that
    bypass version counters (BatchNorm running statistics updated by a train-mode forward of the
    model itself) are not seen in this mode.

    Args:
        model: the module to protect.
        copy_tensors: keep copies and restore values (default ``True``), or only guard (``False``).

    Raises:
        RuntimeError: with ``copy_tensors=False``, on exit, if a tensor was modified in place (not
            raised when the body itself raised).

    Example::

        with preserved_state(model):
            loss = model.training_loss(batch)   # BatchNorm stats, dropout RNG: all undone
            loss.backward()                     # .grad: undone too
    """
    params = list(model.named_parameters(remove_duplicate=True))
    buffers = list(model.named_buffers(remove_duplicate=True))

    def keep(t: torch.Tensor) -> torch.Tensor | None:
        return t.detach().clone() if copy_tensors else None

    saved_params = [(name, p, p._version, keep(p)) for name, p in params]
    saved_grads = [
        (name, p, p.grad, None, None) if p.grad is None else (name, p, p.grad, p.grad._version, keep(p.grad))
        for name, p in params
    ]
    # Buffers can be reassigned (module.buf = new) rather than modified; remember the owner too.
    saved_buffers = []
    for name, b in buffers:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        saved_buffers.append((name, owner, attr, b, b._version, keep(b)))
    rng = rng_snapshot()
    modified: list[str] = []

    def restore(t: torch.Tensor, version: int, value: torch.Tensor | None, name: str) -> None:
        if value is None:
            if t._version != version:
                modified.append(name)
        elif _changed(t, version, value):
            t.copy_(value)

    try:
        with preserved_modes(model):
            yield model
    except BaseException:
        raised = True
        raise
    else:
        raised = False
    finally:
        with torch.no_grad():
            for name, p, version, value in saved_params:
                restore(p, version, value, name)
            for name, p, grad, version, value in saved_grads:
                if grad is None:
                    if p.grad is not None:
                        p.grad = None
                else:
                    if p.grad is not grad:
                        p.grad = grad
                    restore(grad, version, value, f"{name}.grad")
            for name, owner, attr, b, version, value in saved_buffers:
                if owner._buffers.get(attr) is not b:
                    owner._buffers[attr] = b
                restore(b, version, value, name)
        restore_rng(rng)
        if modified and not raised:
            raise RuntimeError(
                f"preserved_state(copy_tensors=False): {', '.join(modified)} modified in place inside the block, "
                "and no copy was kept to restore it. Use copy_tensors=True for code that writes to the model."
            )
