"""Lightning glue shared by the curvature callbacks: loss resolution, the step's micro-batches and loss, the probe
batch, the measurement operator, the learning rate, and step-accurate logging (setup checks: ``_setup.py``).

Nothing here does curvature maths: that lives in the pure-PyTorch core (``hessian.py``, ``eigen.py``,
``tangent.py``). These helpers only translate between a running :class:`lightning.pytorch.Trainer` and the core's
``loss_fn(model, batch)`` / flat-vector interface, without changing what the trainer does next.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

import lightning.pytorch as pl

from lyapunov_callbacks.core.distributed import is_distributed
from lyapunov_callbacks.core.hessian import HessianOperator, backend_class, trainable_parameters
from lyapunov_callbacks.core.sharded import ShardedHessian, is_sharded
from lyapunov_callbacks.core.state import preserved_state, restore_rng, rng_snapshot
from lyapunov_callbacks.callbacks.tensorboard_layout import log_reference_levels
from lyapunov_callbacks.callbacks._setup import compiled_training_step

__all__ = [
    "BATCHES",
    "MeanLoss",
    "ProbeBatch",
    "StepLoss",
    "StepMicroBatches",
    "check_choice",
    "check_int",
    "check_positive",
    "current_lr",
    "finite_or_nan",
    "is_number",
    "log_measurements",
    "measurement_guard",
    "measurement_operator",
    "resolve_dtype",
    "resolve_loss_fn",
    "set_lr",
    "step_loss",
    "training_gradient",
    "training_graph_parameters",
    "world_info",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]

#: Where the curvature callbacks take the batch they measure on (see ``ProbeBatch``).
BATCHES = ("current", "fixed")


# --------------------------------------------------------------------------------------------------------------
# Argument checks shared by the callbacks' constructors: one ValueError that names the parameter and the fix
# --------------------------------------------------------------------------------------------------------------
# The generic checks live in the core's `_checks` module (one exception type per kind of mistake, each a
# ValueError); imported here under their established names.
from lyapunov_callbacks.core.checks import (  # noqa: E402
    check_choice, check_int, check_positive, finite_or_nan, is_number,
)


_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
           torch.float64: torch.float64}


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    """The estimate's dtype from ``None`` / ``"float32"`` / ``"float64"`` / the torch dtypes (yaml gives strings)."""
    if dtype not in _DTYPES:
        raise ValueError(f"`dtype` must be None, 'float32' or 'float64', got {dtype!r}.")
    return _DTYPES[dtype]


# --------------------------------------------------------------------------------------------------------------
# Loss resolution
# --------------------------------------------------------------------------------------------------------------
def _noop_log(*args: Any, **kwargs: Any) -> None:
    """Stand-in for ``LightningModule.log``/``log_dict`` while the fallback loss runs ``training_step``."""


@contextlib.contextmanager
def _logging_silenced(module: nn.Module) -> Iterator[None]:
    """Shadow the instance's ``log`` and ``log_dict`` with no-ops, restoring the original attributes after.

    Instance attributes shadow the class methods; if the instance already had its own ``log`` attribute it is
    put back, otherwise the shadow is deleted so the class method shows through again.
    """
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    object.__setattr__(module, "log", _noop_log)
    object.__setattr__(module, "log_dict", _noop_log)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                object.__setattr__(module, name, saved[name])
            else:
                module.__dict__.pop(name, None)


def _loss_from_training_step(model: nn.Module, batch: Any) -> torch.Tensor:
    """The fallback loss: ``model.training_step(batch, 0)`` with logging silenced.

    Raises:
        TypeError: if ``training_step`` returns ``None`` or neither a tensor nor a mapping with a ``"loss"``
            tensor (the loss of an automatic-optimisation step must be one of those two).
    """
    with _logging_silenced(model):
        out = model.training_step(batch, 0)
    if isinstance(out, torch.Tensor):
        loss = out
    elif isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        loss = out["loss"]
    else:
        raise TypeError(
            f"{type(model).__name__}.training_step(batch, 0) returned {type(out).__name__}; the curvature "
            "callbacks need the scalar training loss. Return the loss tensor (or a dict with a 'loss' tensor) "
            "from training_step, or better, define `training_loss(self, batch) -> Tensor` on the module."
        )
    if loss.dim() != 0:
        raise TypeError(
            f"{type(model).__name__}.training_step returned a loss of shape {tuple(loss.shape)}; a scalar "
            "(mean-reduced) loss is required."
        )
    return loss


