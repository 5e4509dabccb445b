"""Setup checks of the curvature callbacks: what a fit must offer before anything is measured.

Each check runs in ``setup`` or ``on_fit_start`` and raises one ``ValueError`` (or :class:`ShardingError`) that names
the setting and the fix, so a bad configuration fails before training, never deep in a loop; the notices a
callback gives once per fit (``fast_dev_run``, a compiled step, sharded products) live here too, as do the two
orderings ``QuasiNewtonLR`` needs (run first; hold ``LearningRateMonitor`` until the step's LR is set).
Imports Lightning and the core.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lyapunov_callbacks.core.compiled import check_compiled, compiled_modules
from lyapunov_callbacks.core.sharded import ShardingError, shard_group

__all__ = [
    "FAST_DEV_RUN_HVPS",
    "HeldLearningRateMonitors",
    "check_lr_owner",
    "check_optimizer_holds_parameters",
    "check_prefix",
    "check_sharding",
    "check_supported",
    "check_tag_owners",
    "compiled_training_step",
    "fast_dev_run_budget",
    "run_first",
]

_SHARDED_HVP_WARNED: set[str] = set()


def check_sharding(
    trainer: pl.Trainer, pl_module: nn.Module, callback_name: str, *, hvp: str = "autograd",
    method: str = "lanczos", dtype: torch.dtype | None = None,
) -> bool:
    """Whether the module is sharded (FSDP2); refuse at fit start what cannot be measured on its shards.

    Raises ``ValueError`` (:class:`~lyapunov_callbacks.core.sharded.ShardingError`) for Lightning's ``FSDPStrategy``
    (FSDP1), tensor parallelism or another layout than FSDP2's, a ``method`` other than Lanczos, or a ``dtype``
    other than the parameters' own. ``hvp="autograd"`` (the default) switches to central finite differences of the
    strategy's gradients, said once per callback type.
    """
    strategy = type(getattr(trainer, "strategy", None)).__name__
    if strategy == "FSDPStrategy":
        raise ShardingError(
            f"{callback_name} does not measure under Lightning's FSDPStrategy (FSDP1: flat parameters that autograd "
            "cannot follow). Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) and "
            "torch.distributed.fsdp.fully_shard in configure_model (FSDP2), which the curvature callbacks measure."
        )
    if shard_group(pl_module, callback_name) is None:
        return False
    if method != "lanczos":
        raise ShardingError(
            f"{callback_name}(method={method!r}) on sharded parameters (FSDP2): only method='lanczos' takes its inner "
            "products over the shards. Use method='lanczos' (the default)."
        )
    own = next(p for p in pl_module.parameters() if p.requires_grad).dtype
    if dtype is not None and dtype != own:
        raise ShardingError(
            f"{callback_name}(dtype={dtype}) on sharded parameters (FSDP2): products are differences of the "
            f"strategy's gradients, in the parameters' dtype ({own}). Use dtype=None."
        )
    if hvp == "autograd" and callback_name not in _SHARDED_HVP_WARNED:
        _SHARDED_HVP_WARNED.add(callback_name)
        rank_zero_warn(
            f"{callback_name}: the parameters are sharded (FSDP2), where double backward cannot reach the loss; "
            "Hessian-vector products are central finite differences of the strategy's own gradients instead of "
            "hvp='autograd' (exact on quadratic losses, O(eps^2) on smooth models; see docs/user-guide.md, "
            "'Sharded training')."
        )
    return True


# --------------------------------------------------------------------------------------------------------------
# Optimiser / trainer checks
# --------------------------------------------------------------------------------------------------------------
def run_first(trainer: pl.Trainer, callback: pl.Callback) -> None:
    """Run ``callback`` first, so every other callback (LR monitors, curvature monitors reading the LR in
    ``on_before_optimizer_step``) sees the LR the step really uses."""
    callbacks = trainer.callbacks
    if callback in callbacks and callbacks.index(callback) != 0:
        callbacks.remove(callback)
        callbacks.insert(0, callback)


class HeldLearningRateMonitors:
    """The trainer's ``LearningRateMonitor``s, made to log the LR each step used when another callback sets it.

    A ``LearningRateMonitor`` logs in ``on_train_epoch_start`` and ``on_train_batch_start``, before a callback
    that sets the LR in ``on_before_optimizer_step`` has done so (at the first step it would log the configured
    LR, which no step uses). :meth:`hold` shadows those two hooks on each monitor instance (the epoch-start one
    only notes that its log is due); :meth:`release`, called once the step's LR is set, runs the class's hooks,
    so each logged LR is the one the step used, at the step's index; :meth:`restore` (at teardown) lets the
    class's hooks show through again.
    """

    def __init__(self) -> None:
        self.monitors: list[LearningRateMonitor] = []
        self._epoch_due: list[LearningRateMonitor] = []

    def hold(self, trainer: pl.Trainer) -> None:
        self.monitors = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
        self._epoch_due = []
        for monitor in self.monitors:
            if monitor.logging_interval != "step":
                monitor.on_train_epoch_start = lambda *args, _m=monitor, **kwargs: self._epoch_due.append(_m)
            if monitor.logging_interval != "epoch":
                monitor.on_train_batch_start = _held_log

    def release(self, trainer: pl.Trainer) -> None:
        due, self._epoch_due = self._epoch_due, []
        for monitor in due:
            LearningRateMonitor.on_train_epoch_start(monitor, trainer)
        for monitor in self.monitors:
            if monitor.logging_interval != "epoch":
                LearningRateMonitor.on_train_batch_start(monitor, trainer)

    def restore(self) -> None:
        for monitor in self.monitors:
            for hook in ("on_train_epoch_start", "on_train_batch_start"):
                monitor.__dict__.pop(hook, None)  # the class's hook shows through again


def _held_log(*args: Any, **kwargs: Any) -> None:
    """A held LearningRateMonitor's ``on_train_batch_start``: its log comes from :meth:`HeldLearningRateMonitors.release`."""


