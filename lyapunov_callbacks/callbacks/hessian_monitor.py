"""Callback that tracks the sharpness h0 (the Hessian's top eigenvalue) and the top-k spectrum during training."""

from __future__ import annotations

from typing import Any, Literal, Union

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lyapunov_callbacks.callbacks._lightning import (
    BATCHES,
    ProbeBatch,
    StepLoss,
    StepMicroBatches,
    check_choice,
    check_int,
    check_positive,
    current_lr,
    finite_or_nan,
    log_measurements,
    measurement_guard,
    measurement_operator,
    resolve_dtype,
    resolve_loss_fn,
    step_loss,
)
from lyapunov_callbacks.callbacks._setup import (
    FAST_DEV_RUN_HVPS,
    check_prefix,
    check_sharding,
    check_supported,
    check_tag_owners,
    fast_dev_run_budget,
)
from lyapunov_callbacks.callbacks.tensorboard_layout import add_paper_layout
from lyapunov_callbacks.core.cadence import AdaptiveCadence, check_every_n_steps, is_auto
from lyapunov_callbacks.core.checks import check_gap_safety
from lyapunov_callbacks.core.curvature import CurvatureEstimates, preconditioning_applies
from lyapunov_callbacks.core.eigen import METHODS
from lyapunov_callbacks.core.hessian import BACKENDS, HessianOperator, trainable_parameters
from lyapunov_callbacks.core.stability import batch_sharpness as rayleigh_along_gradient

__all__ = ["HessianEigenvalueMonitor"]