def _loss_from_training_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The documented hook: ``model.training_loss(batch)``."""
    return model.training_loss(batch)


def resolve_loss_fn(pl_module: nn.Module) -> LossFn:
    """The ``loss_fn(model, batch) -> Tensor`` the core differentiates, for this LightningModule.

    When the module defines ``training_loss(self, batch) -> Tensor`` (the documented hook: the scalar,
    mean-reduced training loss with no logging and no metric updates) that is used. Otherwise the fallback
    calls ``training_step(batch, 0)`` with the instance's ``log``/``log_dict`` temporarily replaced by no-ops
    (so measurement never writes to the logger or to ``callback_metrics``) and takes the loss from a tensor
    return or ``dict["loss"]``. The fallback still runs whatever else ``training_step`` does (e.g. metric
    updates); define ``training_loss`` to avoid that.

    Args:
        pl_module: the module being trained.

    Returns:
        A function ``loss_fn(model, batch)`` that takes the model explicitly (the core may call it on the same
        module under ``torch.func.functional_call``).
    """
    if callable(getattr(pl_module, "training_loss", None)):
        return _loss_from_training_loss
    return _loss_from_training_step


# --------------------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------------------
def world_info(trainer: pl.Trainer) -> tuple[int, int]:
    """``(global_rank, world_size)`` of this process (``(0, 1)`` outside distributed training)."""
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


@contextlib.contextmanager
def _all_rng_preserved(devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and the given CUDA devices) RNG streams on exit."""
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        np = None
        np_state = None
    cuda_devices = [d for d in devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda_devices, enabled=True):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


# --------------------------------------------------------------------------------------------------------------
# The step being measured: its micro-batches, its loss and its Hessian operator
# --------------------------------------------------------------------------------------------------------------
class StepMicroBatches:
    """The micro-batches of the optimiser step being trained, each with the RNG state right before its forward.

    A callback that measures the Hessian of the loss an optimiser step optimises adds every micro-batch in
    ``on_train_batch_start`` and takes them in ``on_before_optimizer_step``, where the replayed RNG states give
    the HVPs the training forward's dropout masks (with ``accumulate_grad_batches = k`` there are k of them).
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.batches: list[tuple[Any, dict]] = []
        self.step: int | None = None

    def add(self, step: int, batch: Any) -> bool:
        """Record ``batch`` of optimiser step ``step``; True when it is the first micro-batch of that step."""
        first = self.step != step
        if first:
            self.batches, self.step = [], step
        self.batches.append((batch, rng_snapshot()))
        return first

    def take(self, step: int) -> list[tuple[Any, dict]] | None:
        """The ``(batch, rng)`` pairs of ``step`` (then forgotten), or None when none were recorded for it."""
        if not self.batches or self.step != step:
            return None
        batches, self.batches = self.batches, []
        return batches


class StepLoss:
    """The training loss of one optimiser step, from the losses Lightning passes to ``on_before_backward``.

    Lightning passes each micro-batch loss divided by ``accumulate_grad_batches``, so their sum is the mean loss
    the step optimises; :meth:`take` returns it as a float (the all-rank mean under DDP, so every rank decides
    alike) and forgets it.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._sum: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        self._sum = value if self._sum is None else self._sum + value

    def take(self, trainer: pl.Trainer) -> float | None:
        total, self._sum = self._sum, None
        if total is None:
            return None
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="mean")
        return float(total)


class MeanLoss:
    """``loss_fn`` averaged over the micro-batches of one accumulated optimiser step.

    With ``accumulate_grad_batches = k`` Lightning scales each micro-batch loss by ``1/k`` and sums the
    gradients, so the step optimises ``(1/k)·Σ_i L(θ; B_i)``; this is that loss, with ``batch`` the list of the
    ``k`` micro-batches. ``rngs`` (one :func:`~lyapunov_callbacks.core.state.rng_snapshot` per micro-batch, taken
    before its training forward) are replayed before each term, so dropout draws the training step's masks.
    """

    def __init__(self, loss_fn: LossFn, rngs: Sequence[dict] | None = None) -> None:
        self.loss_fn = loss_fn
        self.rngs = None if rngs is None else list(rngs)

    def __call__(self, model: nn.Module, batches: Sequence[Any]) -> torch.Tensor:
        total = None
        for i, batch in enumerate(batches):
            if self.rngs is not None:
                restore_rng(self.rngs[i])
            loss = self.loss_fn(model, batch)
            total = loss if total is None else total + loss
        return total / len(batches)