def check_lr_owner(trainer: pl.Trainer) -> torch.optim.Optimizer:
    """The one optimiser, if QuasiNewtonLR can own its LR; raises one ValueError naming the fix otherwise."""
    if trainer.lr_scheduler_configs:
        names = ", ".join(type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs)
        raise ValueError(
            f"QuasiNewtonLR sets the learning rate itself, but an LR scheduler is configured ({names}): "
            "remove lr_scheduler (the `lr_scheduler:` section / the scheduler returned by configure_optimizers)."
        )
    if len(trainer.optimizers) != 1:
        raise ValueError(
            f"QuasiNewtonLR needs exactly one optimiser, got {len(trainer.optimizers)}; return a single "
            "optimiser from configure_optimizers."
        )
    optimizer = trainer.optimizers[0]
    for i, group in enumerate(optimizer.param_groups):
        if "lr" not in group:
            raise ValueError(
                f"QuasiNewtonLR sets param_group['lr'], but param group {i} of {type(optimizer).__name__} has "
                "no 'lr'; use an optimiser with a learning rate `lr` (e.g. torch.optim.SGD)."
            )
    if not (isinstance(optimizer, torch.optim.SGD) or type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(
            f"QuasiNewtonLR knows the stable step of torch.optim.SGD, Adam and AdamW only, got "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}: its 1/h0 would mean nothing for this "
            "update. Use torch.optim.SGD, Adam or AdamW in configure_optimizers, or remove QuasiNewtonLR."
        )
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    if len(set(lrs)) > 1 and not lrs[0] > 0:
        raise ValueError(
            f"QuasiNewtonLR keeps the ratios of the param groups' LRs {lrs} relative to the first group, whose "
            "lr must then be > 0; give the first group a positive lr."
        )
    return optimizer


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
            PyTorch < 2.6 (measured through its eager code from 2.6 on, see :mod:`lyapunov_callbacks.core.compiled`)
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


