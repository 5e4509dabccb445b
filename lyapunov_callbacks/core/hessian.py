"""The Hessian of a model's training loss as a side-effect-free linear operator (Hessian-vector products)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lyapunov_callbacks.core import distributed as _dist
from lyapunov_callbacks.core.checks import (
    BadShapeError,
    NoTrainableParametersError,
    check_choice,
    check_dtype,
    check_positive,
    check_shape,
)
from lyapunov_callbacks.core.state import bitwise_equal, preserved_modes, preserved_state, restore_rng, rng_snapshot
from lyapunov_callbacks.core.compiled import check_compiled, eager_evaluation

__all__ = [
    "AutogradHessian",
    "FiniteDifferenceHessian",
    "HessianOperator",
    "StaleOperatorError",
    "NONSMOOTH_MODULES",
    "nonsmooth_modules",
    "preserved_state",
    "trainable_parameters",
    "num_trainable_parameters",
    "graph_hvp",
]

Backend = Literal["autograd", "finite_difference"]
BACKENDS = ("autograd", "finite_difference")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter with ``requires_grad=True``, in ``model.parameters()`` order.

    Shared (tied) parameters appear once, as in ``model.parameters()``.
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def estimate_dtype(params: Any) -> torch.dtype:
    """The dtype curvature is computed in by default: the parameters' when they share float32 or float64, else
    float32 (half-precision and mixed-dtype models are measured in float32)."""
    dtypes = {p.dtype for p in params}
    only = next(iter(dtypes)) if len(dtypes) == 1 else None
    return only if only in (torch.float32, torch.float64) else torch.float32


def num_trainable_parameters(model: nn.Module) -> int:
    """Length of the flat vectors a :class:`HessianOperator` of ``model`` acts on."""
    return sum(p.numel() for _, p in trainable_parameters(model))


def _prepare_batch(obj: Any, dtype: torch.dtype | None) -> Any:
    """Tensors nested in tuples / lists / dicts: inference-mode tensors cloned into normal ones (so
    autograd may save them), floating ones cast to ``dtype`` when given; anything else unchanged."""
    if isinstance(obj, torch.Tensor):
        if obj.is_inference():
            obj = obj.clone()
        return obj.to(dtype) if dtype is not None and obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_prepare_batch(x, dtype) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_prepare_batch(x, dtype) for x in obj)
    if isinstance(obj, Mapping):
        return type(obj)((k, _prepare_batch(v, dtype)) for k, v in obj.items())
    return obj


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``torch.func.functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_fn(self.model, batch)


#: Module types whose output is not twice differentiable everywhere (kinks, max selections). Exact HVPs
#: ignore the kinks (the Hessian of the piece the point lies on); a finite-difference step that crosses one
#: picks up a jump instead, so its products can be far off (see ``FiniteDifferenceHessian``).
NONSMOOTH_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_NONSMOOTH_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6,
                        torch.nn.functional.leaky_relu, torch.nn.functional.hardtanh)


def nonsmooth_modules(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` that are not smooth: a :data:`NONSMOOTH_MODULES` instance, or a
    Transformer layer whose ``activation`` is ReLU. Activations called as functions inside ``forward``
    (``F.relu``) cannot be seen this way."""
    found = []
    for name, m in model.named_modules():
        act = getattr(m, "activation", None)
        if isinstance(m, NONSMOOTH_MODULES) or (
            isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
            and (act in _NONSMOOTH_FUNCTIONS or isinstance(act, NONSMOOTH_MODULES))
        ):
            found.append(name or type(m).__name__)
    return found


def _second_order(grads: Any) -> list[int]:
    """Indices of the gradient pieces that depend on θ (the others have no second derivative)."""
    return [i for i, g in enumerate(grads) if g is not None and g.requires_grad]


