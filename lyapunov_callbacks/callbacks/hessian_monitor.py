"""Callback that tracks the sharpness h0 (the Hessian's top eigenvalue) and the top-k spectrum during training."""

from __future__ import annotations

from typing import Any, Literal, Union

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lyapunov_callbacks.callbacks._lightning import (
    BATCHES,
    FAST_DEV_RUN_HVPS,
    ProbeBatch,
    StepMicroBatches,
    check_choice,
    check_int,
    check_positive,
    check_prefix,
    check_sharding,
    check_supported,
    check_tag_owners,
    current_lr,
    fast_dev_run_budget,
    finite_or_nan,
    log_measurements,
    measurement_guard,
    measurement_operator,
    resolve_dtype,
    resolve_loss_fn,
    step_loss,
)
from lyapunov_callbacks.callbacks.tensorboard_layout import add_paper_layout
from lyapunov_callbacks.core.cadence import AdaptiveCadence, check_every_n_steps, is_auto
from lyapunov_callbacks.core.checks import check_gap_safety
from lyapunov_callbacks.core.eigen import METHODS
from lyapunov_callbacks.core.hessian import BACKENDS, HessianOperator, trainable_parameters
from lyapunov_callbacks.core.preconditioned import PreconditionedOperator, step_preconditioner
from lyapunov_callbacks.core.stability import batch_sharpness as rayleigh_along_gradient
from lyapunov_callbacks.core.stability import stability_factor
from lyapunov_callbacks.core.tangent import ordered_parameters
from lyapunov_callbacks.core.tracker import EigenTracker

__all__ = ["HessianEigenvalueMonitor"]

