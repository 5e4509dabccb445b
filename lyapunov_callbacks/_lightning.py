"""Lightning glue shared by the curvature callbacks: loss resolution, the probe batch, warm-started eigen
estimates, setup checks and step-accurate logging.

Nothing here does curvature maths: that lives in the pure-PyTorch core (``hessian.py``, ``eigen.py``,
``tangent.py``). These helpers only translate between a running :class:`lightning.pytorch.Trainer` and the core's
``loss_fn(model, batch)`` / flat-vector interface, without changing what the trainer does next.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lyapunov_callbacks._state import rng_snapshot
from lyapunov_callbacks.compiled import check_compiled, compiled_modules
from lyapunov_callbacks.eigen import EigenResult, check_gap_safety, top_hessian_eigenvalues

__all__ = [
    "BATCHES",
    "FAST_DEV_RUN_HVPS",
    "EigenTracker",
    "MeanLoss",
    "ProbeBatch",
    "check_choice",
    "check_int",
    "check_positive",
    "check_prefix",
    "check_supported",
    "compiled_training_step",
    "current_lr",
    "fast_dev_run_budget",
    "finite_or_nan",
    "is_number",
    "log_measurements",
    "resolve_dtype",
    "resolve_loss_fn",
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
from lyapunov_callbacks._checks import check_choice, check_int, check_positive, is_number  # noqa: E402


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
# The fixed probe batch
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
# Warm-started eigenvalue estimates
# --------------------------------------------------------------------------------------------------------------
class EigenTracker:
    """Top-``k`` Hessian eigenpairs, re-estimated at each measurement from the previous eigenvectors.

    Each :meth:`estimate` is a :func:`lyapunov_callbacks.eigen.top_hessian_eigenvalues` call in the requested
    ``dtype`` with ``init`` set to the eigenvectors of the last good estimate (a warm start: the top eigenvector
    turns slowly during training, so a few matrix-vector products suffice where a cold start needs tens). Estimates with a non-finite
    eigenvalue or eigenvector are returned but never become the warm start.

    Args:
        method: eigen-solver: ``"lanczos"``, ``"power"`` or ``"lyapunov"`` (as in ``top_hessian_eigenvalues``).
        hvp: Hessian-vector-product backend (``"autograd"`` or ``"finite_difference"``).
        k: number of top eigenvalues.
        tol: relative convergence tolerance of the solver.
        max_iter: iteration cap of the solver.
        seed: seed of the solver's random start vector (used while there is no warm start).
        warm_start: reuse the last eigenvectors as ``init``.
        dtype: dtype of the estimate (``None``: the parameters' dtype, float32 under mixed precision).
        stop: stopping rule of ``method="lanczos"`` once warm-started: ``"gap"`` (default: the rigorous residual
            bound or the error estimate ``residual²/gap`` with a 10× safety factor, see
            :func:`lyapunov_callbacks.eigen.lanczos`; fewer HVPs on a moving mini-batch Hessian) or
            ``"residual"``. The first (cold) estimate always uses the residual rule: from a random start the
            second Ritz value is far from h1, so the gap it shows means little.
        gap_safety: safety factor of the gap rule (default 10, see :func:`lyapunov_callbacks.eigen.lanczos`).
        two_vector_start: ``k = 1`` with ``method="lanczos"``: keep the last estimate's top two Ritz vectors
            ``y0, y1`` and start the next solve from the top Ritz vector of their span (``start="rayleigh_ritz"``
            of :func:`~lyapunov_callbacks.eigen.lanczos`: one HVP more than a start from ``y0``; default False:
            ``y0`` alone). When h0 and h1 swap between two estimates, the new top eigenvector lies near ``y1``;
            from ``y0`` alone the Krylov space can miss it for many products and the solve stops on h1. A
            fixed combination ``y0 + 0.3·y1`` put the direction in the start but could cancel it, the signs
            of ``y0`` and ``y1`` being arbitrary: at one step of the README MLP in
            ``benchmarks/monitor_overhead.py`` the solve from it stopped on h1, 7.1e-2 low
            (``tests/test_gap_stopping.py`` builds an exactly cancelling case).
    """

    def __init__(
        self,
        method: str = "lanczos",
        hvp: str = "autograd",
        k: int = 1,
        tol: float = 1e-3,
        max_iter: int = 100,
        seed: int = 0,
        warm_start: bool = True,
        dtype: torch.dtype | None = None,
        stop: str = "gap",
        gap_safety: float = 10.0,
        two_vector_start: bool = False,
    ) -> None:
        check_choice("stop", stop, ("residual", "gap"))
        if not isinstance(two_vector_start, bool):
            raise ValueError(f"`two_vector_start` must be True or False, got {two_vector_start!r}.")
        check_gap_safety(gap_safety)
        self.stop = stop
        self.gap_safety = float(gap_safety)
        self.two_vector_start = two_vector_start
        # The last estimate's top two Ritz vectors [dim, 2] (``two_vector_start``): the next warm start.
        self.start_basis: torch.Tensor | None = None
        self.method = method
        self.hvp = hvp
        self.k = k
        self.tol = tol
        self.max_iter = max_iter
        self.seed = seed
        self.warm_start = warm_start
        self.dtype = dtype
        self.eigenvectors: torch.Tensor | None = None
        self.eigenvalues: torch.Tensor | None = None
        self.num_estimates = 0
        self.total_hvps = 0

    def estimate(
        self, model: nn.Module, loss_fn: LossFn, batch: Any, alpha: float | None = None
    ) -> EigenResult:
        """One (warm-started) estimate of the top-``k`` eigenpairs of the Hessian of ``loss_fn(model, batch)``.

        Args:
            model: the module (its current weights are the linearisation point; nothing is changed).
            loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
            batch: the batch the loss is evaluated on.
            alpha: step of the ascent map of ``method="lyapunov"`` (``None``: the solver's automatic, well-scaled
                choice ≈ 1/h0 from a warm start); ignored by the other methods.
        """
        init = self.start_vectors()
        stop = self.stop if (self.method == "lanczos" and init is not None) else "residual"
        with torch.enable_grad():
            result = top_hessian_eigenvalues(
                model, loss_fn, batch, k=self.k, method=self.method, hvp=self.hvp, tol=self.tol,
                max_iter=self.max_iter, init=init, seed=self.seed, dtype=self.dtype,
                alpha=alpha if self.method == "lyapunov" else None, stop=stop, gap_safety=self.gap_safety,
                ritz_vectors=2 if self._mixed_start else 0,
                start="rayleigh_ritz" if self._mixed_start else "first",
            )
        self.num_estimates += 1
        self.total_hvps += int(result.num_hvps)
        # The eigenvectors have unit columns, so their sum (|sum| <= k·sqrt(dim), no overflow) is finite
        # exactly when every entry is: one reduction instead of an element-wise mask of dim·k entries.
        if bool(torch.isfinite(result.eigenvalues).all()) and math.isfinite(float(result.eigenvectors.sum())):
            self.eigenvalues = result.eigenvalues.detach().clone()
            if self._mixed_start:
                # The solver's fresh Ritz rows are kept as they are (a copy would be one more pass and a fresh
                # allocation of 2·dim): the returned result's vectors are then views of the next warm start,
                # which callers read but never write.
                if result.ritz_vectors is not None:
                    self.start_basis = result.ritz_vectors.detach()
                else:
                    self.start_basis = result.eigenvectors.detach().clone()
                # The top Ritz vectors lead the basis: a view of it, not a second (strided) copy.
                self.eigenvectors = self.start_basis[:, : self.k]
            else:
                self.eigenvectors = result.eigenvectors.detach().clone()
        else:
            rank_zero_warn(
                "Non-finite Hessian eigenvalue estimate; keeping the previous eigenvectors as warm start.",
                category=RuntimeWarning,
            )
        return result

    @property
    def _mixed_start(self) -> bool:
        """Whether warm starts use the last two Ritz vectors (``k = 1``, Lanczos, ``two_vector_start``)."""
        return self.method == "lanczos" and self.k == 1 and self.two_vector_start

    def start_vectors(self) -> torch.Tensor | None:
        """The ``init`` of the next estimate: ``None`` (cold), the last eigenvectors, or ``[y0, y1]`` (the
        last top two Ritz vectors, ``two_vector_start``; the solve starts from the top Ritz vector of their span)."""
        if not self.warm_start or self.eigenvectors is None:
            return None
        basis = self.start_basis
        if self._mixed_start and basis is not None and basis.shape[1] > 1:
            return basis
        return self.eigenvectors

    def state_dict(self) -> dict[str, Any]:
        """Warm-start vectors/values (on CPU) and counters."""
        return {
            "eigenvectors": None if self.eigenvectors is None else self.eigenvectors.detach().cpu().clone(),
            "eigenvalues": None if self.eigenvalues is None else self.eigenvalues.detach().cpu().clone(),
            "start_basis": None if self.start_basis is None else self.start_basis.detach().cpu().clone(),
            "num_estimates": self.num_estimates,
            "total_hvps": self.total_hvps,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restore :meth:`state_dict`; tensors go to ``device`` (the module's device) when given."""
        vecs = state.get("eigenvectors")
        vals = state.get("eigenvalues")
        self.eigenvectors = None if vecs is None else vecs.to(device) if device is not None else vecs.clone()
        self.eigenvalues = None if vals is None else vals.to(device) if device is not None else vals.clone()
        basis = state.get("start_basis")
        self.start_basis = None if basis is None else basis.to(device) if device is not None else basis.clone()
        self.num_estimates = int(state.get("num_estimates", 0))
        self.total_hvps = int(state.get("total_hvps", 0))


# --------------------------------------------------------------------------------------------------------------
# Optimiser / trainer checks
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


def check_supported(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    callback_name: str,
    *,
    single_optimizer: bool = True,
) -> None:
    """Raise one clear error for trainer settings a curvature callback cannot handle.

    Args:
        trainer: the trainer (call from ``setup``/``on_fit_start``; optimisers exist from ``on_fit_start``).
        pl_module: the module being trained.
        callback_name: used in the messages.
        single_optimizer: require exactly one optimiser (checked only once the optimisers exist).

    Raises:
        ValueError: on manual optimisation, several optimisers, or a ``torch.compile``d module or submodule on
            PyTorch < 2.6 (measured through its eager code from 2.6 on, see :mod:`lyapunov_callbacks.compiled`)
            — bad settings raise ``ValueError`` throughout the callbacks.
    """
    check_compiled(pl_module, callback_name)
    if not pl_module.automatic_optimization:
        raise ValueError(
            f"{callback_name} needs automatic optimisation (one optimiser step per training batch); the module "
            "sets automatic_optimization = False. Use automatic optimisation or measure in your own loop with "
            "the pure-PyTorch core (lyapunov_callbacks.top_hessian_eigenvalues)."
        )
    if single_optimizer and trainer.optimizers and len(trainer.optimizers) != 1:
        raise ValueError(
            f"{callback_name} supports exactly one optimiser, got {len(trainer.optimizers)}; return a single "
            "optimiser from configure_optimizers."
        )


def compiled_training_step(pl_module: pl.LightningModule, callback_name: str) -> bool:
    """Whether the training step runs ``torch.compile``'d code, telling the user (rank zero) once per call if so.

    A compiled step's autograd graph has no double backward, so a callback that would take Hessian-vector
    products on the training step's own graph evaluates the loss again through the module's eager code (the
    :class:`~lyapunov_callbacks.hessian.HessianOperator` path) instead. Call it once per fit (e.g. in
    ``on_train_start``).
    """
    compiled = compiled_modules(pl_module)
    if compiled:
        rank_zero_info(
            f"{callback_name}: the training step runs torch.compile'd code (compiled: {', '.join(compiled)}), whose "
            "graph has no double backward; the Hessian-vector products evaluate the loss again through the "
            "module's eager code (one more forward per product)."
        )
    return bool(compiled)


def check_prefix(prefix: Any) -> str:
    """Raise unless ``prefix`` is a non-empty string without a trailing ``/`` (tags are ``{prefix}/name``)."""
    if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
        raise ValueError(
            f"`prefix` must be a non-empty string without a trailing '/', got {prefix!r}; tags are logged as "
            "'{prefix}/name', e.g. prefix='hessian_probe'."
        )
    return prefix


#: HVP budget of one estimate under ``Trainer(fast_dev_run=...)``: enough to run every code path once, not to
#: converge (as Lightning's LearningRateFinder/BatchSizeFinder, which skip under fast_dev_run).
FAST_DEV_RUN_HVPS = 3


def fast_dev_run_budget(trainer: pl.Trainer, callback_name: str, what: str) -> bool:
    """``True`` under ``fast_dev_run``, after telling the user (rank zero) what ``callback_name`` cuts short."""
    if not getattr(trainer, "fast_dev_run", False):
        return False
    rank_zero_info(
        f"{callback_name}: `Trainer(fast_dev_run=...)` is set, so {what}; the logged values only show that the "
        "code path runs."
    )
    return True


class MeanLoss:
    """``loss_fn`` averaged over the micro-batches of one accumulated optimiser step.

    With ``accumulate_grad_batches = k`` Lightning scales each micro-batch loss by ``1/k`` and sums the
    gradients, so the step optimises ``(1/k)·Σ_i L(θ; B_i)``; this is that loss, with ``batch`` the list of the
    ``k`` micro-batches. ``rngs`` (one :func:`~lyapunov_callbacks._state.rng_snapshot` per micro-batch, taken
    before its training forward) are replayed before each term, so dropout draws the training step's masks.
    """

    def __init__(self, loss_fn: LossFn, rngs: Sequence[dict] | None = None) -> None:
        self.loss_fn = loss_fn
        self.rngs = None if rngs is None else list(rngs)

    def __call__(self, model: nn.Module, batches: Sequence[Any]) -> torch.Tensor:
        from lyapunov_callbacks._state import restore_rng

        total = None
        for i, batch in enumerate(batches):
            if self.rngs is not None:
                restore_rng(self.rngs[i])
            loss = self.loss_fn(model, batch)
            total = loss if total is None else total + loss
        return total / len(batches)


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


def finite_or_nan(value: float) -> float:
    """``value`` if finite, else NaN (a non-finite estimate is logged as NaN, not as ±inf)."""
    return value if math.isfinite(value) else float("nan")