def _gradient_of_gradient(grads: Any, index: list[int], leaves: Any, chunks: list[torch.Tensor]) -> Any:
    """:math:`\nabla_\theta (g^\top v)` per parameter: one reverse pass over the ``create_graph`` gradient ``grads``
    (its pieces ``index``) with ``v``'s pieces ``chunks``, the graph retained. The exact product shared by
    :class:`AutogradHessian` and :func:`graph_hvp`."""
    return torch.autograd.grad(
        [grads[i] for i in index], leaves, grad_outputs=[chunks[i] for i in index], retain_graph=True,
        allow_unused=True,
    )


def graph_hvp(loss: torch.Tensor, params: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """``H v`` of a scalar ``loss`` whose autograd graph already exists, leaving that graph usable.

    The product of :class:`AutogradHessian` (a ``create_graph`` gradient, then one reverse pass over it with
    ``v``'s pieces), taken on a graph someone else built, e.g. the training step's own loss before its
    backward: no forward pass of its own. Both passes retain the graph, so the caller's ``loss.backward()``
    still runs, and neither writes ``.grad``. It runs no forward, so there is no dropout RNG or BatchNorm
    statistic to guard; hooks registered on the parameters (``Tensor.register_hook``) do run, so callers
    check for them first.

    Args:
        loss: scalar tensor whose graph reaches ``params``.
        params: the tensors ``H`` is taken with respect to, in the order of ``v``'s pieces.
        v: flat vector of length ``sum(p.numel())`` in the parameters' dtype and device.

    Returns:
        ``H v`` as a new flat tensor (pieces the loss does not depend on twice are zero).

    Raises:
        ValueError: ``v`` of the wrong length, or ``loss`` not a scalar that requires grad.
        RuntimeError: whatever autograd raises for a graph without a double backward (e.g. a fused attention
            kernel, reentrant checkpointing); the graph is retained, so the caller can fall back.
    """
    numels = [p.numel() for p in params]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("loss must be a scalar tensor that requires grad (its graph is differentiated twice).")
    check_shape("v", v, sum(numels))
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, params, create_graph=True, retain_graph=True, allow_unused=True)
        index = _second_order(grads)
        out = torch.zeros_like(v)
        if not index:  # the loss is (at most) linear in every parameter
            return out
        chunks = [c.view(p.shape) for c, p in zip(torch.split(v, numels), params)]
        hv = _gradient_of_gradient(grads, index, params, chunks)
    offset = 0
    for t, n in zip(hv, numels):
        if t is not None:
            out[offset : offset + n].copy_(t.reshape(-1))
        offset += n
    return out


class StaleOperatorError(RuntimeError):
    """A parameter changed after the operator was built (an optimiser step, a ``.data`` write)."""