_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)
_PRECONDITIONED_TYPES = (torch.optim.SGD, *_ADAM_TYPES)

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

    Several monitors may run together (e.g. ``k=14`` every 100 steps beside ``k=1`` every 5): each needs a distinct
    ``prefix`` (two curvature callbacks with one ``prefix`` are refused at setup); each has its own
    :attr:`state_key`. Every ``fit`` starts clean unless the state is restored from a
    checkpoint. Under ``fast_dev_run`` each estimate is capped at a handful of HVPs. Under DDP the HVPs are
    averaged over ranks (h0 of the loss DDP optimises); with ``batch="fixed"`` each rank takes its shard of the probe.

    **Choosing a checkpoint by h0.** ``ModelCheckpoint(monitor="hessian/h0", every_n_train_steps=N)`` scores each
    checkpoint with the wrong weights: the value logged at step s is the h0 of the weights before step s, while
    the checkpoint written at the end of that batch holds the weights after it and is filed under ``step=s+1``;
    it is scored with the last h0 measured, up to ``every_n_steps`` steps older. A warning says so at setup. The
    pairing that holds is by step: **the value logged at step s is the h0 of the checkpoint whose ``step`` is s**.
    So save every N steps without a score, keep them all, measure at the same steps on a fixed batch, and pick
    the file after the fit::

        monitor = HessianEigenvalueMonitor(every_n_steps=N, batch="fixed")
        checkpoints = ModelCheckpoint(dirpath="ckpt", every_n_train_steps=N, save_top_k=-1, filename="{step}")
        trainer = L.Trainer(callbacks=[monitor, checkpoints], logger=logger)
        trainer.fit(model, datamodule)
        # h0 logged at steps 0, N, 2N, ...; ckpt/step=N.ckpt, ckpt/step=2N.ckpt, ... hold θ_N, θ_2N, ...
        step = min((s for s in logged_h0 if s > 0), key=logged_h0.get)   # logged_h0: {step: hessian/h0}
        flattest = f"ckpt/step={step}.ckpt"

    ``logged_h0`` comes from the logger (e.g. :func:`lyapunov_callbacks.analysis.tb_reader.read_scalars` of the
    TensorBoard run). The same holds for every tag of the curvature callbacks.

    **Adaptive cadence.** With ``every_n_steps="auto"`` the steps are chosen by an
    :class:`~lyapunov_callbacks.core.cadence.AdaptiveCadence`: after each estimate the next one is scheduled from
    the rate of change of h0 over the last estimates, so that h0 is predicted to move by ``drift_tol``
    (relatively) until then, within ``[min_every, max_every]`` steps. With ``loss_rise`` set, a training loss above
    ``(1 + loss_rise)`` times its mean since the last estimate (the all-rank mean under DDP) makes the next step
    measured; it is off by default because at the edge of stability the mini-batch loss doubles over its recent
    mean routinely (``benchmarks/results/cadence.md``). The schedule depends on the logged h0 and losses only
    (never on wall time), so two runs of one seed measure at the same steps. Each estimate also logs
    ``{prefix}/every_n_steps``, the interval it scheduled.

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
        for tracker in (self._tracker, self._pre_tracker):
            tracker.max_iter = min(self.max_iter, budget) if capped else self.max_iter
        self._pre_on = self._check_preconditioning(trainer, pl_module)
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
        # The adaptive cadence's loss trigger: Lightning passes each micro-batch loss divided by
        # accumulate_grad_batches, so the sum over the step is the mean loss the step optimises.
        if self._cadence is not None and self._cadence.loss_rise is not None:
            value = loss.detach().float()
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        micro = self._micro.take(step)
        if micro is not None:
            self._last_step = step
            self._measure_step(trainer, pl_module, micro, step)
        if self._cadence is not None:
            self._observe_loss(trainer, step)

    # ---------------------------------------------------------------------------------------------- helpers
    def _measure_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, micro: list[tuple[Any, dict]], step: int
    ) -> None:
        if self._probe is not None:
            measured = (self._loss_fn, self._probe.get(trainer, pl_module), micro[0][1])
        else:
            measured = step_loss(self._loss_fn, micro)
        # The operators never write to the module's tensors (detached leaves, cloned buffers), so a guard
        # without copies suffices: it restores modes, RNG and .grad references and fails loudly if a tensor was
        # modified in place.
        with measurement_guard(pl_module):
            metrics = self._measure(trainer, pl_module, measured)
            if self.batch_sharpness and self._probe is not None:  # on the step's own batch, not the probe's
                with self._operator(pl_module, *step_loss(self._loss_fn, micro)) as op:
                    metrics[f"{self.prefix}/batch_sharpness"] = finite_or_nan(rayleigh_along_gradient(op))
        self.last_metrics = metrics
        log_measurements(trainer, pl_module, metrics, step, prog_bar=(f"{self.prefix}/h0",) if self.prog_bar else ())

    def _reset(self) -> None:
        """Forget everything measured: a fresh warm start, probe draw and step bookkeeping."""
        self._tracker = EigenTracker(
            method=self.method, k=self.k, tol=self.tol, max_iter=self.max_iter, seed=self.seed,
            warm_start=self.warm_start, two_vector_start=True, gap_safety=self.gap_safety,
        )
        # pre_h0: the top eigenpair of P^-½HP^-½, warm-started from its own last eigenvector.
        self._pre_tracker = EigenTracker(
            method=self.method, k=1, tol=self.tol, max_iter=self.max_iter, seed=self.seed + 1,
            warm_start=self.warm_start, stop="residual",
        )
        self._probe = ProbeBatch(size=self.probe_size, seed=self.seed) if self.batch == "fixed" else None
        self._last_step: int | None = None  # global step of the last measurement (one per optimiser step)
        self._micro = StepMicroBatches()  # the micro-batches of the step to measure
        self._pre_on = False
        self._cadence = AdaptiveCadence(**self._cadence_settings) if is_auto(self.every_n_steps) else None
        self._loss_sum: torch.Tensor | None = None  # the step's loss, for the adaptive cadence's trigger

    def _observe_loss(self, trainer: pl.Trainer, step: int) -> None:
        """Pass the step's loss (the all-rank mean, so every rank schedules alike) to the adaptive cadence."""
        total, self._loss_sum = self._loss_sum, None
        if total is None:
            return
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="mean")
        self._cadence.observe_loss(step, float(total))

    def _schedule(self, trainer: pl.Trainer, h0: float) -> float:
        """Schedule the adaptive cadence's next estimate from ``h0`` (rank 0's, so every rank decides alike)."""
        h0 = float(trainer.strategy.broadcast(h0, src=0)) if trainer.world_size > 1 else h0
        return float(self._cadence.update(trainer.global_step, h0))

    def _check_preconditioning(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether ``pre_h0`` is measured with this optimiser; raises for ``pre_h0=True`` where it cannot be."""
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        on = isinstance(optimizer, _ADAM_TYPES) if self.pre_h0 is None else self.pre_h0
        if not on:
            return False
        name = type(self).__name__
        if type(optimizer) not in _PRECONDITIONED_TYPES:
            raise ValueError(
                f"{name}(pre_h0=True) needs torch.optim.SGD, Adam or AdamW (whose preconditioner P is known); got "
                f"{type(optimizer).__name__}. Use pre_h0=None (auto) or pre_h0=False."
            )
        try:
            ordered_parameters(optimizer, [p for _, p in trainable_parameters(pl_module)])
            stability_factor(optimizer)
        except ValueError as err:
            raise ValueError(f"{name}(pre_h0=True): {err} Pass pre_h0=False to measure h0 alone.") from err
        return True

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, measured: tuple) -> dict[str, float]:
        """h0 and the top k, then ``pre_h0`` and the batch sharpness on the same operator."""
        p = self.prefix
        lr = current_lr(trainer)
        with self._operator(pl_module, *measured) as op:
            result = self._tracker.estimate(op)
            values = [float(v) for v in result.eigenvalues.detach().cpu()]
            h0 = values[0]
            metrics = {
                f"{p}/h0": finite_or_nan(h0),
                f"{p}/inv_h0": finite_or_nan(1.0 / h0) if h0 != 0 else float("nan"),
            }
            for i in range(1, len(values)):
                metrics[f"{p}/h{i}"] = finite_or_nan(values[i])
            metrics[f"{p}/stability"] = finite_or_nan(lr * h0)
            metrics[f"{p}/num_hvps"] = float(result.num_hvps)
            metrics["optim/lr"] = lr
            if self._cadence is not None:
                metrics[f"{p}/every_n_steps"] = self._schedule(trainer, h0)
            if self._pre_on:
                metrics.update(self._measure_preconditioned(trainer, pl_module, op, h0, lr))
            if self.batch_sharpness and self._probe is None:
                metrics[f"{p}/batch_sharpness"] = finite_or_nan(rayleigh_along_gradient(op))
        return metrics

    def _measure_preconditioned(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, op: HessianOperator, h0: float, lr: float
    ) -> dict[str, float]:
        """``pre_h0`` = λ1(P⁻¹H) and ``pre_stability``; SGD: P = I, so ``pre_h0`` is h0 (no second solve)."""
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, _ADAM_TYPES):
            params = [q for _, q in trainable_parameters(pl_module)]
            diagonal = step_preconditioner(optimizer, params, dtype=op.dtype, device=op.device)
            result = self._pre_tracker.estimate(PreconditionedOperator(op, diagonal))
            pre_h0, hvps = float(result.eigenvalues[0]), int(result.num_hvps)
        else:
            pre_h0, hvps = h0, 0
        p = self.prefix
        return {
            f"{p}/pre_h0": finite_or_nan(pre_h0),
            f"{p}/pre_stability": finite_or_nan(lr * pre_h0 / stability_factor(optimizer)),
            f"{p}/pre_num_hvps": float(hvps),
        }

    def _operator(self, pl_module: pl.LightningModule, loss_fn: Any, batch: Any, rng: dict) -> HessianOperator:
        return measurement_operator(pl_module, loss_fn, batch, rng, self.hvp, self.dtype)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self._tracker.state_dict(),
            "pre_tracker": self._pre_tracker.state_dict(),
            "probe": None if self._probe is None else self._probe.state_dict(),
            "last_step": self._last_step,
            "cadence": None if self._cadence is None else self._cadence.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._tracker.load_state_dict(state_dict["tracker"])
        if "pre_tracker" in state_dict:
            self._pre_tracker.load_state_dict(state_dict["pre_tracker"])
        elif state_dict.get("pre_vector") is not None:  # a checkpoint of an earlier release
            self._pre_tracker.eigenvectors = state_dict["pre_vector"].clone()
        if self._probe is not None and state_dict.get("probe") is not None:
            self._probe.load_state_dict(state_dict["probe"])
        self._last_step = state_dict.get("last_step")
        if self._cadence is not None and state_dict.get("cadence") is not None:
            self._cadence.load_state_dict(state_dict["cadence"])
