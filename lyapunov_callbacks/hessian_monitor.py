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
    StepMicroBatches,
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
from lyapunov_callbacks._state import preserved_state, restore_rng
from lyapunov_callbacks.eigen import (
    METHODS,
    EigenResult,
    check_gap_safety,
    lanczos,
    lyapunov_iteration,
    power_iteration,
)
from lyapunov_callbacks.hessian import BACKENDS, HessianOperator, trainable_parameters
from lyapunov_callbacks.preconditioned import PreconditionedOperator, preconditioner_diagonal
from lyapunov_callbacks.stability import batch_sharpness as rayleigh_along_gradient
from lyapunov_callbacks.stability import stability_factor
from lyapunov_callbacks.tangent import ordered_parameters
from lyapunov_callbacks.tensorboard_layout import add_paper_layout

__all__ = ["HessianEigenvalueMonitor"]

_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)
_PRECONDITIONED_TYPES = (torch.optim.SGD, *_ADAM_TYPES)

class HessianEigenvalueMonitor(Callback):
    r"""Log the top Hessian eigenvalue h0 of the training loss (and the top ``k``) every ``every_n_steps`` steps.

    At every optimiser step with ``trainer.global_step % every_n_steps == 0`` the monitor estimates, in
    ``on_before_optimizer_step`` — i.e. at the pre-step weights θ_t, just before the step is taken, with the
    learning rate α that step uses whatever the callback order and the schedulers — the top
    eigenvalues :math:`h_0 \ge h_1 \ge \dots` of :math:`H = \nabla^2_\theta L(\theta_t; B)` where :math:`L` is
    the mean training loss (``model.training_loss(batch)``, see below) of the batch :math:`B`:
    the batch of the step (``batch="current"``; with ``accumulate_grad_batches = k`` the loss the step optimises,
    the mean of its ``k`` micro-batch losses, each with the dropout masks of its training forward) or a fixed
    probe batch drawn once from the training set (``batch="fixed"``: values comparable across steps). Each
    estimate is warm-started from the previous eigenvectors (for ``k=1`` and Lanczos, from the top Ritz vector of
    the span of ``y0`` and ``y1``, the last estimate's top two Ritz vectors: two HVPs, so that an estimate made
    after h0 and h1 swapped does not stop on h1), so it typically costs a handful of Hessian-vector products
    (HVPs, ~2-3 forward+backward each); it stops when the rigorous residual bound or the gap estimate
    ``residual²/gap`` (safety factor ``gap_safety``, default 10) meets ``tol``.
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
    - ``{prefix}/num_hvps``: HVPs spent on this estimate; ``optim/lr``: α (shared by all callbacks);
    - ``{prefix}/pre_h0`` (``pre_h0`` on; by default with ``torch.optim.Adam`` / ``AdamW``): the preconditioned
      sharpness :math:`\lambda_1(P^{-1}H)`, :math:`P = \mathrm{diag}(\sqrt{\hat v} + \epsilon)` from the
      optimiser's current state (v̂ the bias-corrected ``exp_avg_sq``, or ``max_exp_avg_sq`` under ``amsgrad``:
      the denominator of the last step; ε and β2 per param group), computed as the top eigenvalue of the
      symmetric :math:`P^{-1/2} H P^{-1/2}` (same eigenvalues) by the monitor's solver, warm-started from its
      own last eigenvector; :math:`P = I` for SGD (then ``pre_h0`` = h0, with no second solve). Not logged at
      a step where Adam has no state yet (the first step). ``{prefix}/pre_num_hvps``: the HVPs it took;
    - ``{prefix}/pre_stability``: :math:`\alpha\,\lambda_1(P^{-1}H)/c` with the optimiser's stability
      factor :math:`c` (:func:`~lyapunov_callbacks.stability.stability_factor`): :math:`(1+\beta_1)/(1-\beta_1)`
      for Adam, so it is :math:`\alpha\lambda_1(P^{-1}H)(1-\beta_1)/(1+\beta_1)`; 1 for plain SGD (then it is
      ``stability``), :math:`1+\mu` for heavy-ball momentum. Its edge is at 2 for every optimiser, as α·h0's is
      for plain SGD (Cohen et al. 2022: Adam with P frozen is stable on a quadratic iff it is < 2);
    - ``{prefix}/batch_sharpness`` (opt-in, ``batch_sharpness=True``): :math:`g^\top H_B g / \lVert g\rVert^2`
      on the step's own batch B with its gradient g (one HVP; with ``batch="fixed"`` it still uses the step's
      batch, at the cost of one more gradient graph), the quantity Andreyev & Beneventano (2024) find at 2/α
      under mini-batch SGD.

    Several monitors run together (e.g. ``k=1`` every 5 steps and ``k=14`` every 100, or a second one with
    ``batch="fixed", prefix="hessian_probe"``): each has its own :attr:`state_key` and checkpoint state; give
    each a distinct ``prefix`` to keep their tags apart. Every ``fit`` starts from a clean state (no warm start
    carried over from an earlier fit) unless the callback state is restored from a checkpoint.

    Under ``Trainer(fast_dev_run=...)`` each estimate is capped at a handful of HVPs (the code path runs, the
    values are not converged); an info message says so.

    **Cost of pre_h0.** It is a second eigen-solve on its own operator: one more gradient graph build and
    the HVPs of a warm-started estimate of :math:`P^{-1/2}HP^{-1/2}` (about as many as h0's), so a measurement
    with ``pre_h0`` costs about twice one without (``benchmarks/adam_overhead.py``). It is on by default for
    Adam/AdamW because there the plain h0's edge 2/α says nothing about stability and ``pre_stability`` is the
    quantity to watch; pass ``pre_h0=False`` to measure h0 alone. For SGD it is free (P = I) and off by default.

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
        pre_h0: log ``pre_h0`` and ``pre_stability``: ``None`` (default) = on for ``torch.optim.Adam`` /
            ``AdamW``, off otherwise; ``True`` = on (SGD, Adam or AdamW); ``False`` = off.
        batch_sharpness: log ``batch_sharpness`` (default False; one more HVP per measurement).
        gap_safety: safety factor of the gap rule by which a warm-started Lanczos estimate may stop (default 10,
            ``>= 1``): it stops once the error estimate ``residual²/gap`` is at most ``tol·|h0| / gap_safety`` (or
            the rigorous residual bound holds). A smaller factor takes fewer HVPs and trusts the gap the
            iteration sees more: where h0 and h1 lie within a few percent, it stops on h1 more often (still
            within ``tol`` of an eigenvalue; ``tests/test_hessian_monitor.py`` has such a step, 3.1 % low with
            factor 1, within 3.6e-4 with 10). ``benchmarks/monitor_overhead.py`` measures the HVPs and the
            error against a cold reference for the default and for 1.

    Raises:
        ValueError: on any invalid argument above (the message names the parameter); at fit start, with manual
            optimisation, several optimisers or a torch.compile'd module on PyTorch < 2.6; with ``pre_h0=True`` and an
            optimiser other than SGD/Adam/AdamW, param groups that differ in ``betas[0]`` (Adam) or momentum
            (SGD), or trainable parameters the optimiser does not update.

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
        pre_h0: bool | None = None,
        batch_sharpness: bool = False,
        gap_safety: float = 10.0,
    ) -> None:
        super().__init__()
        self.prefix = check_prefix(prefix)
        self.prog_bar = bool(prog_bar)
        for name, value in (("pre_h0", pre_h0), ("batch_sharpness", batch_sharpness)):
            if not (isinstance(value, bool) or (name == "pre_h0" and value is None)):
                allowed = "None, True or False" if name == "pre_h0" else "True or False"
                raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
        self.pre_h0 = pre_h0
        self.batch_sharpness = batch_sharpness
        check_int("every_n_steps", every_n_steps, "every_n_steps=10")
        check_int("k", k, "k=1 (h0 alone)")
        check_choice("method", method, METHODS)
        check_choice("hvp", hvp, BACKENDS)
        check_choice("batch", batch, BATCHES)
        check_int("probe_size", probe_size, "probe_size=256")
        check_positive("tol", tol, "tol=1e-2")
        check_int("max_iter", max_iter, "max_iter=100")
        check_gap_safety(gap_safety)
        estimate_dtype = resolve_dtype(dtype)
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
        self._pre_on = self._check_preconditioning(trainer, pl_module)
        if self.prefix == "hessian":
            add_paper_layout(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or step == self._last_step:
            self._micro.clear()
            return
        self._micro.add(step, batch)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        micro = self._micro.take(step)
        if micro is None:
            return
        self._last_step = step
        self._measure(trainer, pl_module, micro, step)

    # ---------------------------------------------------------------------------------------------- helpers
    def _reset(self) -> None:
        """Forget everything measured: a fresh warm start, probe draw and step bookkeeping."""
        self._tracker = EigenTracker(
            method=self.method, hvp=self.hvp, k=self.k, tol=self.tol, max_iter=self.max_iter, seed=self.seed,
            warm_start=self.warm_start, dtype=self.dtype, two_vector_start=True, gap_safety=self.gap_safety,
        )
        self._probe = ProbeBatch(size=self.probe_size, seed=self.seed) if self.batch == "fixed" else None
        self._last_step: int | None = None  # global step of the last measurement (one per optimiser step)
        self._micro = StepMicroBatches()  # the micro-batches of the step to measure
        self._pre_vector: torch.Tensor | None = None  # warm start of the pre_h0 solve (eigenvector of P^-½HP^-½)
        self._pre_on = False

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
        if self._pre_on or self.batch_sharpness:
            with preserved_state(pl_module, copy_tensors=False):
                metrics.update(self._measure_extra(trainer, pl_module, loss_fn, batch, rng, micro, h0, lr))
        self.last_metrics = metrics
        log_measurements(trainer, pl_module, metrics, step, prog_bar=(f"{p}/h0",) if self.prog_bar else ())

    def _measure_extra(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: Any, batch: Any, rng: dict,
        micro: list[tuple[Any, dict]], h0: float, lr: float,
    ) -> dict[str, float]:
        """``pre_h0``/``pre_stability`` on the measured batch and ``batch_sharpness`` on the step's batch."""
        p, out = self.prefix, {}
        optimizer = trainer.optimizers[0]
        params = [q for _, q in trainable_parameters(pl_module)]
        adam = isinstance(optimizer, _ADAM_TYPES)
        op = None
        try:
            diagonal = None
            if self._pre_on and adam:
                full = params[0].dtype if params[0].dtype in (torch.float32, torch.float64) else torch.float32
                diagonal = preconditioner_diagonal(optimizer, params, dtype=self.dtype or full)
            if diagonal is not None or (self.batch_sharpness and self._probe is None):
                op = self._operator(pl_module, loss_fn, batch, rng)
            if self._pre_on:
                if not adam:  # SGD: P = I, λ1(P⁻¹H) is h0 itself
                    pre_h0, hvps = h0, 0
                elif diagonal is None:  # Adam before its first step: no v, no P yet
                    pre_h0, hvps = None, 0
                else:
                    res = self._solve_preconditioned(PreconditionedOperator(op, diagonal))
                    pre_h0, hvps = float(res.eigenvalues[0]), int(res.num_hvps)
                if pre_h0 is not None:
                    out[f"{p}/pre_h0"] = finite_or_nan(pre_h0)
                    out[f"{p}/pre_stability"] = finite_or_nan(lr * pre_h0 / stability_factor(optimizer))
                    out[f"{p}/pre_num_hvps"] = float(hvps)
            if self.batch_sharpness:
                if self._probe is not None:  # the probe batch is measured above; this is on the step's own batch
                    if op is not None:
                        op.close()
                    if len(micro) == 1:
                        step_loss, (step_batch, step_rng) = self._loss_fn, micro[0]
                    else:
                        step_loss = MeanLoss(self._loss_fn, [r for _, r in micro])
                        step_batch, step_rng = [b for b, _ in micro], micro[0][1]
                    op = self._operator(pl_module, step_loss, step_batch, step_rng)
                out[f"{p}/batch_sharpness"] = finite_or_nan(rayleigh_along_gradient(op))
        finally:
            if op is not None:
                op.close()
        return out

    def _operator(self, pl_module: pl.LightningModule, loss_fn: Any, batch: Any, rng: dict) -> HessianOperator:
        restore_rng(rng)  # the operator captures the RNG: the training forward's dropout masks
        with torch.enable_grad():
            return HessianOperator(pl_module, loss_fn, batch, backend=self.hvp, dtype=self.dtype, snapshot=False)

    def _solve_preconditioned(self, op: PreconditionedOperator) -> EigenResult:
        """Top eigenpair of P^-½HP^-½ by the monitor's method, warm-started from the last one."""
        init = self._pre_vector if (self.warm_start and self._pre_vector is not None) else None
        if init is not None:
            init = init.to(device=op.device, dtype=op.dtype)
        kw = dict(k=1, tol=self.tol, max_iter=self._tracker.max_iter, init=init, seed=self.seed + 1)
        if self.method == "lanczos":
            res = lanczos(op, **kw)
        elif self.method == "power":
            res = power_iteration(op, **kw)
        else:
            res = lyapunov_iteration(op, **kw)
        if bool(torch.isfinite(res.eigenvalues).all()) and bool(torch.isfinite(res.eigenvectors).all()):
            self._pre_vector = res.eigenvectors.detach().clone()
        return res

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self._tracker.state_dict(),
            "probe": None if self._probe is None else self._probe.state_dict(),
            "last_step": self._last_step,
            "pre_vector": None if self._pre_vector is None else self._pre_vector.detach().cpu().clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._tracker.load_state_dict(state_dict["tracker"])
        if self._probe is not None and state_dict.get("probe") is not None:
            self._probe.load_state_dict(state_dict["probe"])
        self._last_step = state_dict.get("last_step")
        pre_vector = state_dict.get("pre_vector")
        self._pre_vector = None if pre_vector is None else pre_vector.clone()