def check_tag_owners(trainer: pl.Trainer, callback: Any) -> None:
    """Refuse a second writer of ``callback``'s tags or of the learning rate it sets; warn about a checkpoint
    score that lags. Call from ``setup`` (stage ``"fit"``).

    Every curvature callback writes its tags under ``{prefix}/``: two of them with one ``prefix`` would log two
    values of one tag per step (``trainer.callback_metrics`` keeps the last, a ``ModelCheckpoint`` or
    ``EarlyStopping`` reading it would follow whichever ran last). ``QuasiNewtonLR`` sets the learning rate
    at every step, so it must be the only callback that does: a second ``QuasiNewtonLR`` or a
    ``StochasticWeightAveraging`` (which sets its ``swa_lrs`` from ``swa_epoch_start`` on) is refused, as a
    configured LR scheduler is at fit start. A ``ModelCheckpoint`` whose ``monitor`` is one of the callback's
    tags gets a warning: the value is measured in ``on_before_optimizer_step`` at the weights before a step and
    the checkpoint saved after the step, so each checkpoint is scored with the value of earlier weights
    (``HessianEigenvalueMonitor``'s docstring has the recipe that pairs them).

    Args:
        trainer: the trainer whose ``callbacks`` are read.
        callback: a ``HessianEigenvalueMonitor``, ``LyapunovExponentMonitor`` or ``QuasiNewtonLR``.

    Raises:
        ValueError: another curvature callback has the same ``prefix`` (the fix: a different ``prefix``), or
            ``callback`` is a ``QuasiNewtonLR`` beside another ``QuasiNewtonLR`` or ``StochasticWeightAveraging``
            (the fix: keep one LR owner).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging

    from lyapunov_callbacks import HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR

    name = type(callback).__name__
    others = [c for c in trainer.callbacks if c is not callback]
    if isinstance(callback, QuasiNewtonLR):
        for other in others:
            if isinstance(other, QuasiNewtonLR):
                raise ValueError(
                    f"Two QuasiNewtonLR callbacks are attached (prefix={callback.prefix!r} and "
                    f"prefix={other.prefix!r}): both would set the learning rate at every step and log optim/lr. "
                    "The learning rate has one owner: keep one QuasiNewtonLR."
                )
            if isinstance(other, StochasticWeightAveraging):
                raise ValueError(
                    "QuasiNewtonLR and StochasticWeightAveraging both set the learning rate (SWA sets its swa_lrs "
                    "from swa_epoch_start on, QuasiNewtonLR sets α = 1/h0 at every step), so one would silently "
                    "override the other. The learning rate has one owner: remove StochasticWeightAveraging or "
                    "QuasiNewtonLR."
                )
    for other in others:
        if isinstance(other, (HessianEigenvalueMonitor, LyapunovExponentMonitor, QuasiNewtonLR)) and (
            other.prefix == callback.prefix
        ):
            raise ValueError(
                f"{name}(prefix={callback.prefix!r}) and {type(other).__name__}(prefix={other.prefix!r}) would both "
                f"write the tags '{callback.prefix}/...' (two values per step; callback_metrics keeps the last). "
                f"Give each a different `prefix`, e.g. {name}(..., prefix='{callback.prefix}_2')."
            )
    for other in others:
        monitored = getattr(other, "monitor", None) if isinstance(other, ModelCheckpoint) else None
        if isinstance(monitored, str) and monitored.startswith(f"{callback.prefix}/"):
            rank_zero_warn(
                f"ModelCheckpoint(monitor={monitored!r}): {name} measures in on_before_optimizer_step, at the "
                "weights before a step, and the checkpoint is saved after the step, so each checkpoint is scored "
                "with the value of earlier weights (up to every_n_steps steps earlier), not of the weights it "
                "holds. To choose a checkpoint by this value, save at the measured steps with save_top_k=-1 and "
                "no monitor, and pick the file whose step is the logged step of the best value (see "
                "HessianEigenvalueMonitor's docstring)."
            )


def check_optimizer_holds_parameters(
    optimizer: torch.optim.Optimizer, pl_module: nn.Module, callback_name: str
) -> None:
    """Raise unless ``optimizer`` updates every trainable parameter of ``pl_module``.

    A tangent vector or a preconditioner lives in the space of all trainable parameters (the Hessian operator's
    flat vector); a parameter the optimiser does not update has no step to linearise. An optimiser that holds
    no parameter at all (Lightning's stand-in when ``configure_optimizers`` returns none) is left to the
    optimiser-type checks.

    Raises:
        ValueError: naming the first few trainable parameters the optimiser does not hold, and the fix.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in held]
    if not missing or not held:
        return
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise ValueError(
        f"{callback_name} follows every trainable parameter, but the optimiser ({type(optimizer).__name__}) does "
        f"not update {len(missing)} of them: {shown}. Pass them all to the optimiser in configure_optimizers "
        "(e.g. torch.optim.SGD(self.parameters(), ...)), or freeze the ones it should not train "
        "(parameter.requires_grad_(False))."
    )


def compiled_training_step(pl_module: pl.LightningModule, callback_name: str) -> bool:
    """Whether the training step runs ``torch.compile``'d code, telling the user (rank zero) once per call if so.

    A compiled step's autograd graph has no double backward, so a callback that would take Hessian-vector
    products on the training step's own graph evaluates the loss again through the module's eager code (the
    :class:`~lyapunov_callbacks.core.hessian.HessianOperator` path) instead. Call it once per fit (e.g. in
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
