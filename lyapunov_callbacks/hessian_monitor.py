"""Callback that tracks the sharpness h0 (the Hessian's top eigenvalue) and the top-k spectrum during training."""

from __future__ import annotations

from typing import Any

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lyapunov_callbacks._lightning import (
    BATCHES,
    FAST_DEV_RUN_HVPS,
    EigenTracker,
    MeanLoss,
    ProbeBatch,
    check_choice,
    check_int,
    check_positive,
    check_prefix,
    check_supported,
    current_lr,
    fast_dev_run_budget,
    finite_or_nan,
    log_measurements,
    resolve_dtype,
    resolve_loss_fn,
)
from lyapunov_callbacks._state import preserved_state, restore_rng, rng_snapshot
from lyapunov_callbacks.eigen import METHODS
from lyapunov_callbacks.hessian import BACKENDS
from lyapunov_callbacks.tensorboard_layout import add_paper_layout

__all__ = ["HessianEigenvalueMonitor"]

class HessianEigenvalueMonitor(Callback):
    r"""Log the top Hessian eigenvalue h0 of the training loss (and the top ``k``) every ``every_n_steps`` steps.

    At every optimiser step with ``trainer.global_step % every_n_steps == 0`` the monitor estimates, in
    ``on_before_optimizer_step`` — i.e. at the pre-step weights θ_t, just before the step is taken, with the
    learning rate α that step uses whatever the callback order and the schedulers — the top
    eigenvalues :math:`h_0 \ge h_1 \ge \dots` of :math:`H = \nabla^2_\theta L(\theta_t; B)` where :math:`L` is
    the mean training loss (``model.training_loss(batch)``, see below) of the batch :math:`B`:
    the batch of the step (``batch="current"``; with ``accumulate_grad_batches = k`` the loss the step optimises,
    the mean of its ``k`` micro-batch losses, each with the dropout masks of its training forward) or a fixed
    probe batch drawn once from the training set (``batch="fixed"``: values comparable across steps). Each estimate is warm-started from the previous
    eigenvectors, so it typically costs a handful of Hessian-vector products (HVPs, ~2-3 forward+backward each).
    Measurement leaves training untouched: parameters, buffers (BatchNorm statistics) and ``.grad`` are never
    written (the loss is evaluated functionally on detached leaves and cloned buffers; a guard on their version
    counters raises if that were ever violated), train/eval modes and the RNG streams are restored, and the
    probe batch is drawn by index with a private generator.

    Logged (to ``trainer.callback_metrics`` and to every logger, at the measured step), ``{prefix}`` being the
    ``prefix`` argument (default ``"hessian"``):

    - ``{prefix}/h0``: the sharpness h0; ``{prefix}/inv_h0``: 1/h0 (the quasi-Newton step size);
    - ``{prefix}/h{i}`` for ``1 <= i < k``: the next eigenvalues, descending;
    - ``{prefix}/stability``: α·h0 with α the learning rate of the step (first param group), the
      edge-of-stability ratio (gradient descent on a quadratic is stable for α·h0 < 2);
    - ``{prefix}/num_hvps``: HVPs spent on this estimate; ``optim/lr``: α (shared by all callbacks).

    Several monitors run together (e.g. ``k=1`` every 5 steps and ``k=14`` every 100, or a second one with
    ``batch="fixed", prefix="hessian_probe"``): each has its own :attr:`state_key` and checkpoint state; give
    each a distinct ``prefix`` to keep their tags apart. Every ``fit`` starts from a clean state (no warm start
    carried over from an earlier fit) unless the callback state is restored from a checkpoint.

    Under ``Trainer(fast_dev_run=...)`` each estimate is capped at a handful of HVPs (the code path runs, the
    values are not converged); an info message says so.

    The loss is ``pl_module.training_loss(batch)`` when the module defines it (scalar, mean-reduced, no logging);
    otherwise ``training_step(batch, 0)`` with logging silenced. Under DDP the HVPs are averaged over ranks, so
    h0 is that of the loss DDP optimises (the mean of the per-rank losses); with ``batch="fixed"`` each rank
    takes its own shard of the probe batch.

    Args:
        every_n_steps: measure every this many optimiser steps (default 10). Must be >= 1.
        k: number of top eigenvalues (default 1). Must be >= 1.
        method: eigen-solver: ``"lanczos"`` (default, fastest), ``"power"`` (power iteration) or ``"lyapunov"``
            (the paper's growth rate of tangent vectors under the ascent map ``I + αH``, α chosen ≈ 1/h0).
        hvp: HVP backend, ``"autograd"`` (default, exact double backward) or ``"finite_difference"`` (two
            gradients, for models without double-backward support).
        batch: ``"current"`` (default, the training batch of the step) or ``"fixed"`` (probe batch).
        probe_size: number of samples of the probe batch (``batch="fixed"``), default 64 (a fixed batch's Hessian
            moves only with the weights, so a small one gives a smooth curve at little HVP cost). Must be >= 1.
        tol: relative tolerance of the eigen-solver (default 1e-2). Must be > 0. It bounds the relative Ritz
            residual ``‖Hy − θy‖ ≤ tol·|θ|`` of each returned pair, and for a symmetric H some eigenvalue lies
            within that residual of θ, so each logged value is within ``tol`` (relative) of an eigenvalue — in
            practice much closer, the error being of order ``(tol·θ)²/gap``. 1e-2 is the accuracy the
            curves need and lets a warm-started estimate stop after one or two HVPs. The bound is to the
            eigenvalue *nearest* θ: when h0 and h1 lie within a few percent of each other the solver may
            stop on h1 (error up to ``h0 − h1``); lower ``tol`` (e.g. 1e-3) for clustered top eigenvalues,
            benchmarks or tests.
        max_iter: iteration cap of the eigen-solver (default 100). Must be >= 1.
        warm_start: start each estimate from the last eigenvectors (default True).
        seed: seed of the solver's first random start vector and of the probe batch draw (default 0).
        dtype: ``None``/``"float32"`` (default: estimate in float32 even under mixed precision) or
            ``"float64"`` (double precision, for small models and tests).
        prefix: tag prefix of this monitor's values (default ``"hessian"``); ``optim/lr`` is not prefixed.
        prog_bar: also show ``{prefix}/h0`` in the progress bar (default False).

    Raises:
        ValueError: on any invalid argument above (the message names the parameter); at fit start, with manual
            optimisation, several optimisers or a torch.compile'd module.

    Example::

        import lightning as L
        from lyapunov_callbacks import HessianEigenvalueMonitor

        trainer = L.Trainer(max_epochs=10, callbacks=[HessianEigenvalueMonitor(every_n_steps=20, k=3)])
        trainer.fit(model, datamodule)   # logs hessian/h0, hessian/h1, hessian/h2, hessian/stability, ...
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        k: int = 1,
        method: str = "lanczos",
        hvp: str = "autograd",
        batch: str = "current",
        probe_size: int = 64,
        tol: float = 1e-2,
        max_iter: int = 100,
        warm_start: bool = True,
        seed: int = 0,
        dtype: str | torch.dtype | None = None,
        prefix: str = "hessian",
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        self.prefix = check_prefix(prefix)
        self.prog_bar = bool(prog_bar)
        check_int("every_n_steps", every_n_steps, "every_n_steps=10")
        check_int("k", k, "k=1 (h0 alone)")
        check_choice("method", method, METHODS)
        check_choice("hvp", hvp, BACKENDS)
        check_choice("batch", batch, BATCHES)
        check_int("probe_size", probe_size, "probe_size=256")
        check_positive("tol", tol, "tol=1e-2")
        check_int("max_iter", max_iter, "max_iter=100")
        estimate_dtype = resolve_dtype(dtype)
        self.every_n_steps = every_n_steps
        self.k = k
        self.method = method
        self.hvp = hvp
        self.batch = batch
        self.probe_size = probe_size
        self.tol = float(tol)
        self.max_iter = max_iter
        self.warm_start = bool(warm_start)
        self.seed = seed
        self.dtype = estimate_dtype
        self._reset()
        self._loss_fn: Any = None
        self.last_metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            prefix=self.prefix, every_n_steps=self.every_n_steps, k=self.k, method=self.method, batch=self.batch
        )

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_supported(trainer, pl_module, type(self).__name__)
            # Lightning restores callback state after setup: a checkpoint overrides this clean start.
            self._reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_supported(trainer, pl_module, type(self).__name__)
        self._loss_fn = resolve_loss_fn(pl_module)
        budget = max(FAST_DEV_RUN_HVPS, 2 * self.k)
        if fast_dev_run_budget(trainer, type(self).__name__, f"each estimate is capped at {budget} HVPs"):
            self._tracker.max_iter = min(self.max_iter, budget)
        else:
            self._tracker.max_iter = self.max_iter
        if self.prefix == "hessian":
            add_paper_layout(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or step == self._last_step:
            self._micro = []
            return
        if self._micro_step != step:
            self._micro, self._micro_step = [], step
        # The RNG state right before the training forward: replayed so the HVPs see its dropout masks.
        self._micro.append((batch, rng_snapshot()))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if not self._micro or self._micro_step != step:
            return
        micro, self._micro = self._micro, []
        self._last_step = step
        self._measure(trainer, pl_module, micro, step)

    # ---------------------------------------------------------------------------------------------- helpers
    def _reset(self) -> None:
        """Forget everything measured: a fresh warm start, probe draw and step bookkeeping."""
        self._tracker = EigenTracker(
            method=self.method, hvp=self.hvp, k=self.k, tol=self.tol, max_iter=self.max_iter, seed=self.seed,
            warm_start=self.warm_start, dtype=self.dtype,
        )
        self._probe = ProbeBatch(size=self.probe_size, seed=self.seed) if self.batch == "fixed" else None
        self._last_step: int | None = None  # global step of the last measurement (one per optimiser step)
        self._micro: list[tuple[Any, dict]] = []  # (batch, rng) of the micro-batches of the step to measure
        self._micro_step: int | None = None

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, micro: list[tuple[Any, dict]], step: int
    ) -> None:
        if self._loss_fn is None:
            self._loss_fn = resolve_loss_fn(pl_module)
        loss_fn = self._loss_fn
        if self._probe is not None:
            batch, rng = self._probe.get(trainer, pl_module), micro[0][1]
        elif len(micro) == 1:
            batch, rng = micro[0]
        else:  # accumulation: the mean of the micro-batch losses, each with its own dropout masks
            loss_fn = MeanLoss(self._loss_fn, [r for _, r in micro])
            batch, rng = [b for b, _ in micro], micro[0][1]
        lr = current_lr(trainer)
        # The operator never writes to the module's tensors (detached leaves, cloned buffers), so a guard
        # without copies suffices: it restores modes, RNG and .grad references and fails loudly if a
        # tensor was modified in place (a full copy of the weights per estimate would be wasted time).
        with preserved_state(pl_module, copy_tensors=False):
            restore_rng(rng)
            result = self._tracker.estimate(pl_module, loss_fn, batch)
        values = [float(v) for v in result.eigenvalues.detach().cpu()]
        h0 = values[0]
        p = self.prefix
        metrics = {
            f"{p}/h0": finite_or_nan(h0),
            f"{p}/inv_h0": finite_or_nan(1.0 / h0) if h0 != 0 else float("nan"),
        }
        for i in range(1, len(values)):
            metrics[f"{p}/h{i}"] = finite_or_nan(values[i])
        metrics[f"{p}/stability"] = finite_or_nan(lr * h0)
        metrics[f"{p}/num_hvps"] = float(result.num_hvps)
        metrics["optim/lr"] = lr
        self.last_metrics = metrics
        log_measurements(trainer, pl_module, metrics, step, prog_bar=(f"{p}/h0",) if self.prog_bar else ())

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self._tracker.state_dict(),
            "probe": None if self._probe is None else self._probe.state_dict(),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._tracker.load_state_dict(state_dict["tracker"])
        if self._probe is not None and state_dict.get("probe") is not None:
            self._probe.load_state_dict(state_dict["probe"])
        self._last_step = state_dict.get("last_step")
