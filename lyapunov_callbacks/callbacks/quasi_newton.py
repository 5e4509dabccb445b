"""The quasi-Newton learning rate: α = scale·c/h0, h0 the (preconditioned) Hessian's top eigenvalue measured online.

The decisions (warm-up, smoothing, clamps, growth limit, triggers, rejection) are
:class:`~lyapunov_callbacks.core.quasi_newton_rule.QuasiNewtonRule`'s; this module measures and wires them into
Lightning's hooks.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Optional, Union

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lyapunov_callbacks.callbacks._lightning import (
    BATCHES,
    ProbeBatch,
    StepLoss,
    StepMicroBatches,
    check_choice,
    check_int,
    check_positive,
    log_measurements,
    measurement_guard,
    measurement_operator,
    resolve_dtype,
    resolve_loss_fn,
    set_lr,
    step_loss,
)
from lyapunov_callbacks.callbacks._setup import (
    FAST_DEV_RUN_HVPS,
    HeldLearningRateMonitors,
    check_lr_owner,
    check_prefix,
    check_sharding,
    check_supported,
    check_tag_owners,
    fast_dev_run_budget,
    run_first,
)
from lyapunov_callbacks.callbacks.tensorboard_layout import add_paper_layout, log_hessian_curves
from lyapunov_callbacks.core.eigen import METHODS
from lyapunov_callbacks.core.hessian import BACKENDS, backend_class, trainable_parameters
from lyapunov_callbacks.core.preconditioned import step_preconditioned
from lyapunov_callbacks.core.quasi_newton_rule import RULES, QuasiNewtonRule, check_sharpness_settings
from lyapunov_callbacks.core.stability import momentum_stability_factor
from lyapunov_callbacks.core.step_direction import directional_sharpness, step_direction
from lyapunov_callbacks.core.tracker import EigenTracker

__all__ = ["QuasiNewtonLR", "momentum_stability_factor"]

_ADAM = (torch.optim.Adam, torch.optim.AdamW)
#: The rule's state and settings, once read through the callback (deprecated aliases of ``QuasiNewtonLR.rule.*``).
_RULE_STATE = (
    "h0", "h0_smoothed", "lr", "warmup_done", "warmup_hvps", "rejected_estimates", "clamped_estimates",
    "num_estimates", "scale", "every_n_steps", "warmup_tol", "warmup_max_hvps", "smoothing", "min_lr", "max_lr",
    "edge", "max_lr_growth", "loss_rise", "rayleigh_every",
)


class QuasiNewtonLR(Callback):
    r"""Set the learning rate from the measured curvature: α = scale·c/h0 (SGD) or scale·c/λ1(P⁻¹H) (Adam).

    For plain SGD, h0 is the largest eigenvalue of the Hessian of the training loss at the current weights;
    gradient descent on curvature :math:`h` is stable for :math:`\alpha h < 2`, and :math:`\alpha = 1/h_0` is
    Newton's step along the sharpest direction, half the stability limit. Every decision — the warm-up at the
    initial weights, scheduled re-estimates ``every_n_steps`` steps after the last, the loss and Rayleigh
    triggers, smoothing, clamps, the growth limit ``max_lr_growth`` and the rejection of NaN/inf/≤ 0 estimates
    (the last good LR is kept, counted in ``{prefix}/rejected_estimates``, with one warning) — is made by a
    :class:`~lyapunov_callbacks.core.quasi_newton_rule.QuasiNewtonRule` (:attr:`rule`; its docstring has the
    maths); this callback measures, applies the LR and logs.

    The LR is set in ``on_before_optimizer_step``, at the pre-step weights after the step's backward, so the step
    about to be taken uses it; this callback runs first, and a ``LearningRateMonitor`` logs the LR each step used
    (the user guide's *QuasiNewtonLR in detail* says how).

    **Optimisers.** ``torch.optim.SGD``: :math:`c = 1`, or with ``momentum_aware=True`` the heavy-ball factor of
    :func:`~lyapunov_callbacks.core.stability.stability_factor` (:math:`1+\mu`, divided by :math:`1-\tau`
    with dampening :math:`\tau`; Nesterov :math:`(1+\mu)/(1+2\mu)`); the largest coupled ``weight_decay`` :math:`w` is added to h0. ``Adam`` /
    ``AdamW``: the curvature is the preconditioned sharpness :math:`\lambda_1(P^{-1}H)` (top eigenvalue of
    :math:`P^{-1/2}HP^{-1/2}`, :math:`P` the preconditioner of the coming step,
    :func:`~lyapunov_callbacks.core.preconditioned.step_preconditioner`) and :math:`c = (1+\beta_1)/(1-\beta_1)`;
    ``{prefix}/pre_h0`` is logged instead of ``{prefix}/h0``. Other optimisers are refused at fit start.

    **rule="batch_sharpness"**: α = scale/ŝ, ŝ the bias-corrected EMA (``sharpness_ema``) of
    :math:`s = d^\top \nabla^2 F\, d / \nabla F^\top d`, :math:`d` the direction the optimiser is about to move
    (the gradient for plain SGD, the new momentum buffer for heavy ball, :math:`\hat m/(\sqrt{\hat v}+\epsilon)`
    for Adam/AdamW), one HVP on the step's own batch per measured step; ``{prefix}/sharpness`` (the raw s) is logged
    instead of ``{prefix}/h0``. ``momentum_aware``, ``batch="fixed"``, ``smoothing`` and ``rayleigh_every`` do not
    apply and are refused. The derivations are in :mod:`lyapunov_callbacks.core.step_direction`; when to use which
    rule, and measurements of both, in ``docs/quasi-newton-rules.md``.

    **Measured loss.** The step's batch (``batch="current"``; with accumulation the mean of its micro-batch losses)
    or a probe batch drawn once (``batch="fixed"``). Under DDP rank 0's value is broadcast, so every rank sets the
    same LR. The first param group gets α; other groups keep their configured ratio to it.

    Logged at each estimate: ``{prefix}/lr``, ``optim/lr``, ``{prefix}/h0`` (SGD) or ``{prefix}/pre_h0`` (Adam),
    ``{prefix}/rejected_estimates``, ``{prefix}/clamped_estimates``, ``{prefix}/triggered_estimates``; at the
    warm-up ``{prefix}/warmup_hvps``. To the loggers only, unless a ``HessianEigenvalueMonitor`` with prefix
    ``"hessian"`` logs them itself: ``hessian/h0``, ``hessian/inv_h0`` and ``hessian/stability`` = α·h0 (SGD) or
    ``hessian/pre_h0`` and ``hessian/pre_stability`` = α·λ1(P⁻¹H)/c (Adam). The ratio is ``scale`` (×c with
    ``momentum_aware``; ×``edge`` under ``rule="edge"``) while h0 sets α, and departs from it where a clamp, the
    growth limit, ``smoothing`` or SGD's weight decay do.

    Args:
        scale: α = scale·c/h0; 1 is the quasi-Newton step, must be > 0.
        every_n_steps: scheduled re-estimate this many optimiser steps after the last estimate (≥ 1), or
            ``"auto"``: each interval chosen from the rate of change of h0 so that h0 is predicted to move by
            ``drift_tol`` until the next estimate, in ``[min_every, max_every]``
            (:class:`~lyapunov_callbacks.core.cadence.AdaptiveCadence`; the loss trigger still applies). The
            interval in use is logged as ``{prefix}/every_n_steps``.
        drift_tol: ``"auto"`` only: predicted relative change of h0 between two estimates (> 0), default 0.05.
        min_every: ``"auto"`` only: shortest interval in steps (≥ 1), default 10.
        max_every: ``"auto"`` only: longest interval in steps (≥ ``min_every``), default 200.
        method: eigen-solver, ``"lanczos"`` (default), ``"power"`` or ``"lyapunov"``.
        hvp: Hessian-vector products, ``"autograd"`` (exact) or ``"finite_difference"``.
        batch: ``"current"`` (the step's batch) or ``"fixed"`` (a probe batch drawn once).
        probe_size: size of the fixed probe batch (``batch="fixed"``), ≥ 1.
        tol: relative tolerance of each re-estimate (> 0, default 1e-2): the relative Ritz residual bound, so
            h0 is within ``tol`` relative of an eigenvalue (usually far closer).
        max_iter: HVP cap of each re-estimate (≥ 1).
        warmup_tol: relative tolerance of the warm-up (solver and consecutive estimates), > 0.
        warmup_max_hvps: HVP cap of the warm-up (≥ 1).
        smoothing: EMA factor ``s`` in ``[0, 1)`` for h0 (0: none); a rise of h0 is taken at once.
        min_lr: lower clamp of α (> 0).
        max_lr: upper clamp of α (≥ ``min_lr``), a safety net.
        momentum_aware: SGD with momentum: scale α by the heavy-ball stability factor.
        rule: ``"newton"`` (α·h0 = scale·c, default), ``"edge"`` (α·h0 = edge·scale·c) or
            ``"batch_sharpness"`` (see *rule="batch_sharpness"* above).
        edge: the target of ``rule="edge"``, in (0, 2); default 1.8.
        max_lr_growth: largest factor (> 1) by which one estimate may raise the LR, default 2.
        loss_rise: relative loss rise (> 0) that triggers an estimate, default 1.0; ``None``: no loss trigger.
        loss_window: number of recent losses (≥ 1) whose mean is the loss trigger's reference, default 10.
        rayleigh_every: one-HVP Rayleigh check every this many steps (≥ 1); ``None`` (default): never.
        rayleigh_rise: relative rise (> 0) of the Rayleigh quotient over h0 that triggers, default 0.1.
        sharpness_ema: ``rule="batch_sharpness"``: EMA factor in [0, 1) of the measurement, default 0.9.
        warmup_steps: ``rule="batch_sharpness"``: measure at every step of the first ``warmup_steps`` (≥ 0)
            steps, then every ``every_n_steps``; default 0.
        seed: seed of the solver's random start vector and of the probe batch's indices.
        dtype: dtype of the estimate, ``None`` (the parameters', float32 under mixed precision),
            ``"float32"``/``"float64"`` or a ``torch.dtype``.
        prefix: tag prefix (default ``"quasi_newton"``).
        prog_bar: also show ``{prefix}/lr`` in the progress bar (default False).

    Raises:
        ValueError: at construction, for any argument out of the ranges above (the message names it). At fit
            start: an optimiser other than ``torch.optim.SGD``/``Adam``/``AdamW`` or one whose param groups
            have no ``lr``; Adam groups with different ``betas[0]``; with ``momentum_aware=True`` SGD groups of
            different momentum; a configured LR scheduler, several optimisers, manual optimisation, a
            torch.compile'd module on PyTorch < 2.6, or a first param group with ``lr <= 0`` when there are
            several groups. At setup: a second ``QuasiNewtonLR`` or a ``StochasticWeightAveraging`` (both set the
            LR: keep one LR owner), or another curvature callback with the same ``prefix``.

    Example::

        import lightning as L
        from lyapunov_callbacks import LyapunovExponentMonitor, QuasiNewtonLR

        trainer = L.Trainer(callbacks=[QuasiNewtonLR(every_n_steps=10), LyapunovExponentMonitor(window=20)])
        trainer.fit(model, datamodule)   # configure_optimizers returns SGD, Adam or AdamW, no scheduler
    """

    def __init__(
        self,
        scale: float = 1.0,
        every_n_steps: Union[int, Literal["auto"]] = 10,
        method: str = "lanczos",
        hvp: str = "autograd",
        batch: str = "current",
        probe_size: int = 256,
        tol: float = 1e-2,
        max_iter: int = 50,
        warmup_tol: float = 1e-3,
        warmup_max_hvps: int = 200,
        smoothing: float = 0.0,
        min_lr: float = 1e-5,
        max_lr: float = 10.0,
        momentum_aware: bool = False,
        rule: str = "newton",
        edge: float = 1.8,
        max_lr_growth: float = 2.0,
        loss_rise: Optional[float] = 1.0,
        loss_window: int = 10,
        rayleigh_every: Optional[int] = None,
        rayleigh_rise: float = 0.1,
        sharpness_ema: float = 0.9,
        warmup_steps: int = 0,
        seed: int = 0,
        dtype: Optional[Union[str, torch.dtype]] = None,
        prefix: str = "quasi_newton",
        prog_bar: bool = False,
        drift_tol: float = 0.05,
        min_every: int = 10,
        max_every: int = 200,
    ) -> None:
        super().__init__()
        self.prefix = check_prefix(prefix)
        self.prog_bar = bool(prog_bar)
        check_choice("method", method, METHODS)
        check_choice("hvp", hvp, BACKENDS)
        check_choice("batch", batch, BATCHES)
        check_choice("rule", rule, RULES)
        check_int("probe_size", probe_size, "probe_size=256")
        check_positive("tol", tol, "tol=1e-2")
        check_int("max_iter", max_iter, "max_iter=50")
        self.dtype = resolve_dtype(dtype)
        # The rule validates and keeps its own settings (each message names the parameter).
        self._rule_settings = dict(
            rule=rule, scale=scale, edge=edge, every_n_steps=every_n_steps, warmup_tol=warmup_tol,
            warmup_max_hvps=warmup_max_hvps, smoothing=smoothing, min_lr=min_lr, max_lr=max_lr,
            max_lr_growth=max_lr_growth, loss_rise=loss_rise, loss_window=loss_window,
            rayleigh_every=rayleigh_every, rayleigh_rise=rayleigh_rise,
            drift_tol=drift_tol, min_every=min_every, max_every=max_every,
        )
        if rule == "batch_sharpness":
            check_sharpness_settings(batch, momentum_aware)
            self._rule_settings.update(sharpness_ema=sharpness_ema, warmup_steps=warmup_steps)
        self.rule = QuasiNewtonRule(**self._rule_settings)
        self.method = method
        self.hvp = hvp
        self.batch = batch
        self.probe_size = probe_size
        self.tol = float(tol)
        self.max_iter = max_iter
        self.momentum_aware = bool(momentum_aware)
        self.seed = int(seed)
        self._loss_fn = None
        # Set at fit start from the optimiser.
        self._adam = False
        self._configured_lr: Optional[float] = None
        self._group_ratios: list[float] = [1.0]
        self._lr_monitors = HeldLearningRateMonitors()
        self._hessian_tags = True
        self._reset()

    def __getattr__(self, name: str) -> Any:
        if name in _RULE_STATE and "rule" in self.__dict__:  # deprecated: the state and settings are the rule's
            warnings.warn(
                f"QuasiNewtonLR.{name} is deprecated; read QuasiNewtonLR.rule.{name} (the QuasiNewtonRule that "
                "decides the LR holds it).", DeprecationWarning, stacklevel=2,
            )
            return getattr(self.__dict__["rule"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def state_key(self) -> str:
        # The rule joins the key only where it is not the default, so checkpoints of the default rule keep theirs.
        rule = {} if self.rule.rule == "newton" else {"rule": self.rule.rule}
        return self._generate_state_key(
            prefix=self.prefix, scale=self.rule.scale, every_n_steps=self.rule.every_n_steps, method=self.method,
            batch=self.batch, **rule,
        )

    @property
    def total_hvps(self) -> int:
        """HVPs spent by this callback so far (warm-up and Rayleigh checks included)."""
        return self._tracker.total_hvps

    def _reset(self) -> None:
        """Forget every estimate: the next optimiser step runs the warm-up again."""
        self.rule = QuasiNewtonRule(**self._rule_settings)
        self._tracker = EigenTracker(
            method=self.method, k=1, tol=self.tol, max_iter=self.max_iter, seed=self.seed, warm_start=True
        )
        self._probe = ProbeBatch(size=self.probe_size, seed=self.seed) if self.batch == "fixed" else None
        self._warned_rejection = False
        self._micro = StepMicroBatches()  # the micro-batches of the current step
        self._loss = StepLoss()  # the step's mean loss, for the loss trigger

    # ---------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ---------------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_tag_owners(trainer, self)
            self._loss_fn = resolve_loss_fn(pl_module)
            run_first(trainer, self)
            self._lr_monitors.hold(trainer)
            self._hessian_tags = not any(
                type(c).__name__ == "HessianEigenvalueMonitor" and getattr(c, "prefix", None) == "hessian"
                for c in trainer.callbacks
            )
            # Lightning restores callback state after setup: a checkpoint overrides this clean start.
            self._reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_supported(trainer, pl_module, "QuasiNewtonLR")
        check_sharding(trainer, pl_module, "QuasiNewtonLR", hvp=self.hvp, method=self.method, dtype=self.dtype)
        optimizer = check_lr_owner(trainer)
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self._group_ratios = [lr / lrs[0] if len(set(lrs)) > 1 else 1.0 for lr in lrs]
        self._configured_lr = lrs[0]
        self._adam = type(optimizer) in _ADAM
        rule = self.rule
        warning = rule.configure_for(optimizer, self.momentum_aware)  # c and w; the direction's optimiser
        if warning:
            rank_zero_warn(warning)
        # Adam's warm-started estimates stop on the residual bound alone (P moves with v between estimates).
        self._tracker.stop = "residual" if self._adam else "gap"
        warmup_max_hvps = self._rule_settings["warmup_max_hvps"]
        rule.warmup_max_hvps = warmup_max_hvps
        self._tracker.max_iter = self.max_iter
        if fast_dev_run_budget(
            trainer, "QuasiNewtonLR", f"the warm-up and each re-estimate are capped at {FAST_DEV_RUN_HVPS} HVPs"
        ):
            rule.warmup_max_hvps = min(warmup_max_hvps, FAST_DEV_RUN_HVPS)
            self._tracker.max_iter = min(self.max_iter, FAST_DEV_RUN_HVPS)
        if rule.lr is None and rule.num_estimates == 0:
            rule.reset(initial_lr=self._configured_lr if self._configured_lr > 0 else None)
        add_paper_layout(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the optimiser state (restored after on_fit_start) holds the old LR: re-apply ours.
        if self.rule.warmup_done and self.rule.lr is not None:
            set_lr(trainer, self.rule.lr, self._group_ratios)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._micro.add(trainer.global_step, batch):
            self._loss.clear()
        if self.rule.warmup_done and self.rule.lr is not None:
            set_lr(trainer, self.rule.lr, self._group_ratios)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.rule.loss_rise is not None and self._micro.step == trainer.global_step:
            self._loss.add(loss)  # the loss trigger's input

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._set_lr_of_step(trainer, pl_module, optimizer)
        self._lr_monitors.release(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._lr_monitors.restore()

    def _set_lr_of_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Estimate when the rule asks for it and set the LR this step uses: collect → ask → apply → log."""
        step = trainer.global_step
        micro = self._micro.take(step)
        if micro is None:
            return
        loss = self._loss.take(trainer)  # None without a loss trigger (nothing was added)
        rule = self.rule
        was_warmup = not rule.warmup_done
        measured = self._measured(trainer, pl_module, micro)
        rayleigh = None
        if rule.wants_rayleigh(step):
            rayleigh = self._estimate(trainer, pl_module, optimizer, measured, rayleigh=True)
        estimated, h0 = False, float("nan")
        while rule.needs_estimate(step, loss=loss, rayleigh=rayleigh):
            tol, cap = (rule.warmup_tol, rule.warmup_hvps_left) if not rule.warmup_done else (self.tol, None)
            if rule.rule == "batch_sharpness":
                h0, hvps = self._directional_sharpness(trainer, pl_module, optimizer, measured)
            else:
                h0, hvps = self._estimate(trainer, pl_module, optimizer, measured, tol=tol, cap=cap)
            rule.update(h0, step, hvps=hvps)
            estimated = True
        if not estimated:
            return
        self._warn(h0, step, was_warmup)
        set_lr(trainer, rule.lr, self._group_ratios)
        metrics = {f"{self.prefix}/{name}": v for name, v in rule.log_values(h0, self._adam, was_warmup).items()}
        metrics["optim/lr"] = rule.lr
        log_measurements(trainer, pl_module, metrics, step, prog_bar=(f"{self.prefix}/lr",) if self.prog_bar else ())
        if self._hessian_tags and rule.rule != "batch_sharpness":  # the figure's curves, to the loggers only
            log_hessian_curves(trainer, h0, rule.lr, step, factor=rule.stability_factor if self._adam else None)

    # ---------------------------------------------------------------------------------------------------------
    # Checkpointing
    # ---------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The rule's state (h0, LR, warm-up, counters, loss history), warm-start vectors and probe indices."""
        return {
            "rule": self.rule.state_dict(),
            "warned_rejection": self._warned_rejection,
            "tracker": self._tracker.state_dict(),
            "probe": None if self._probe is None else self._probe.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: a resumed run keeps h0 and the LR and does not repeat the warm-up."""
        self.rule.load_state_dict(state_dict["rule"])
        self._warned_rejection = bool(state_dict.get("warned_rejection", False))
        self._tracker.load_state_dict(state_dict["tracker"])
        if self._probe is not None and state_dict.get("probe") is not None:
            self._probe.load_state_dict(state_dict["probe"])

    # ---------------------------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------------------------
    def _measured(self, trainer: pl.Trainer, pl_module: pl.LightningModule, micro: list) -> tuple[Any, Any, dict]:
        """``(loss_fn, batch, rng)`` of the measurement: the probe, the step's batch or its micro-batches' mean."""
        if self._probe is not None:
            return self._loss_fn, self._probe.get(trainer, pl_module), micro[0][1]
        return step_loss(self._loss_fn, micro)

    def _estimate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, measured: tuple,
        tol: float | None = None, cap: int | None = None, rayleigh: bool = False,
    ) -> Any:
        """``(h0, HVPs used)`` of a warm-started estimate — SGD's h0 or Adam's λ1(P⁻¹H) — or with ``rayleigh``
        the Rayleigh quotient of the last eigenvector (one HVP). Rank 0's value, so every rank decides alike."""
        # The operator never writes to the module's tensors: a guard without copies suffices.
        with measurement_guard(pl_module):
            with measurement_operator(pl_module, *measured, self.hvp, self.dtype) as op:
                target = op
                if self._adam:  # Adam's curvature is λ1(P⁻¹H), P of the coming step
                    target = step_preconditioned(op, optimizer, [p for _, p in trainable_parameters(pl_module)])
                if rayleigh:
                    value = self._tracker.rayleigh_quotient(target)
                    return None if value is None else float(trainer.strategy.broadcast(value, src=0))
                result = self._tracker.estimate(target, tol=tol, max_iter=cap)
        h0 = float(trainer.strategy.broadcast(float(result.eigenvalues[0]), src=0))
        return h0, int(result.num_hvps)

    def _directional_sharpness(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, measured: tuple
    ) -> tuple[float, int]:
        """``(s, HVPs)`` of ``rule="batch_sharpness"``: the step's curvature along its direction per unit slope
        (rank 0's value)."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        options = {}
        if backend_class(self.hvp).takes_gradient:  # the step's gradient (the all-rank mean under DDP) is ∇L(θ)
            options["gradient"] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        scales = self._group_ratios if len(self._group_ratios) == len(optimizer.param_groups) else None
        with measurement_guard(pl_module):
            with measurement_operator(pl_module, *measured, self.hvp, self.dtype, **options) as op:
                step = step_direction(optimizer, params, grads=grads, group_scales=scales, dtype=op.dtype)
                result = directional_sharpness(op, step)
        self._tracker.total_hvps += result.num_hvps
        return float(trainer.strategy.broadcast(result.sharpness, src=0)), result.num_hvps

    def _warn(self, h0: float, step: int, was_warmup: bool) -> None:
        rule = self.rule
        warning = rule.warmup_warning(h0) if was_warmup else None
        if warning and rule.warmup_max_hvps == self._rule_settings["warmup_max_hvps"]:  # not fast_dev_run's cap
            rank_zero_warn(warning)
        if not (math.isfinite(h0) and h0 > 0) and not self._warned_rejection:
            self._warned_rejection = True
            rank_zero_warn(
                f"QuasiNewtonLR rejected the h0 estimate {h0!r} at step {step} (NaN, infinite or <= 0: a "
                f"diverged loss or a concave region) and keeps lr={rule.lr:.6g}; further rejections are "
                f"counted in {self.prefix}/rejected_estimates without another warning."
            )