def step_loss(loss_fn: LossFn, micro: Sequence[tuple[Any, dict]]) -> tuple[LossFn, Any, dict]:
    """``(loss_fn, batch, rng)`` of the loss a step optimises, from its ``(batch, rng)`` micro-batches.

    One micro-batch: the loss itself on it. ``accumulate_grad_batches = k``: :class:`MeanLoss`, the mean of the
    ``k`` micro-batch losses, each with the RNG (dropout masks) of its training forward. ``rng`` is the state to
    restore before building the operator (the first micro-batch's).
    """
    if len(micro) == 1:
        return loss_fn, micro[0][0], micro[0][1]
    return MeanLoss(loss_fn, [r for _, r in micro]), [b for b, _ in micro], micro[0][1]


def measurement_operator(
    pl_module: nn.Module, loss_fn: LossFn, batch: Any, rng: dict, hvp: str, dtype: torch.dtype | None,
    **backend_options: Any,
) -> HessianOperator | ShardedHessian:
    """The Hessian operator of ``loss_fn(pl_module, batch)`` at the current weights, for use inside one hook.

    ``rng`` is restored before the operator is built (it captures the RNG: the training forward's dropout masks)
    and the caller's RNG after. ``snapshot=False``: the operator lives only inside the hook, where nothing writes
    the parameters. ``backend_options`` go to the backend (e.g. ``gradient=`` for finite differences).

    A sharded module (FSDP2) gets a :class:`~lyapunov_callbacks.core.sharded.ShardedHessian` instead, whatever
    ``hvp`` says (central differences of the strategy's gradients; :func:`check_sharding` said so at fit start);
    a given ``gradient=`` is passed on, ``dtype`` is the parameters' own.
    """
    if is_sharded(pl_module):
        return ShardedHessian(pl_module, loss_fn, batch, rng=rng, gradient=backend_options.get("gradient"))
    current = rng_snapshot()
    try:
        restore_rng(rng)
        with torch.enable_grad():
            return HessianOperator(pl_module, loss_fn, batch, backend=hvp, dtype=dtype, snapshot=False,
                                   **backend_options)
    finally:
        restore_rng(current)


def measurement_guard(pl_module: nn.Module) -> contextlib.AbstractContextManager:
    """The guard around a measurement: :func:`~lyapunov_callbacks.core.state.preserved_state` without copies (the
    operators never write the module's tensors; it restores modes, RNG and ``.grad`` references and fails loudly on
    an in-place write). A sharded module's operator perturbs the shards in place and restores them, ``.grad``,
    buffers, modes and RNG itself after every gradient, so nothing more is needed there."""
    if is_sharded(pl_module):
        return contextlib.nullcontext()
    return preserved_state(pl_module, copy_tensors=False)