class HessianOperator:
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of a scalar training loss, as a linear operator.

    ``HessianOperator(model, loss_fn, batch, backend)`` returns the subclass for ``backend``:
    :class:`AutogradHessian` (``"autograd"``, exact) or :class:`FiniteDifferenceHessian`
    (``"finite_difference"``). This base holds what they share (parameters, dtype, batch, RNG,
    snapshot, checks, DDP average); each subclass implements only its product.

    ``L(θ) = loss_fn(model, batch)`` is differentiated with respect to the model's trainable
    parameters (``requires_grad=True``, in ``model.parameters()`` order, flattened and
    concatenated), so ``H`` is a symmetric ``[dim, dim]`` matrix applied to flat vectors by
    :meth:`matvec` / :meth:`matmat`. Every product counts in :attr:`num_hvps` (a ``matmat`` of
    ``b`` columns counts ``b``).

    **Side-effect free.** The model's own tensors are never touched: the loss is evaluated with
    ``torch.func.functional_call`` on the operator's own copies of the parameters (trainable and
    frozen) and on fresh *clones* of the buffers, so parameters, buffers (BatchNorm running
    statistics and ``num_batches_tracked``, bit for bit), every ``.grad`` (including
    ``None``-ness), the train/eval mode of every submodule and the global RNG streams are exactly
    as before. The loss is computed in the mode the model is in (train mode → BatchNorm batch
    statistics, dropout active).

    **A snapshot, checked.** The operator keeps a copy of the parameters at construction (one copy
    of ``θ``; a second, in the parameters' own dtype, only when the working dtype differs) and
    every product first compares the model's parameters with it, bit for bit: a parameter moved by
    an optimiser step or written through ``.data`` (which version counters miss) raises
    :class:`StaleOperatorError` (a ``RuntimeError``) instead of returning a stale product. With
    ``snapshot=False`` the operator differentiates at the parameters' own storage instead (no copy of
    ``θ`` where no cast is needed, and only the version counters are checked, so an optimiser step is still
    caught but a ``.data`` write is not): for an operator whose whole life is inside one call during which
    nothing writes the parameters, as in :func:`~lyapunov_callbacks.core.eigen.top_hessian_eigenvalues` and the
    callbacks. Its products are bit for bit those of ``snapshot=True``; it saves a copy of the weights per
    operator and a comparison of them per product.

    **One fixed matrix under dropout.** The CPU (and, on CUDA, the device's) RNG state is
    captured at construction; every loss evaluation inside the operator starts from that state
    and the caller's RNG is restored afterwards. All evaluations therefore use the same dropout
    masks, so ``H`` is deterministic and symmetric. Consequence relied on by the Lyapunov
    monitor: an operator built at the start of a training step (before the training forward)
    uses exactly the masks that the training step's own forward will draw.

    **Precision.** Computation runs with autocast disabled in :attr:`dtype` (default: the
    parameters' dtype if float32/float64, else float32); parameters (frozen ones too), floating
    buffers and floating tensors in ``batch`` that are in another dtype are cast to it. Returned
    vectors are in :attr:`dtype` on :attr:`device` (the parameters' device).

    **Distributed.** With ``distributed=True`` (default ``None``: ``torch.distributed`` is
    available and initialised) every :meth:`matvec` / :meth:`matmat` result is averaged over the
    ranks of ``process_group`` with exactly one all-reduce (SUM, then divide by the world size);
    the gradient and loss are averaged with one all-reduce at construction. The operator is then
    the Hessian of the mean of the per-rank mean losses, which for equal shard sizes is the
    Hessian of the mean loss over the union of the shards (the full batch). Every rank must
    construct the operator and call ``matvec``/``matmat`` in the same order.

    **Compiled models.** A ``torch.compile``'d model (or submodule) is evaluated through its own eager code
    (``torch.compiler.set_stance("force_eager")``, see :mod:`lyapunov_callbacks.core.compiled`): the same function
    at the same weights, with a double backward, and nothing is compiled or recompiled for it.

    Measured costs (one product in units of a forward+backward, per backend and model) are in
    ``benchmarks/README.md`` (``hvp_cost.py``); they are not repeated here so they cannot drift.

    Args:
        model: the module whose parameters define ``θ``.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, a scalar (mean-reduced) loss.
        batch: passed unchanged to ``loss_fn`` (except for the dtype cast described above).
        backend: ``"autograd"`` (exact, default) or ``"finite_difference"``.
        dtype: computation / result dtype; ``None`` = see *Precision*.
        process_group: the group to average over; ``None`` = the default group.
        distributed: force (``True``) or disable (``False``) averaging over ranks; ``None`` = auto.
        snapshot: ``True`` (default): differentiate at a checked copy of the parameters (see *A snapshot,
            checked*); ``False``: at the parameters themselves, for an operator used only inside one call.

    Raises:
        ValueError: unknown ``backend``, a non-floating ``dtype``, a non-bool ``snapshot``, a model without
            trainable parameters, a ``loss_fn`` that does not return a scalar, ``distributed=True`` without a
            process group, or a backend option out of range (see the backend)
            (the :mod:`lyapunov_callbacks.core.checks` types, all ``ValueError`` subclasses); a compiled model on
            PyTorch < 2.6 (:class:`~lyapunov_callbacks.core.compiled.CompiledModelError`).
        RuntimeError: ``matvec`` after :meth:`close`; :class:`StaleOperatorError` after the
            parameters changed.

    Example::

        with HessianOperator(model, lambda m, b: m.training_loss(b), batch) as H:
            v = torch.randn(H.dim, dtype=H.dtype)
            hv = H.matvec(v)
            rayleigh = v @ hv / (v @ v)
    """

    #: The backend name a subclass implements (``HessianOperator(..., backend=name)`` dispatches on it).
    backend: str = ""
    #: What a backend can do, declared instead of tested by name. ``graph_product``: its product is the exact
    #: double backward, which :func:`graph_hvp` can also take on a graph the caller built (the training step's).
    #: ``takes_gradient``: it accepts ``gradient=`` (the step's ∇L(θ)) and saves a backward pass with it.
    graph_product: bool = False
    takes_gradient: bool = False
    #: Scaled-dot-product-attention kernels allowed while the loss is evaluated (``None``: PyTorch's choice).
    _sdpa_backends: list[SDPBackend] | None = None

    def __new__(cls, model: nn.Module, loss_fn: Any = None, batch: Any = None, backend: Backend = "autograd",
                *args: Any, **kwargs: Any) -> HessianOperator:
        if cls is HessianOperator:
            check_choice("backend", backend, BACKENDS)
            cls = _BACKEND_CLASSES[backend]
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        batch: Any,
        backend: Backend | None = None,
        *,
        dtype: torch.dtype | None = None,
        process_group: Any = None,
        distributed: bool | None = None,
        snapshot: bool = True,
    ) -> None:
        if backend is not None and backend != type(self).backend:
            check_choice("backend", backend, BACKENDS)
            raise ValueError(f"backend={backend!r} given to {type(self).__name__} (backend={self.backend!r}).")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn={loss_fn!r} must be callable as loss_fn(model, batch) -> scalar Tensor.")
        if not isinstance(snapshot, bool):
            raise ValueError(f"`snapshot` must be True or False, got {snapshot!r}.")
        check_compiled(model, type(self).__name__)
        named = trainable_parameters(model)
        if not named:
            raise NoTrainableParametersError(
                "model has no trainable parameters (requires_grad=True); nothing to differentiate."
            )
        if dtype is None:
            dtype = estimate_dtype(p for _, p in named)
        check_dtype("dtype", dtype)

        self.dtype: torch.dtype = dtype
        self.device: torch.device = named[0][1].device
        self.dim: int = sum(p.numel() for _, p in named)
        self.num_hvps: int = 0
        self.process_group = process_group
        self.distributed: bool = _dist.is_distributed() if distributed is None else bool(distributed)
        if self.distributed and not _dist.is_distributed():
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group); pass distributed=None to detect it."
            )

        self._model = model
        self._module = _LossModule(model, loss_fn)
        self._names = ["model." + n for n, _ in named]
        self._params = [p for _, p in named]
        self._shapes = [p.shape for p in self._params]
        self._numels = [p.numel() for p in self._params]
        frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        every = [*self._params, *(p for _, p in frozen)]
        self._cast = any(t.dtype != dtype for t in every) or any(
            b.is_floating_point() and b.dtype != dtype for b in model.buffers()
        )
        # The point θ the operator differentiates at. snapshot=True: its own copies (never views of the
        # parameters, so a `.data` write cannot reach into it), in the working dtype. snapshot=False: the
        # parameters' own storage (detached) where no cast is needed. Frozen parameters are constants of L.
        self._snapshot = snapshot
        with torch.no_grad(), torch.inference_mode(False):
            copy = snapshot or any(t.is_inference() for t in every)
            self._theta = [p.detach().to(dtype, copy=copy) for p in self._params]
            self._frozen = {"model." + n: p.detach().to(dtype, copy=copy) for n, p in frozen}
        # What each product compares the model with: the copy itself when it has the parameter's dtype
        # (snapshot=False: the version counters alone).
        points = [*self._theta, *self._frozen.values()]
        self._watch = [
            (p, p._version, None if not snapshot else s if s.dtype == p.dtype else p.detach().clone())
            for p, s in zip(every, points)
        ]
        with torch.inference_mode(False):
            self._batch = _prepare_batch(batch, dtype if self._cast else None)
        self._buffers = [("model." + n, b) for n, b in model.named_buffers()]
        self._cuda_devices = (
            [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            if self.device.type == "cuda"
            else []
        )
        self._rng = rng_snapshot(self._cuda_devices)
        self._closed = False

        with self._full_precision():
            loss, grads = self._build()
        # One all-reduce for gradient and loss together (skipped when `gradient=` was given and
        # the loss is not needed: it is then computed lazily on every rank by loss()).
        if loss is not None:
            # Gradient pieces and loss written once into one buffer (the flat gradient is a view of it).
            packed = self._flatten([*grads, loss.detach().reshape(1)], extra=1)
            if self.distributed:
                _dist.all_reduce_mean_(packed, process_group)
            self._gradient = packed[:-1]
            self._loss_value: torch.Tensor | None = packed[-1]
        else:
            self._gradient = grads
            self._loss_value = None

    # ------------------------------------------------------------------ what a backend implements

    def _build(self) -> tuple[torch.Tensor | None, Any]:
        """Construction work of the backend: ``(loss or None, gradient pieces or flat gradient)``."""
        raise NotImplementedError

    @property
    def nonsmooth(self) -> list[str]:
        """Submodules whose kinks make this backend's products unreliable; none for an exact product."""
        return []

    def _local_hvp(self, v: torch.Tensor) -> torch.Tensor:
        """This rank's ``H v`` for one contiguous flat ``v`` as a new tensor (the rank average is ``H v``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public API

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for a flat vector ``v`` of length :attr:`dim` (counts one HVP, one all-reduce under DDP).

        The direct single-vector path: ``v`` is split into per-parameter views (no copy), one
        product is computed and its pieces are concatenated once.
        """
        self._check_live()
        check_shape("v", v, self.dim)
        v = v.detach().to(device=self.device, dtype=self.dtype)
        with self._full_precision():
            if v.is_inference():
                v = v.clone()
            out = self._local_hvp(v)
            self.num_hvps += 1
            if self.distributed:
                _dist.all_reduce_mean_(out, self.process_group)
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for ``V`` of shape ``[dim, b]`` (counts ``b`` HVPs, one all-reduce under DDP)."""
        self._check_live()
        if not isinstance(V, torch.Tensor) or V.ndim != 2 or V.shape[0] != self.dim:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise BadShapeError(f"V must be a tensor of shape [dim={self.dim}, b], got {shape}.")
        with self._full_precision():
            V = V.detach().to(device=self.device, dtype=self.dtype)
            if V.is_inference():
                V = V.clone()
            rows = V.T.contiguous()  # each column as a contiguous vector, as matvec gets it
            cols = [self._local_hvp(rows[j]) for j in range(V.shape[1])]
            out = torch.stack(cols, dim=1) if cols else V.new_zeros(self.dim, 0)
            self.num_hvps += V.shape[1]
            if self.distributed:
                _dist.all_reduce_mean_(out, self.process_group)
        return out

    __matmul__ = matmat

    def gradient(self) -> torch.Tensor:
        """The flat gradient ``∇L(θ)`` (the all-rank mean under DDP); computed at construction."""
        self._check_live(check_parameters=False)
        if isinstance(self._gradient, list):  # kept as given, one tensor per parameter
            return self._flatten(self._gradient)
        return self._gradient.clone()

    def loss(self) -> torch.Tensor:
        """The scalar loss ``L(θ)`` (the all-rank mean under DDP) in :attr:`dtype`."""
        self._check_live(check_parameters=self._loss_value is None)
        if self._loss_value is None:
            with torch.no_grad(), self._full_precision():
                local = self._loss(self._theta).detach().to(self.dtype).reshape(1)
            if self.distributed:
                _dist.all_reduce_mean_(local, self.process_group)
            self._loss_value = local[0]
        return self._loss_value.clone()

    def close(self) -> None:
        """Release the autograd graph and cached tensors; later products raise ``RuntimeError``."""
        self._closed = True
        for attr in ("_graph_grads", "_leaves", "_theta", "_frozen", "_watch", "_gradient",
                     "_loss_value", "_batch"):
            if hasattr(self, attr):
                setattr(self, attr, None)

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, backend={self.backend!r}, dtype={self.dtype}, "
            f"device={self.device}, distributed={self.distributed}, num_hvps={self.num_hvps})"
        )

    # ------------------------------------------------------------------ shared internals

    @contextlib.contextmanager
    def _full_precision(self) -> Iterator[None]:
        # Autocast also rewrites the ops of a create_graph backward, so every pass runs inside this;
        # leaving inference mode lets the operator be used from validation / inference hooks.
        with torch.inference_mode(False), torch.autocast(device_type=self.device.type, enabled=False):
            yield

    @contextlib.contextmanager
    def _fixed_randomness(self) -> Iterator[None]:
        """Run with the RNG captured at construction; restore the caller's RNG and modes after."""
        with torch.random.fork_rng(devices=self._cuda_devices), preserved_modes(self._model):
            restore_rng(self._rng)
            yield

    def _loss(self, params: list[torch.Tensor]) -> torch.Tensor:
        tensors = dict(zip(self._names, params))
        tensors.update(self._frozen)
        for name, b in self._buffers:
            # Fresh clones: BatchNorm's in-place running-stat updates land on throwaway copies.
            if b is None:
                continue
            tensors[name] = b.to(self.dtype, copy=True) if (self._cast and b.is_floating_point()) else b.clone()
        kernels = sdpa_kernel(self._sdpa_backends) if self._sdpa_backends else contextlib.nullcontext()
        # eager_evaluation: a torch.compile'd model runs its own eager code here (compiled graphs have no double
        # backward, and a cast or swapped parameters would recompile them); the training graph is left alone.
        with self._fixed_randomness(), self._full_precision(), kernels, eager_evaluation():
            loss = torch.func.functional_call(self._module, tensors, (self._batch,))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(
                "loss_fn(model, batch) must return a scalar floating-point Tensor (mean-reduced loss), got "
                f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}."
            )
        return loss.reshape(())

    def _loss_and_gradient(self, params: list[torch.Tensor], flatten: bool = True) -> tuple[torch.Tensor, Any]:
        with torch.enable_grad(), self._full_precision():
            leaves = [p.detach().requires_grad_(True) for p in params]
            loss = self._loss(leaves)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return loss.detach(), self._flatten(grads) if flatten else grads

    def _flatten(self, tensors: Any, extra: int = 0) -> torch.Tensor:
        """One flat :attr:`dtype` vector of the per-parameter ``tensors`` (``None`` = zeros), written in one copy.

        ``extra`` further 1-element tensors may follow the per-parameter ones (packed at the end).
        """
        if all(t is not None and t.dtype == self.dtype for t in tensors):
            return torch.cat([t.detach().reshape(-1) for t in tensors])  # one op for all the copies
        out = torch.empty(self.dim + extra, dtype=self.dtype, device=self.device)
        offset = 0
        for t, n in zip(tensors, [*self._numels, *([1] * extra)]):
            if t is None:
                out[offset : offset + n].zero_()
            else:
                out[offset : offset + n].copy_(t.detach().reshape(-1))
            offset += n
        return out

    def _unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [c.view(s) for c, s in zip(torch.split(v, self._numels), self._shapes)]

    def _check_vector(self, v: Any, name: str) -> torch.Tensor:
        check_shape(name, v, self.dim)
        return v.detach().to(device=self.device, dtype=self.dtype)

    def _check_live(self, check_parameters: bool = True) -> None:
        if self._closed:
            raise RuntimeError("HessianOperator was closed; build a new one to compute more products.")
        if check_parameters and any(
            p._version != ver or (saved is not None and not bitwise_equal(p, saved)) for p, ver, saved in self._watch
        ):
            raise StaleOperatorError(
                "The model's parameters were modified in place after this HessianOperator was built "
                "(an optimiser step, or a write through `.data`); build a new operator at the new parameters."
            )


class AutogradHessian(HessianOperator):
    r"""Exact HVPs by double backward (``backend="autograd"``); see :class:`HessianOperator` for the rest.

    The gradient graph :math:`g = \nabla L` is built once with ``create_graph=True`` at
    construction and reused for every product, :math:`Hv = \nabla_\theta (g^\top v)`
    (``torch.autograd.grad(g, θ, v, retain_graph=True)``): the forward and first backward are
    paid once per operator, each product is one reverse-over-reverse pass over the saved
    activations. The graph lives as long as the operator: release it with :meth:`close` (or use
    the operator as a context manager; garbage collection frees it too).

    Attention: the loss is evaluated with ``sdpa_kernel(SDPBackend.MATH)``, the scaled-dot-product
    attention kernel that has a double backward (PyTorch's fused CPU / flash kernels have none),
    so ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` models work unchanged.
    """

    backend = "autograd"
    graph_product = True
    _sdpa_backends = [SDPBackend.MATH]

    def _build(self) -> tuple[torch.Tensor, Any]:
        self._leaves = [t.requires_grad_(True) for t in self._theta]
        with torch.enable_grad():
            loss = self._loss(self._leaves)
            grads = torch.autograd.grad(loss, self._leaves, create_graph=True, allow_unused=True)
        self._graph_grads = grads
        self._hvp_index = _second_order(grads)
        return loss, grads

    def _local_hvp(self, v: torch.Tensor) -> torch.Tensor:
        if not self._hvp_index:  # loss is (at most) linear in every parameter
            return torch.zeros_like(v)
        hv = _gradient_of_gradient(self._graph_grads, self._hvp_index, self._leaves, self._unflatten(v))
        return self._flatten(hv)


class FiniteDifferenceHessian(HessianOperator):
    r"""Forward-difference HVPs (``backend="finite_difference"``), the paper's perturbed-trajectory view.

    :math:`Hv \approx (\nabla L(\theta + \varepsilon v) - \nabla L(\theta)) / \varepsilon` with
    :math:`\varepsilon = \max(\text{fd\_rel\_eps}\,\lVert\theta\rVert, \sqrt{\epsilon_\text{dtype}})
    / \lVert v\rVert`, i.e. the step :math:`\varepsilon v` has length ``fd_rel_eps`` times the
    parameter norm (floored at the square root of the dtype's machine epsilon so ``θ = 0``
    works). :math:`\nabla L(\theta)` is computed once at construction (or taken from
    ``gradient=``). The perturbed point is passed functionally, so no parameter is ever modified.
    On smooth networks float32 is most accurate near ``‖εv‖ ≈ 1e-3‖θ‖`` (the default).

    **Non-smooth models.** A step that crosses a kink (ReLU, max-pooling) picks up a jump of the
    gradient instead of a derivative, so products and eigenvalues can be far off the Hessian that
    autograd returns (1.8 % on h0 of a ReLU Transformer encoder layer at ``tol=1e-6`` in
    ``tests/test_hessian_models.py``) with no warning from the solver's residual. :attr:`nonsmooth`
    lists the non-smooth submodules found (:func:`nonsmooth_modules`); :func:`~lyapunov_callbacks.core.eigen.top_hessian_eigenvalues`
    then reports ``converged=False`` and warns, naming them and the fix (``hvp="autograd"``, or a
    smooth activation such as GELU / SiLU).

    Args (besides :class:`HessianOperator`'s):
        fd_rel_eps: relative finite-difference step, default ``1e-3`` (> 0).
        gradient: ``∇L(θ)`` if already known (the all-rank mean under DDP), saving one backward pass: a flat
            vector, or one tensor per trainable parameter in their order (e.g. the ``.grad`` of each, used
            without concatenating them). Copied unless ``snapshot=False``.
    """

    backend = "finite_difference"
    takes_gradient = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        batch: Any,
        backend: Backend | None = None,
        *,
        fd_rel_eps: float = 1e-3,
        gradient: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        check_positive("fd_rel_eps", fd_rel_eps, "fd_rel_eps=1e-3")
        self.fd_rel_eps = float(fd_rel_eps)
        self._given_gradient = gradient
        super().__init__(model, loss_fn, batch, backend, **kwargs)
        self._given_gradient = None  # kept (copied or not) by _build

    @property
    def nonsmooth(self) -> list[str]:
        """The non-smooth submodules of the model (:func:`nonsmooth_modules`), found on first use."""
        if self._nonsmooth is None:
            self._nonsmooth = nonsmooth_modules(self._model)
        return self._nonsmooth

    def _build(self) -> tuple[torch.Tensor | None, Any]:
        gradient = self._given_gradient
        self._nonsmooth: list[str] | None = None
        # ‖θ‖ from the per-parameter squared norms (no flat copy of θ), read in one transfer.
        squares = torch.stack([torch.dot(t.reshape(-1), t.reshape(-1)) for t in self._theta])
        self._theta_norm = math.sqrt(sum(squares.tolist()))
        if isinstance(gradient, (list, tuple)):
            if len(gradient) != len(self._shapes) or any(
                not isinstance(g, torch.Tensor) or g.shape != s for g, s in zip(gradient, self._shapes)
            ):
                got = [tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__ for g in gradient]
                raise BadShapeError(
                    f"gradient given per parameter must hold one tensor per trainable parameter with its shape, "
                    f"{[tuple(s) for s in self._shapes]}; got {got}. Or pass the flat gradient."
                )
            copy = self._snapshot
            return None, [g.detach().to(device=self.device, dtype=self.dtype, copy=copy) for g in gradient]
        if gradient is not None:
            gradient = self._check_vector(gradient, "gradient")
            return None, gradient.clone() if self._snapshot else gradient
        return self._loss_and_gradient(self._theta, flatten=False)

    def _local_hvp(self, v: torch.Tensor) -> torch.Tensor:
        """This rank's ``(∇L_local(θ + εv) − ∇L(θ)) / ε``, as a new flat vector.

        ``∇L(θ)`` is the same on every rank (the all-rank mean), so the rank average of these is the difference
        quotient of the mean loss. One flat buffer holds the perturbed point ``θ + εv`` (the loss is differentiated
        at views of it) and, once the backward is done with it, receives the result: a product allocates one
        vector of length :attr:`dim` besides the gradient pieces of its backward (on CPU, each further fresh
        buffer of that size costs page faults when it is first written).
        """
        eps = self._fd_eps(v)
        if eps == 0.0:  # v = 0: H v = 0
            return torch.zeros_like(v)
        out = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        pieces = self._unflatten(out)
        for t, c, piece in zip(self._theta, self._unflatten(v), pieces):
            torch.add(t, c, alpha=eps, out=piece)
        grads = self._loss_and_gradient(pieces, flatten=False)[1]
        # Nothing reads θ + εv any more (the backward released its graph): the same views take the result.
        bases = self._gradient if isinstance(self._gradient, list) else self._unflatten(self._gradient)
        for g, base, piece in zip(grads, bases, pieces):
            if g is None:  # no gradient at θ + εv: the difference is −∇L(θ)
                torch.neg(base, out=piece)
            else:
                torch.sub(g.detach(), base, out=piece)
            piece.div_(eps)
        return out

    def _fd_eps(self, v: torch.Tensor) -> float:
        v_norm = float(torch.linalg.vector_norm(v))
        if v_norm == 0.0:
            return 0.0
        step = max(self.fd_rel_eps * self._theta_norm, math.sqrt(torch.finfo(self.dtype).eps))
        return step / v_norm


_BACKEND_CLASSES: dict[str, type[HessianOperator]] = {
    AutogradHessian.backend: AutogradHessian,
    FiniteDifferenceHessian.backend: FiniteDifferenceHessian,
}


def backend_class(backend: str) -> type[HessianOperator]:
    """The operator class of ``backend`` (``"autograd"`` or ``"finite_difference"``): what it can do is declared on
    it (:attr:`HessianOperator.graph_product`, :attr:`HessianOperator.takes_gradient`)."""
    check_choice("backend", backend, BACKENDS)
    return _BACKEND_CLASSES[backend]