class HessianEigenvalueMonitor(Callback):
    r"""Log the top Hessian eigenvalue h0 of the training loss (and the top ``k``) every ``every_n_steps`` steps.

    At every optimiser step with ``trainer.global_step % every_n_steps == 0`` the monitor estimates, in
    ``on_before_optimizer_step`` (at the pre-step weights θ_t, with the learning rate α the step uses), the top
    eigenvalues :math:`h_0 \ge h_1 \ge \dots` of :math:`H = \nabla^2_\theta L(\theta_t; B)`, :math:`L` the mean
    training loss (``model.training_loss(batch)`` when the module defines it, else ``training_step`` with logging
    silenced) of :math:`B`: the step's batch (``batch="current"``; with ``accumulate_grad_batches = k`` the mean of
    its ``k`` micro-batch losses, each with its training dropout masks) or a probe batch drawn once from the
    training set (``batch="fixed"``: values comparable across steps). Each estimate is warm-started by a
    :class:`~lyapunov_callbacks.core.tracker.EigenTracker` from the previous Ritz vectors, so it costs a handful
    of Hessian-vector products (HVPs, ~2-3 forward+backward each). Measuring leaves training untouched:
    parameters, buffers, ``.grad``, train/eval modes and the RNG streams are as before.

    Logged (to ``trainer.callback_metrics`` and every logger, at the measured step), with ``{prefix}`` = ``prefix``:

    - ``{prefix}/h0`` and ``{prefix}/inv_h0`` (1/h0, the quasi-Newton step); ``{prefix}/h{i}`` for ``1 <= i < k``;
    - ``{prefix}/stability``: α·h0, the edge-of-stability ratio (gradient descent on a quadratic is stable for
      α·h0 < 2); ``{prefix}/num_hvps``; ``optim/lr``: α;
    - with ``pre_h0`` (default on for ``Adam``/``AdamW``): ``{prefix}/pre_h0`` = :math:`\lambda_1(P^{-1}H)`,
      :math:`P` the preconditioner the coming step divides by
      (:func:`~lyapunov_callbacks.core.preconditioned.step_preconditioner`: :math:`\sqrt{\hat v} + \epsilon` of
      the optimiser's state, :math:`|g| + \epsilon` before Adam's first step), the top eigenvalue of
      :math:`P^{-1/2} H P^{-1/2}` (a second warm-started solve on the same operator; for SGD :math:`P = I` and it
      is h0); ``{prefix}/pre_stability`` = :math:`\alpha\lambda_1(P^{-1}H)/c` with the optimiser's stability
      factor :math:`c` (:func:`~lyapunov_callbacks.core.stability.stability_factor`), whose edge is at 2 for every
      optimiser (Cohen et al. 2022); ``{prefix}/pre_num_hvps``;
    - with ``batch_sharpness=True``: ``{prefix}/batch_sharpness`` = :math:`g^\top H_B g / \lVert g\rVert^2` on the
      step's own batch (one HVP), which Andreyev & Beneventano (2024) find at 2/α under mini-batch SGD.

    Several monitors may run together (e.g. ``k=14`` every 100 steps beside ``k=1`` every 5), each with a distinct
    ``prefix`` and its own :attr:`state_key`; every ``fit`` starts clean unless restored from a checkpoint. Under
    ``fast_dev_run`` each estimate is capped at a handful of HVPs. Under DDP the HVPs are averaged over ranks (h0
    of the loss DDP optimises; with ``batch="fixed"`` each rank takes its shard of the probe); under FSDP2 they
    are differences of the strategy's gradients on the shards.

    With ``every_n_steps="auto"`` an :class:`~lyapunov_callbacks.core.cadence.AdaptiveCadence` schedules each
    estimate from the rate of change of h0, so that h0 is predicted to move by ``drift_tol`` until then (within
    ``[min_every, max_every]``; ``{prefix}/every_n_steps`` logs the interval), from logged values only: two runs
    of one seed measure at the same steps. The value logged at step s is the h0 of the weights *before* step s,
    i.e. of the checkpoint filed under ``step=s``: the user guide's *HessianEigenvalueMonitor in detail* shows
    how to pick "the flattest checkpoint" by it (``ModelCheckpoint(monitor="hessian/h0")`` would pair each file
    with an older h0; a warning says so).

    Args:
        every_n_steps: measure every this many optimiser steps (default 10; must be >= 1), or ``"auto"``
            (adaptive, see above).
        drift_tol: ``"auto"`` only: predicted relative change of h0 between two estimates (> 0), default 0.05.
        min_every: ``"auto"`` only: shortest interval in steps (>= 1), default 10.
        max_every: ``"auto"`` only: longest interval in steps (>= ``min_every``), default 200.
        loss_rise: ``"auto"`` only: relative rise (> 0) of the step's loss over its mean since the last estimate
            that makes the next step measured, or ``None`` (default: no loss trigger).
        k: number of top eigenvalues (default 1). Must be >= 1.
        method: eigen-solver: ``"lanczos"`` (default, fastest), ``"power"`` or ``"lyapunov"`` (the paper's growth
            rate of tangent vectors under the ascent map ``I + αH``, α chosen ≈ 1/h0).
        hvp: HVP backend, ``"autograd"`` (default, exact double backward) or ``"finite_difference"`` (two
            gradients, for models without double-backward support).
        batch: ``"current"`` (default, the training batch of the step) or ``"fixed"`` (probe batch).
        probe_size: samples of the probe batch (``batch="fixed"``), default 64. Must be >= 1.
        tol: relative tolerance of the eigen-solver (default 1e-2, > 0): each logged value is within ``tol``
            (relative) of an eigenvalue, in practice within ``(tol·θ)²/gap``. The eigenvalue is the one *nearest*
            the estimate: with h0 and h1 within a few percent the solver may stop on h1; lower ``tol`` (e.g. 1e-3)
            for clustered top eigenvalues, benchmarks or tests.
        max_iter: iteration cap of the eigen-solver (default 100). Must be >= 1.
        warm_start: start each estimate from the last eigenvectors (default True).
        seed: seed of the solver's first random start vector and of the probe batch draw (default 0).
        dtype: ``None``/``"float32"`` (default: float32 even under mixed precision) or ``"float64"``.
        prefix: tag prefix of this monitor's values (default ``"hessian"``); ``optim/lr`` is not prefixed.
        prog_bar: also show ``{prefix}/h0`` in the progress bar (default False).
        pre_h0: log ``pre_h0`` and ``pre_stability``: ``None`` (default) = on for ``torch.optim.Adam`` /
            ``AdamW``, off otherwise; ``True`` = on (SGD, Adam or AdamW); ``False`` = off.
        batch_sharpness: log ``batch_sharpness`` (default False; one more HVP per measurement).
        gap_safety: safety factor (>= 1, default 10) of the gap rule by which a warm-started Lanczos estimate may
            stop: once ``residual²/gap <= tol·|h0| / gap_safety``. A smaller factor takes fewer HVPs and stops on h1
            more often where h0 and h1 are close (``tests/callbacks/test_hessian_monitor.py`` has a step 3.1 % low
            with factor 1, within 3.6e-4 with 10; ``benchmarks/monitor_overhead.py`` measures both).

    Raises:
        ValueError: on any invalid argument above (the message names the parameter); at fit start, with manual
            optimisation, several optimisers or a torch.compile'd module on PyTorch < 2.6; with ``pre_h0=True`` and an
            optimiser other than SGD/Adam/AdamW, param groups that differ in ``betas[0]`` (Adam) or momentum
            (SGD), or trainable parameters the optimiser does not update; at setup, another curvature callback
            with the same ``prefix``.

    Example::

        import lightning as L
        from lyapunov_callbacks import HessianEigenvalueMonitor

        trainer = L.Trainer(max_epochs=10, callbacks=[HessianEigenvalueMonitor(every_n_steps=20, k=3)])
        trainer.fit(model, datamodule)   # logs hessian/h0, hessian/h1, hessian/h2, hessian/stability, ...

        # AdamW: also hessian/pre_h0 and hessian/pre_stability (edge at 2), and the batch sharpness
        HessianEigenvalueMonitor(every_n_steps=50, batch_sharpness=True)
    """

    def __init__(
        self,
        every_n_steps: Union[int, Literal["auto"]] = 10,
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
        pre_h0: bool | None = None,
        batch_sharpness: bool = False,
        gap_safety: float = 10.0,
        drift_tol: float = 0.05,
        min_every: int = 10,
        max_every: int = 200,
        loss_rise: float | None = None,
    ) -> None:
        super().__init__()
        self.prefix = check_prefix(prefix)
        self.prog_bar = bool(prog_bar)
        for name, value in (("pre_h0", pre_h0), ("batch_sharpness", batch_sharpness)):
            if not (isinstance(value, bool) or (name == "pre_h0" and value is None)):
                allowed = "None, True or False" if name == "pre_h0" else "True or False"
                raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
        check_every_n_steps(every_n_steps)
        self._cadence_settings = dict(drift_tol=drift_tol, min_every=min_every, max_every=max_every, loss_rise=loss_rise)
        AdaptiveCadence(**self._cadence_settings)  # validates them, naming the bad one
        check_int("k", k, "k=1 (h0 alone)")
        check_choice("method", method, METHODS)
        check_choice("hvp", hvp, BACKENDS)
        check_choice("batch", batch, BATCHES)
        check_int("probe_size", probe_size, "probe_size=256")
        check_positive("tol", tol, "tol=1e-2")
        check_int("max_iter", max_iter, "max_iter=100")
        check_gap_safety(gap_safety)
        self.pre_h0 = pre_h0
        self.batch_sharpness = batch_sharpness
        self.every_n_steps = every_n_steps
        self.k = k
        self.method = method
        self.hvp = hvp
        self.batch = batch
        self.probe_size = probe_size
        self.tol = float(tol)
        self.max_iter = max_iter
        self.gap_safety = float(gap_safety)
        self.warm_start = bool(warm_start)
        self.seed = seed
        self.dtype = resolve_dtype(dtype)
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
            check_tag_owners(trainer, self)
            # Lightning restores callback state after setup: a checkpoint overrides this clean start.
            self._reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_supported(trainer, pl_module, type(self).__name__)
        check_sharding(trainer, pl_module, type(self).__name__, hvp=self.hvp, method=self.method, dtype=self.dtype)
        self._loss_fn = resolve_loss_fn(pl_module)
        budget = max(FAST_DEV_RUN_HVPS, 2 * self.k)
        capped = fast_dev_run_budget(trainer, type(self).__name__, f"each estimate is capped at {budget} HVPs")
        self._estimates.set_max_iter(min(self.max_iter, budget) if capped else self.max_iter)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        params = [p for _, p in trainable_parameters(pl_module)]
        self._pre_on = preconditioning_applies(optimizer, params, self.pre_h0, type(self).__name__)
        add_paper_layout(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        due = self._cadence.due(step) if self._cadence is not None else step % self.every_n_steps == 0
        if not due or step == self._last_step:
            self._micro.clear()
            return
        self._micro.add(step, batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._cadence is not None and self._cadence.loss_rise is not None:  # the adaptive cadence's trigger
            self._loss.add(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        micro = self._micro.take(step)
        if micro is not None:  # collect → measure → log
            self._last_step = step
            measured = (
                step_loss(self._loss_fn, micro) if self._probe is None
                else (self._loss_fn, self._probe.get(trainer, pl_module), micro[0][1])
            )
            # The operators never write to the module's tensors: a guard without copies restores modes, RNG and
            # .grad references and fails loudly on an in-place write.
            with measurement_guard(pl_module):
                metrics = self._measure(trainer, pl_module, measured)
                if self.batch_sharpness and self._probe is not None:  # on the step's own batch, not the probe's
                    with self._operator(pl_module, *step_loss(self._loss_fn, micro)) as op:
                        metrics[f"{self.prefix}/batch_sharpness"] = finite_or_nan(rayleigh_along_gradient(op))
            self.last_metrics = metrics
            prog_bar = (f"{self.prefix}/h0",) if self.prog_bar else ()
            log_measurements(trainer, pl_module, metrics, step, prog_bar=prog_bar)
        if self._cadence is not None:
            loss = self._loss.take(trainer)
            if loss is not None:
                self._cadence.observe_loss(step, loss)

    # ---------------------------------------------------------------------------------------------- helpers
    def _reset(self) -> None:
        """Forget everything measured: a fresh warm start, probe draw and step bookkeeping."""
        self._estimates = CurvatureEstimates(
            method=self.method, k=self.k, tol=self.tol, max_iter=self.max_iter, seed=self.seed,
            warm_start=self.warm_start, gap_safety=self.gap_safety,
        )
        self._probe = ProbeBatch(size=self.probe_size, seed=self.seed) if self.batch == "fixed" else None
        self._last_step: int | None = None  # global step of the last measurement (one per optimiser step)
        self._micro = StepMicroBatches()  # the micro-batches of the step to measure
        self._pre_on = False
        self._cadence = AdaptiveCadence(**self._cadence_settings) if is_auto(self.every_n_steps) else None
        self._loss = StepLoss()  # the step's loss, for the adaptive cadence's trigger

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, measured: tuple) -> dict[str, float]:
        """h0 and the top k, then ``pre_h0`` and the batch sharpness on the same operator."""
        p, lr = self.prefix, current_lr(trainer)
        with self._operator(pl_module, *measured) as op:
            metrics = {f"{p}/{name}": value for name, value in self._estimates.spectrum(op, lr).items()}
            metrics["optim/lr"] = lr
            h0 = metrics[f"{p}/h0"]
            if self._cadence is not None:  # rank 0's h0, so every rank schedules alike
                h0_0 = float(trainer.strategy.broadcast(h0, src=0)) if trainer.world_size > 1 else h0
                metrics[f"{p}/every_n_steps"] = float(self._cadence.update(trainer.global_step, h0_0))
            if self._pre_on:
                params = [q for _, q in trainable_parameters(pl_module)]
                pre = self._estimates.preconditioned(op, trainer.optimizers[0], params, h0, lr)
                metrics.update({f"{p}/{name}": value for name, value in pre.items()})
            if self.batch_sharpness and self._probe is None:
                metrics[f"{p}/batch_sharpness"] = finite_or_nan(rayleigh_along_gradient(op))
        return metrics

    def _operator(self, pl_module: pl.LightningModule, loss_fn: Any, batch: Any, rng: dict) -> HessianOperator:
        return measurement_operator(pl_module, loss_fn, batch, rng, self.hvp, self.dtype)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            **self._estimates.state_dict(),
            "probe": None if self._probe is None else self._probe.state_dict(),
            "last_step": self._last_step,
            "cadence": None if self._cadence is None else self._cadence.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._estimates.load_state_dict(state_dict)
        if self._probe is not None and state_dict.get("probe") is not None:
            self._probe.load_state_dict(state_dict["probe"])
        self._last_step = state_dict.get("last_step")
        if self._cadence is not None and state_dict.get("cadence") is not None:
            self._cadence.load_state_dict(state_dict["cadence"])
