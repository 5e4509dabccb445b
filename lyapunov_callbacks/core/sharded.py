r"""Hessian-vector products of a sharded model (FSDP2's ``fully_shard``), from the strategy's own gradients.

Under FSDP2 every trainable parameter is a ``DTensor`` sharded on its first dimension over the data-parallel
process group; the forward runs on all-gathered copies and the gradients reach ``.grad`` through FSDP's
reduce-scatter, already averaged over the ranks. ``torch.autograd.grad`` with respect to the shards does not reach
the loss, so there is no double backward: a product is a difference of gradients, each gradient one forward and
backward of the sharded model at perturbed shards,

.. math:: Hv \approx \frac{\nabla L(\theta + \varepsilon v) - \nabla L(\theta - \varepsilon v)}{2\varepsilon}
          \quad(\text{central, } O(\varepsilon^2))
          \qquad\text{or}\qquad
          \frac{\nabla L(\theta + \varepsilon v) - \nabla L(\theta)}{\varepsilon}\quad(\text{forward, } O(\varepsilon)),

where :math:`L` is the mean over the ranks of each rank's loss on its own batch: for equal batches, the mean loss
over the union of the ranks' batches. The step length is stated, not tuned: :math:`\lVert\varepsilon v\rVert =
r\,\lVert\theta\rVert` (floored at :math:`r`, so :math:`\theta = 0` works) with :math:`r = \epsilon_\text{mach}^{1/3}`
for central differences (4.9e-3 in float32: the step that balances the :math:`O(\varepsilon^2)` truncation against
the rounding of the gradient difference) and :math:`r = 10^{-3}` for forward ones (the finite-difference backend's
default), unless ``fd_rel_eps`` is given.

Vectors are this rank's shards, flattened and concatenated in parameter order (:class:`~lyapunov_callbacks.core.space.
ShardedSpace`): no rank ever holds a full-length vector, and nothing is all-gathered by the operator (the strategy's
forward gathers layer by layer, as in training). What an estimate adds per rank is a few shard-sized vectors: the
saved shards :math:`\theta`, the base gradient (forward differences), one result per product and the solver's basis.

**Side-effect free.** The shards are perturbed in place (the strategy's forward reads them) and written back from
the saved copy, bit for bit, after every gradient; ``.grad`` (the step's gradient), the buffers (BatchNorm
statistics), the train/eval modes and the RNG (every gradient uses the dropout masks captured at construction) are
restored too.

Smoothness: a difference quotient across a kink (ReLU, max-pooling) measures a jump, not curvature; the operator
declares the model's non-smooth modules (:attr:`ShardedHessian.nonsmooth`) and the solver then reports
``converged=False`` with a warning. Smooth models (GELU/tanh Transformers and MLPs) are what this suits.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lyapunov_callbacks.core.checks import UnknownChoiceError, check_choice, check_positive
from lyapunov_callbacks.core.hessian import nonsmooth_modules, trainable_parameters
from lyapunov_callbacks.core.space import ShardedSpace, local_tensor
from lyapunov_callbacks.core.state import preserved_modes, restore_rng, rng_snapshot

__all__ = ["FD_SCHEMES", "ShardingError", "ShardedHessian", "default_fd_rel_eps", "is_sharded", "shard_group"]

#: Finite-difference schemes of :class:`ShardedHessian`.
FD_SCHEMES = ("central", "forward")


class ShardingError(ValueError):
    """A sharded layout the curvature callbacks cannot measure (tensor parallelism, mixed or 2-D meshes)."""


@functools.cache
def _dtensor_type() -> type | None:
    """``DTensor``, imported on first use (not at the core's import); ``None`` without ``torch.distributed``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _is_dtensor(t: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether any trainable parameter of ``model`` is a ``DTensor`` (FSDP2 / tensor-parallel shards)."""
    return any(_is_dtensor(p) for _, p in trainable_parameters(model))


def shard_group(model: nn.Module, what: str = "the curvature callbacks") -> Any:
    """The process group ``model``'s parameters are sharded over (``None`` if none is sharded).

    Raises:
        ShardingError: a layout other than FSDP2's (every trainable parameter a ``DTensor`` sharded on its first
            dimension over one 1-D mesh): tensor parallelism, HSDP's 2-D mesh, or a mix of sharded and plain
            parameters. The message says what works.
    """
    named = trainable_parameters(model)
    sharded = [(n, p) for n, p in named if _is_dtensor(p)]
    if not sharded:
        return None
    plain = [n for n, p in named if not _is_dtensor(p)]
    if plain:
        raise ShardingError(
            f"{what}: some trainable parameters are sharded (DTensor) and some are not ({', '.join(plain[:3])}"
            f"{', ...' if len(plain) > 3 else ''}). Apply fully_shard to the root module too, so that every "
            "trainable parameter is sharded."
        )
    mesh = sharded[0][1].device_mesh
    for name, p in sharded:
        placements = tuple(type(x).__name__ + str(getattr(x, "dim", "")) for x in p.placements)
        if p.device_mesh.ndim != 1 or placements != ("Shard0",) or p.device_mesh != mesh:
            raise ShardingError(
                f"{what}: parameter {name!r} is laid out as {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh "
                f"{p.device_mesh.mesh_dim_names}; measuring supports FSDP2 sharding alone (Shard(0) over one "
                "data-parallel mesh). Tensor parallelism and HSDP are not supported: use "
                "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with fully_shard, or DDP."
            )
    return mesh.get_group()


def default_fd_rel_eps(dtype: torch.dtype, scheme: str) -> float:
    """The stated step rule: ``ε_mach^(1/3)`` of ``dtype`` for central differences, ``1e-3`` for forward ones."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0) if scheme == "central" else 1e-3


class ShardedHessian:
    r"""The Hessian of a sharded model's mean training loss, as a linear operator on this rank's shards.

    The same interface as :class:`~lyapunov_callbacks.core.hessian.HessianOperator` (``matvec``, ``matmat``,
    ``gradient``, ``loss``, ``close``, ``dim``, ``dtype``, ``device``, ``num_hvps``, a context manager), with
    :attr:`space` the :class:`~lyapunov_callbacks.core.space.ShardedSpace` the solvers take inner products in,
    :attr:`dim` this rank's number of entries and :attr:`global_dim` the model's. Every rank must build the
    operator and call its products in the same order (each gradient is a collective of the strategy).

    Args:
        model: the sharded module (FSDP2: ``fully_shard`` applied, every trainable parameter a ``DTensor``).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, this rank's scalar mean loss (the module's forward runs the
            strategy's gathers; its backward the reduce-scatter that averages over the ranks).
        batch: this rank's batch.
        scheme: ``"central"`` (default, two gradients per product, error O(ε²)) or ``"forward"`` (one gradient
            per product, error O(ε), reusing ``gradient``).
        fd_rel_eps: relative step ``r`` (``‖εv‖ = r·max(‖θ‖, 1)``); ``None``: :func:`default_fd_rel_eps`.
        gradient: the step's ``∇L(θ)`` per parameter (``.grad`` DTensors or their local shards), saving the
            gradient at ``θ`` that forward differences need.
        rng: the RNG state every gradient runs from (the training forward's, so dropout masks match); ``None``:
            the current state.

    Raises:
        ShardingError: a layout other than FSDP2's (see :func:`shard_group`), or no sharded parameter.
        ValueError: ``scheme`` / ``fd_rel_eps`` invalid.
    """

    backend = "finite_difference"
    graph_product = False
    takes_gradient = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        batch: Any,
        *,
        scheme: str = "central",
        fd_rel_eps: float | None = None,
        gradient: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        rng: dict | None = None,
    ) -> None:
        check_choice("scheme", scheme, FD_SCHEMES)
        group = shard_group(model, type(self).__name__)
        if group is None:
            raise ShardingError(f"{type(self).__name__} needs a sharded model (fully_shard); use HessianOperator.")
        named = trainable_parameters(model)
        self._model, self._loss_fn, self._batch = model, loss_fn, batch
        self._params = [p for _, p in named]
        self._shards = [local_tensor(p) for p in self._params]  # views of this rank's storage
        dtypes = {t.dtype for t in self._shards}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise UnknownChoiceError(
                f"{type(self).__name__} needs trainable parameters of one floating dtype, got {sorted(map(str, dtypes))}."
            )
        self.dtype: torch.dtype = next(iter(dtypes))
        self.device: torch.device = self._shards[0].device
        self.scheme = scheme
        if fd_rel_eps is None:
            fd_rel_eps = default_fd_rel_eps(self.dtype, scheme)
        check_positive("fd_rel_eps", fd_rel_eps, f"fd_rel_eps={default_fd_rel_eps(self.dtype, scheme):.3g}")
        self.fd_rel_eps = float(fd_rel_eps)
        self.space = ShardedSpace(group)
        self.process_group = group
        self.distributed = False  # products are already the rank mean (the strategy's reduce-scatter)
        self._numels = [t.numel() for t in self._shards]
        self._shapes = [t.shape for t in self._shards]
        self.dim: int = sum(self._numels)
        self.global_dim: int = sum(p.numel() for p in self._params)
        self.num_hvps = 0
        self._rng = rng_snapshot() if rng is None else rng
        with torch.no_grad():
            self._theta = [t.detach().clone() for t in self._shards]
            squares = torch.stack([torch.dot(t.reshape(-1), t.reshape(-1)) for t in self._theta])
        self._theta_norm = math.sqrt(max(0.0, float(self.space.all_sum(squares.sum())[0])))
        self._base = None if gradient is None else self._check_gradient(gradient)
        self._loss_value: float | None = None
        self._nonsmooth: list[str] | None = None
        self._closed = False

    # ------------------------------------------------------------------ operator interface

    @property
    def nonsmooth(self) -> list[str]:
        """The non-smooth submodules of the model (their kinks make difference quotients unreliable)."""
        if self._nonsmooth is None:
            self._nonsmooth = nonsmooth_modules(self._model)
        return self._nonsmooth

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for this rank's entries ``v`` of a vector (one product: two gradients central, one forward)."""
        self._check_live()
        if not isinstance(v, torch.Tensor) or v.shape != (self.dim,):
            raise ValueError(f"v must be this rank's flat shard of length dim={self.dim}, got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}.")
        v = v.detach().to(device=self.device, dtype=self.dtype)
        norm = self.space.norm(v)
        self.num_hvps += 1
        if norm == 0.0:
            return torch.zeros_like(v)
        eps = self.fd_rel_eps * max(self._theta_norm, 1.0) / norm
        if self.scheme == "central":
            plus = self._gradient_at(v, eps)
            minus = self._gradient_at(v, -eps)
            return plus.sub_(minus).div_(2.0 * eps)
        base = self._base if self._base is not None else self._gradient_and_loss()
        return self._gradient_at(v, eps).sub_(base).div_(eps)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` column by column for ``V`` of shape ``[dim, b]``."""
        cols = [self.matvec(V[:, j].contiguous()) for j in range(V.shape[1])]
        return torch.stack(cols, dim=1) if cols else V.new_zeros(self.dim, 0)

    __matmul__ = matmat

    def gradient(self) -> torch.Tensor:
        """This rank's entries of ``∇L(θ)`` (the rank mean), computed once if it was not given."""
        self._check_live()
        return (self._base if self._base is not None else self._gradient_and_loss()).clone()

    def loss(self) -> torch.Tensor:
        """The loss ``L(θ)`` averaged over the ranks (one gradient pass if not computed yet)."""
        self._check_live()
        if self._loss_value is None:
            self._gradient_and_loss()
        return torch.tensor(self._loss_value, dtype=self.dtype)

    def close(self) -> None:
        """Release the saved shards and gradients; later products raise ``RuntimeError``."""
        self._closed = True
        self._theta = self._base = self._batch = None

    def __enter__(self) -> ShardedHessian:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dim={self.dim}, global_dim={self.global_dim}, scheme={self.scheme!r}, "
                f"dtype={self.dtype}, num_hvps={self.num_hvps})")

    # ------------------------------------------------------------------ internals

    def _check_live(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} was closed; build a new one to compute more products.")

    def _check_gradient(self, gradient: Any) -> torch.Tensor:
        pieces = [None if g is None else local_tensor(g) for g in gradient]
        if len(pieces) != len(self._shards) or any(
            g is not None and g.shape != s for g, s in zip(pieces, self._shapes)
        ):
            raise ValueError("gradient must hold one tensor per trainable parameter (its .grad), in their order.")
        return torch.cat([
            (torch.zeros(n, dtype=self.dtype, device=self.device) if g is None else g.detach().reshape(-1).to(self.dtype))
            for g, n in zip(pieces, self._numels)
        ])

    def _gradient_and_loss(self) -> torch.Tensor:
        """``∇L(θ)`` (kept as the base of forward differences) and the rank-mean loss."""
        self._base = self._gradient_at(None, 0.0)
        return self._base

    @contextlib.contextmanager
    def _restored(self) -> Iterator[None]:
        """Leave shards, ``.grad``, buffers, modes and RNG as they were, whatever the body did."""
        grads = [p.grad for p in self._params]
        buffers = [(b, b.detach().clone()) for b in self._model.buffers()]
        try:
            with torch.random.fork_rng(devices=[]), preserved_modes(self._model):
                restore_rng(self._rng)
                yield
        finally:
            with torch.no_grad():
                for shard, theta in zip(self._shards, self._theta):
                    shard.copy_(theta)
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in zip(self._params, grads):
                p.grad = g

    def _gradient_at(self, v: torch.Tensor | None, eps: float) -> torch.Tensor:
        """This rank's entries of ``∇L(θ + εv)`` (the strategy's rank mean) as a new flat vector."""
        out = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        with self._restored():
            if v is not None:
                with torch.no_grad():
                    for shard, piece in zip(self._shards, torch.split(v, self._numels)):
                        shard.add_(piece.view(shard.shape), alpha=eps)
            for p in self._params:
                p.grad = None
            with torch.enable_grad(), torch.autocast(device_type=self.device.type, enabled=False):
                loss = self._loss_fn(self._model, self._batch)
                loss.backward()
            offset = 0
            for p, n in zip(self._params, self._numels):
                piece = out[offset : offset + n]
                if p.grad is None:
                    piece.zero_()
                else:
                    piece.copy_(local_tensor(p.grad).reshape(-1))
                offset += n
            if v is None:
                self._loss_value = float(self.space.all_sum(loss.detach())[0]) / torch.distributed.get_world_size(
                    self.process_group
                )
        return out