# --------------------------------------------------------------------------------------------------------------
# The fixed probe batch
# --------------------------------------------------------------------------------------------------------------
class ProbeBatch:
    """A fixed batch drawn once from the training set, for measurements comparable across steps.

    The indices are ``probe_size`` draws without replacement from ``range(len(dataset))`` made with a private
    ``torch.Generator`` seeded by ``seed``: the dataset is indexed directly and the training dataloader is never
    iterated (iterating would consume the global RNG and change every later shuffle). Sample transforms run
    inside a block that restores the Python/NumPy/torch RNG streams and seeds torch with ``seed``, so random
    augmentations are reproducible and invisible to training. The samples are collated with the loader's own
    ``collate_fn`` and moved to the device through ``trainer.strategy.batch_to_device`` (which runs the
    module's ``transfer_batch_to_device``/``on_after_batch_transfer`` hooks).

    Under distributed training each rank takes its shard ``indices[rank::world_size]``; with a DDP-averaged
    Hessian the measured operator is then the Hessian of the mean of the per-rank mean losses, which is the
    mean loss on the union when the shards have equal sizes (choose ``probe_size`` divisible by the world size).

    Args:
        size: number of samples in the (union) probe batch; capped at the dataset length.
        seed: seed of the private generator that picks the indices.

    Raises:
        ValueError: if ``size < 1``.
        RuntimeError: from :meth:`get` if the trainer has no single map-style training dataloader.
    """

    def __init__(self, size: int = 256, seed: int = 0) -> None:
        check_int("probe_size", size, "probe_size=256")
        self.size = size
        self.seed = int(seed)
        self.indices: list[int] | None = None
        self._batch: Any = None

    @staticmethod
    def _train_loader(trainer: pl.Trainer) -> torch.utils.data.DataLoader:
        loader = trainer.train_dataloader
        if loader is None:
            # The fit loop creates the loader in its run start; make sure it exists (no iteration happens).
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple)) and len(loader) == 1:
            loader = loader[0]
        if isinstance(loader, dict) and len(loader) == 1:
            loader = next(iter(loader.values()))
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise RuntimeError(
                f"batch='fixed' needs a single training DataLoader, got {type(loader).__name__}; use "
                "batch='current' with several training dataloaders."
            )
        dataset = loader.dataset
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise RuntimeError(
                "batch='fixed' draws the probe batch by index and needs a map-style training dataset (with "
                "__getitem__ and __len__); use batch='current' with an IterableDataset."
            )
        return loader

    def get(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The probe batch on this rank's device (drawn and collated on the first call, cached after)."""
        if self._batch is None:
            loader = self._train_loader(trainer)
            dataset = loader.dataset
            if self.indices is None:
                generator = torch.Generator().manual_seed(self.seed)
                perm = torch.randperm(len(dataset), generator=generator)
                self.indices = perm[: min(self.size, len(dataset))].tolist()
            rank, world_size = world_info(trainer)
            shard = self.indices[rank::world_size]
            if not shard:
                raise RuntimeError(
                    f"probe_size={len(self.indices)} leaves rank {rank} of {world_size} without samples; "
                    f"use probe_size >= {world_size}."
                )
            collate = loader.collate_fn
            if collate is None:  # batch_size=None loaders have no collate; use the default one
                collate = torch.utils.data.default_collate
            with _all_rng_preserved([pl_module.device]):
                # CPU generator only: torch.manual_seed would also reseed every CUDA device.
                torch.random.default_generator.manual_seed(self.seed)
                batch = collate([dataset[i] for i in shard])
            self._batch = trainer.strategy.batch_to_device(batch, pl_module.device)
        return self._batch

    def state_dict(self) -> dict[str, Any]:
        """The drawn indices (``None`` until the first draw)."""
        return {"indices": None if self.indices is None else list(self.indices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the indices; the batch is re-collated from them on the next :meth:`get`."""
        indices = state.get("indices")
        self.indices = None if indices is None else [int(i) for i in indices]
        self._batch = None


# --------------------------------------------------------------------------------------------------------------
# The learning rate, and what the training step already computed
# --------------------------------------------------------------------------------------------------------------
def current_lr(trainer: pl.Trainer) -> float:
    """The learning rate α of the first parameter group of the first optimiser (read it in ``on_before_optimizer_step``).

    This is the step size the curvature callbacks compare with (``stability = α·h0``) and the α of the
    linearised update ``θ ← θ − α∇L``. Callbacks that set the LR (``QuasiNewtonLR``, schedulers) act before
    ``on_before_optimizer_step``, so read it there for the LR of the step about to be taken.
    """
    if not trainer.optimizers:
        raise RuntimeError("The trainer has no optimiser yet; the learning rate is read once fitting started.")
    return float(trainer.optimizers[0].param_groups[0]["lr"])


def set_lr(trainer: pl.Trainer, lr: float, ratios: Sequence[float]) -> None:
    """Give every optimiser's first param group ``lr`` and each other group ``lr`` times its configured ratio
    (``ratios``, one per group; groups of another count get ``lr`` itself)."""
    for optimizer in trainer.optimizers:
        groups = optimizer.param_groups
        group_ratios = ratios if len(ratios) == len(groups) else [1.0] * len(groups)
        for group, ratio in zip(groups, group_ratios):
            group["lr"] = lr * ratio


def training_graph_parameters(
    trainer: pl.Trainer, pl_module: pl.LightningModule, hvp: str, tangent: Any, owner: str
) -> list[torch.Tensor] | None:
    """The trainable parameters when products can be taken on the training step's graph, else ``None``.

    That needs a backend whose product is the graph's double backward, full precision, one process (under DDP
    the product must be averaged over ranks and the graph belongs to DDP's reducer), an eager training step, a
    ``tangent`` in the parameters' dtype and device, and no hook on a parameter's gradient (it would run during
    the extra passes).
    """
    if not backend_class(hvp).graph_product:
        return None
    if trainer.precision not in ("32-true", "64-true") or trainer.world_size > 1 or is_distributed():
        return None
    if compiled_training_step(pl_module, owner):
        return None
    params = [p for _, p in trainable_parameters(pl_module)]
    if any(
        p.dtype != tangent.dtype or p.device != tangent.delta_theta.device or getattr(p, "_backward_hooks", None)
        for p in params
    ):
        return None
    return params


def training_gradient(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[torch.Tensor] | None:
    """∇L(θ) of this step as the training backward left it in ``.grad``, when it is exactly that gradient.

    In ``on_before_optimizer_step`` ``.grad`` holds the gradient of this step's loss (with accumulation, of the
    mean micro-batch loss) at the pre-step weights with this step's dropout masks, already averaged over DDP
    ranks and not yet clipped. Under mixed precision it was computed under autocast, not in the operator's
    precision, so it is not reused there. Returned as the per-parameter tensors themselves (the operator reads
    them piece by piece and never writes them): no flat copy.
    """
    if trainer.precision not in ("32-true", "64-true"):
        return None
    grads = [p.grad for p in pl_module.parameters() if p.requires_grad]
    if any(g is None for g in grads):
        return None
    return [g.detach() for g in grads]


# --------------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------------
def log_measurements(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    metrics: dict[str, float],
    step: int,
    prog_bar: Sequence[str] = (),
) -> None:
    """Publish measured values: to ``trainer.callback_metrics`` on every rank and to every logger at ``step``.

    The values are written straight into the dictionaries behind ``trainer.callback_metrics`` (as 0-dim CPU
    tensors, what ``LightningModule.log`` leaves there) and, for the ``prog_bar`` tags, ``trainer.progress_bar_metrics``
    (as floats): what ``pl_module.log(..., on_step=True, logger=False, sync_dist=False)`` would do, without its
    result-collection bookkeeping, which costs about 0.7 ms per value on a CPU (on a small model, where an
    estimate takes ~20 ms, five such calls were a fifth of a monitor's cost). No sync is needed: the values
    are identical on every rank. ``ModelCheckpoint(monitor=...)``, ``EarlyStopping`` and the progress bar read
    those dictionaries. Should a Lightning version return a copy instead (the public properties return the
    dictionaries themselves in Lightning 2.x), ``pl_module.log`` is used. The loggers are written directly with
    ``logger.log_metrics(metrics, step=step)`` on global rank zero, because Lightning only flushes step metrics
    every ``log_every_n_steps`` and a measurement at another step would be lost.

    Args:
        trainer: the trainer.
        pl_module: the module (its ``log`` is the fallback for ``callback_metrics``).
        metrics: tag → value; non-finite values are published as they are.
        step: the step the values were measured at (``trainer.global_step`` at measurement time).
        prog_bar: tags also shown in the progress bar (the callbacks' opt-in ``prog_bar=True``).

    Beside a stability ratio or a λ value the ``TensorBoardLogger`` s also get the dashboard's constant reference
    levels (:func:`~lyapunov_callbacks.callbacks.tensorboard_layout.log_reference_levels`); nothing else does.
    """
    values = {name: float(value) for name, value in metrics.items()}
    callback_metrics = trainer.callback_metrics
    pbar_metrics = trainer.progress_bar_metrics if prog_bar else {}
    direct = (
        isinstance(callback_metrics, dict)
        and callback_metrics is trainer.callback_metrics
        and (not prog_bar or pbar_metrics is trainer.progress_bar_metrics)
    )
    if direct:
        for name, value in values.items():
            callback_metrics[name] = torch.tensor(value)
            if name in prog_bar:
                pbar_metrics[name] = value
    else:
        for name, value in values.items():
            pl_module.log(
                name, value, on_step=True, on_epoch=False, logger=False, sync_dist=False, prog_bar=name in prog_bar
            )
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
    log_reference_levels(trainer, values, step)

