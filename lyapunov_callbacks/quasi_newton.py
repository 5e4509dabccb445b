"""The quasi-Newton learning rate: α = scale·c/h0, h0 the (preconditioned) Hessian's top eigenvalue measured online.

The decisions (warm-up, smoothing, clamps, growth limit, triggers, rejection) are
:class:`~lyapunov_callbacks.quasi_newton_rule.QuasiNewtonRule`'s; this module wires them into Lightning's hooks.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_warn

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
    fast_dev_run_budget,
    finite_or_nan,
    log_measurements,
    resolve_dtype,
    resolve_loss_fn,
)
from lyapunov_callbacks._state import preserved_state, restore_rng
from lyapunov_callbacks.eigen import METHODS, EigenResult, lanczos, lyapunov_iteration, power_iteration
from lyapunov_callbacks.hessian import BACKENDS, HessianOperator
from lyapunov_callbacks.preconditioned import PreconditionedOperator, preconditioned_operator
from lyapunov_callbacks.quasi_newton_rule import RULES, QuasiNewtonRule
from lyapunov_callbacks.stability import adam_stability_factor, momentum_stability_factor

__all__ = ["QuasiNewtonLR", "momentum_stability_factor"]

_ADAM = (torch.optim.Adam, torch.optim.AdamW)


class QuasiNewtonLR(Callback):
    r"""Set the learning rate from the measured curvature: α = scale·c/h0 (SGD) or scale·c/λ1(P⁻¹H) (Adam).

    For plain SGD, h0 is the largest eigenvalue of the Hessian of the training loss at the current weights;
    gradient descent on curvature :math:`h` is stable for :math:`\alpha h < 2`, and :math:`\alpha = 1/h_0` is
    Newton's step along the sharpest direction with the margin of half the stability limit. Every decision —
    warm-up, smoothing, clamps, the growth limit, triggers, rejection of bad estimates, the stability factor
    :math:`c` — is made by a :class:`~lyapunov_callbacks.quasi_newton_rule.QuasiNewtonRule` (see it for the
    maths of ``rule="newton"`` / ``"edge"``); this callback measures, wires the rule into Lightning's hooks
    and logs.

    What happens when (all in ``on_before_optimizer_step``, at the pre-step weights, after the step's
    backward, so the step about to be taken uses the new LR):

    - **Warm-up** at the first optimiser step of a fit (also the first of a run resumed from a checkpoint
      without this callback's state): warm-started estimates at the initial weights, each to ``warmup_tol``,
      until two consecutive ones agree to ``warmup_tol`` relatively or ``warmup_max_hvps`` HVPs are spent
      (then a warning). Logged as ``{prefix}/warmup_hvps``.
    - **Scheduled** re-estimates ``every_n_steps`` steps after the last estimate, warm-started from the last
      eigenvector (a few HVPs, tolerance ``tol``).
    - **Triggered** re-estimates at once when the curvature has moved:

      * the **loss trigger** (``loss_rise``, on by default): the step's training loss (read in
        ``on_before_backward``, summed over the micro-batches, i.e. the mean loss the step optimises) rose
        above ``(1 + loss_rise)`` times its mean since the last estimate. Cost: no HVP; one device-to-host
        copy of the loss per step (and under DDP one all-reduce of that scalar, so every rank decides alike).
        A sharpening that makes the step unstable multiplies the loss at once, so it is answered at the next
        step: within 2 steps of the sharpening.
      * the **Rayleigh trigger** (``rayleigh_every``, off by default): every ``rayleigh_every`` steps one HVP
        gives :math:`v^\top H v` of the last eigenvector; a rise above ``(1 + rayleigh_rise)·h0`` triggers.
        Cost: one HVP per ``rayleigh_every`` steps.

    - **Every** training batch, in ``on_train_batch_start``, the param groups' ``lr`` are set from the current
      α (so the LR also holds right after a checkpoint resume). This callback moves itself to the front of
      ``trainer.callbacks`` at setup, so the monitors that read the LR in ``on_before_optimizer_step`` see the
      new one; a :class:`~lightning.pytorch.callbacks.LearningRateMonitor` (which logs at batch start, before
      the estimate) logs again at a step whose estimate changed the LR, so it shows the LR the step used.

    **The LR.** :math:`\alpha = \mathrm{clamp}(k\cdot\text{scale}\cdot c/(\bar h_0 + w),\ \text{min\_lr},
    \text{max\_lr})` with :math:`k = 1` (``rule="newton"``) or ``edge`` (``rule="edge"``), :math:`w` the
    largest coupled ``weight_decay`` of ``torch.optim.SGD``'s groups (it adds :math:`wI` to the curvature of
    the update map). One estimate raises α by at most ``max_lr_growth``× (a fall applies at once), so a
    collapsing h0 walks α up geometrically and ``max_lr`` is a safety net, not the operating point;
    ``{prefix}/clamped_estimates`` counts the estimates whose LR a clamp set.

    **Optimisers.**

    - ``torch.optim.SGD``: :math:`c = 1`, or with ``momentum_aware=True`` the heavy-ball factor
      :func:`~lyapunov_callbacks.stability.momentum_stability_factor` (:math:`1+\mu`; Nesterov
      :math:`(1+\mu)/(1+2\mu)`). With momentum and ``momentum_aware=False`` a warning says 1/h0 is the
      plain-SGD rule.
    - ``torch.optim.Adam`` / ``AdamW``: the measured curvature is the preconditioned sharpness
      :math:`\lambda_1(P^{-1}H)`, :math:`P = \mathrm{diag}(\sqrt{\hat v}+\epsilon)`, the top eigenvalue of the
      symmetric :math:`P^{-1/2}HP^{-1/2}`
      (:func:`~lyapunov_callbacks.preconditioned.preconditioned_operator`), and
      :math:`c = (1+\beta_1)/(1-\beta_1)` (:func:`~lyapunov_callbacks.stability.adam_stability_factor`):
      :math:`\alpha = \text{scale}\,(1+\beta_1)/((1-\beta_1)\lambda_1(P^{-1}H))`, half the frozen-P stability
      limit :math:`2(1+\beta_1)/((1-\beta_1)\lambda_1)`, the margin 1/h0 has for SGD (derivation in
      ``adam_stability_factor``). **Warm-up before Adam has state**: at the first step ``v`` does not exist
      yet; the warm-up uses :math:`P = \mathrm{diag}(|g| + \epsilon)` with :math:`g` the step's gradient
      (``.grad`` in ``on_before_optimizer_step``), i.e. :math:`\hat v_1 = g^2`, exactly what Adam's first
      step divides by. Later estimates use the optimiser's bias-corrected ``v``. Weight decay (coupled or
      decoupled) is left out of Adam's rule, as in ``adam_stability_factor``; ``momentum_aware`` is ignored
      (β1 is part of Adam's rule). ``{prefix}/pre_h0`` is logged instead of ``{prefix}/h0``.
    - Any other optimiser is refused at fit start.

    **Accumulation.** With ``accumulate_grad_batches = k`` the estimate is of the mean of the step's ``k``
    micro-batch losses (each with its training dropout masks), the loss the step optimises, as the monitors
    measure it.

    **Parameter groups.** α is the LR of the first param group; every other group ``i`` gets
    ``α · lr_i / lr_0`` with ``lr_i`` the LRs ``configure_optimizers`` gave them (one group, or groups of one
    LR: every group gets α).

    **Refits, resumes.** Every ``fit`` starts from a clean state (a new warm-up) unless this callback's state is
    restored from a checkpoint (:attr:`state_key` identifies it).

    **fast_dev_run.** The warm-up and each re-estimate are capped at a handful of HVPs (the code path runs; h0
    is not converged); an info message says so.

    **Safety.** An estimate that is NaN, infinite or :math:`\le 0` never reaches the optimiser: the last good LR
    is kept (before the first good estimate: the optimiser's configured LR, clamped), counted in
    ``{prefix}/rejected_estimates``, with one warning.

    **Distributed.** The HVPs are all-reduced, so every rank computes the same h0 of the Hessian of the mean
    loss over all shards; the value used is also broadcast from rank 0 and the loss of the trigger is the
    all-rank mean, so every rank takes the same decisions and sets the same LR on every step.

    Logged at each estimate (``trainer.callback_metrics`` and every logger, at the measured step):
    ``{prefix}/lr``, ``optim/lr`` (the same α), ``{prefix}/h0`` (SGD; the raw estimate, NaN or ≤ 0 when
    rejected) or ``{prefix}/pre_h0`` (Adam: λ1(P⁻¹H)), ``{prefix}/rejected_estimates``, ``{prefix}/clamped_estimates``,
    ``{prefix}/triggered_estimates`` (loss and Rayleigh triggers so far); at the warm-up also
    ``{prefix}/warmup_hvps``. To the loggers only (the figure's curves) also ``hessian/h0`` and
    ``hessian/inv_h0`` (SGD) or ``hessian/pre_h0`` (Adam), unless a ``HessianEigenvalueMonitor`` with prefix
    ``"hessian"`` runs too (it logs those tags itself).

    Cost: the warm-up (typically 10–40 HVPs, one HVP ≈ 2.5–3.3 forward+backward passes), a few HVPs per
    scheduled or triggered estimate, plus the triggers' costs above.

    Args:
        scale: α = scale·c/h0; 1 is the quasi-Newton step, must be > 0.
        every_n_steps: scheduled re-estimate this many optimiser steps after the last estimate (≥ 1).
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
        rule: ``"newton"`` (α·h0 = scale·c, default) or ``"edge"`` (α·h0 = edge·scale·c).
        edge: the target of ``rule="edge"``, in (0, 2); default 1.8.
        max_lr_growth: largest factor (> 1) by which one estimate may raise the LR, default 2.
        loss_rise: relative loss rise (> 0) that triggers an estimate, default 1.0; ``None``: no loss trigger.
        loss_window: number of recent losses (≥ 1) whose mean is the loss trigger's reference, default 10.
        rayleigh_every: one-HVP Rayleigh check every this many steps (≥ 1); ``None`` (default): never.
        rayleigh_rise: relative rise (> 0) of the Rayleigh quotient over h0 that triggers, default 0.1.
        seed: seed of the solver's random start vector and of the probe batch's indices.
        dtype: dtype of the estimate, ``None`` (the parameters', float32 under mixed precision),
            ``"float32"``/``"float64"`` or a ``torch.dtype``.
        prefix: tag prefix (default ``"quasi_newton"``).
        prog_bar: also show ``{prefix}/lr`` in the progress bar (default False).

    Raises:
        ValueError: at construction, for any argument out of the ranges above (the message names it). At fit
            start: an optimiser other than ``torch.optim.SGD``/``Adam``/``AdamW`` or one whose param groups
            have no ``lr``; Adam groups with different ``betas[0]``; with ``momentum_aware=True`` SGD with
            dampening or groups of different momentum; a configured LR scheduler, several optimisers, manual
            optimisation, a torch.compile'd module on PyTorch < 2.6, or a first param group with ``lr <= 0`` when there are
            several groups.

    Example::

        import lightning as L
        from lyapunov_callbacks import LyapunovExponentMonitor, QuasiNewtonLR

        trainer = L.Trainer(callbacks=[QuasiNewtonLR(every_n_steps=10), LyapunovExponentMonitor(window=20)])
        trainer.fit(model, datamodule)   # configure_optimizers returns SGD, Adam or AdamW, no scheduler
    """

    def __init__(
        self,
        scale: float = 1.0,
        every_n_steps: int = 10,
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
        seed: int = 0,
        dtype: Optional[Union[str, torch.dtype]] = None,
        prefix: str = "quasi_newton",
        prog_bar: bool = False,
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
        if not isinstance(min_lr, (int, float)) or isinstance(min_lr, bool) or not min_lr > 0:
            raise ValueError(f"`min_lr` must be > 0, got {min_lr!r}; use e.g. min_lr=1e-5.")
        if isinstance(max_lr, (int, float)) and not isinstance(max_lr, bool) and max_lr < min_lr:
            raise ValueError(
                f"`min_lr` ({min_lr!r}) must not exceed `max_lr` ({max_lr!r}); raise max_lr or lower min_lr."
            )
        self.dtype = resolve_dtype(dtype)
        # The rule validates its own settings (each message names the parameter).
        self._rule_settings = dict(
            rule=rule, scale=scale, edge=edge, every_n_steps=every_n_steps, warmup_tol=warmup_tol,
            warmup_max_hvps=warmup_max_hvps, smoothing=smoothing, min_lr=min_lr, max_lr=max_lr,
            max_lr_growth=max_lr_growth, loss_rise=loss_rise, loss_window=loss_window,
            rayleigh_every=rayleigh_every, rayleigh_rise=rayleigh_rise,
        )
        QuasiNewtonRule(**self._rule_settings)

        self.scale = float(scale)
        self.every_n_steps = every_n_steps
        self.method = method
        self.hvp = hvp
        self.batch = batch
        self.tol = float(tol)
        self.max_iter = max_iter
        self.warmup_tol = float(warmup_tol)
        self.warmup_max_hvps = warmup_max_hvps
        self.smoothing = float(smoothing)
        self.min_lr = float(min_lr)
        self.max_lr = float(max_lr)
        self.momentum_aware = bool(momentum_aware)
        self.rule_name = rule
        self.edge = float(edge)
        self.max_lr_growth = float(max_lr_growth)
        self.loss_rise = loss_rise
        self.rayleigh_every = rayleigh_every
        self.seed = int(seed)
        self.probe_size = probe_size
        self._loss_fn = None
        # Set at fit start from the optimiser.
        self._adam = False
        self._configured_lr: Optional[float] = None
        self._group_ratios: list[float] = [1.0]
        self._lr_monitors: list[LearningRateMonitor] = []
        self._hessian_tags = True
        self._reset()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            prefix=self.prefix, scale=self.scale, every_n_steps=self.every_n_steps, method=self.method, batch=self.batch
        )

    def _reset(self) -> None:
        """Forget every estimate: the next optimiser step runs the warm-up again."""
        self.rule = QuasiNewtonRule(**self._rule_settings)
        self._tracker = EigenTracker(
            method=self.method, hvp=self.hvp, k=1, tol=self.tol, max_iter=self.max_iter, seed=self.seed,
            warm_start=True, dtype=self.dtype,
        )
        self._probe = ProbeBatch(size=self.probe_size, seed=self.seed) if self.batch == "fixed" else None
        self._warned_rejection = False
        self._micro = StepMicroBatches()  # the micro-batches of the current step
        self._loss_sum: Optional[torch.Tensor] = None

    # The rule's state, under the names this callback has always had.
    @property
    def h0(self) -> Optional[float]:
        """The last good (raw) estimate: h0 (SGD) or λ1(P⁻¹H) (Adam)."""
        return self.rule.h0

    @property
    def h0_smoothed(self) -> Optional[float]:
        return self.rule.h0_smoothed

    @property
    def lr(self) -> Optional[float]:
        """The LR of the first param group from the last estimate on."""
        return self.rule.lr

    @property
    def warmup_done(self) -> bool:
        return self.rule.warmup_done

    @property
    def warmup_hvps(self) -> int:
        return self.rule.warmup_hvps

    @property
    def rejected_estimates(self) -> int:
        return self.rule.rejected_estimates

    @property
    def clamped_estimates(self) -> int:
        return self.rule.clamped_estimates

    @property
    def num_estimates(self) -> int:
        """Estimates so far, each warm-up estimate counted."""
        return self.rule.num_estimates

    @property
    def total_hvps(self) -> int:
        """HVPs spent by this callback so far (warm-up and Rayleigh checks included)."""
        return self._tracker.total_hvps

    # ---------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ---------------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._loss_fn = resolve_loss_fn(pl_module)
            _move_first(trainer, self)
            self._lr_monitors = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
            self._hessian_tags = not any(
                type(c).__name__ == "HessianEigenvalueMonitor" and getattr(c, "prefix", None) == "hessian"
                for c in trainer.callbacks
            )
            # Lightning restores callback state after setup: a checkpoint overrides this clean start.
            self._reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_supported(trainer, pl_module, "QuasiNewtonLR")
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
        if not (isinstance(optimizer, torch.optim.SGD) or type(optimizer) in _ADAM):
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
        self._group_ratios = [lr / lrs[0] if len(set(lrs)) > 1 else 1.0 for lr in lrs]
        self._configured_lr = lrs[0]
        self._adam = type(optimizer) in _ADAM
        rule = self.rule
        rule.stability_factor = self._adam_factor(optimizer) if self._adam else self._momentum_factor(optimizer)
        rule.weight_decay = (
            max(float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups) if not self._adam else 0.0
        )
        rule.warmup_max_hvps = self.warmup_max_hvps
        self._tracker.max_iter = self.max_iter
        if fast_dev_run_budget(
            trainer, "QuasiNewtonLR", f"the warm-up and each re-estimate are capped at {FAST_DEV_RUN_HVPS} HVPs"
        ):
            rule.warmup_max_hvps = min(self.warmup_max_hvps, FAST_DEV_RUN_HVPS)
            self._tracker.max_iter = min(self.max_iter, FAST_DEV_RUN_HVPS)
        if rule.lr is None and rule.num_estimates == 0:
            rule.reset(initial_lr=self._configured_lr if self._configured_lr > 0 else None)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the optimiser state (restored after on_fit_start) holds the old LR: re-apply ours.
        if self.rule.warmup_done and self.lr is not None:
            self._apply_lr(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._micro.add(trainer.global_step, batch):
            self._loss_sum = None
        if self.rule.warmup_done and self.lr is not None:
            self._apply_lr(trainer)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # Lightning passes each micro-batch loss divided by accumulate_grad_batches: the sum is the step's mean.
        if self.rule.loss_rise is None or self._micro.step != trainer.global_step:
            return
        value = loss.detach().float()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        micro = self._micro.take(step)
        if micro is None:
            return
        loss = self._step_loss(trainer)
        rule = self.rule
        before = rule.lr
        measured = None
        rayleigh = None
        if rule.wants_rayleigh(step):
            measured = self._measure_input(trainer, pl_module, micro)
            rayleigh = self._rayleigh(trainer, pl_module, optimizer, measured)
        extra: dict[str, float] = {}
        estimated, h0 = False, float("nan")
        was_warmup = not rule.warmup_done
        while rule.needs_estimate(step, loss=loss, rayleigh=rayleigh):
            if measured is None:
                measured = self._measure_input(trainer, pl_module, micro)
            warm = not rule.warmup_done
            tol, cap = (self.warmup_tol, rule.warmup_hvps_left) if warm else (self.tol, self._tracker.max_iter)
            h0, hvps = self._estimate(pl_module, optimizer, measured, tol, cap)
            # Every rank must take the same decision: use rank 0's value (identical anyway with all-reduced HVPs).
            h0 = float(trainer.strategy.broadcast(h0, src=0))
            rule.update(h0, step, hvps=hvps)
            estimated = True
        if not estimated:
            return
        if was_warmup:
            extra[f"{self.prefix}/warmup_hvps"] = float(rule.warmup_hvps)
            if not rule.warmup_converged and math.isfinite(h0) and rule.warmup_max_hvps == self.warmup_max_hvps:
                rank_zero_warn(
                    f"QuasiNewtonLR: the warm-up used warmup_max_hvps={self.warmup_max_hvps} HVPs before h0 was "
                    f"stable to warmup_tol={self.warmup_tol} (last estimate {h0:.6g}); training starts with it. "
                    "Raise warmup_max_hvps or warmup_tol."
                )
        if not (math.isfinite(h0) and h0 > 0) and not self._warned_rejection:
            self._warned_rejection = True
            rank_zero_warn(
                f"QuasiNewtonLR rejected the h0 estimate {h0!r} at step {step} (NaN, infinite or <= 0: a "
                f"diverged loss or a concave region) and keeps lr={rule.lr:.6g}; further rejections are "
                f"counted in {self.prefix}/rejected_estimates without another warning."
            )
        self._apply_lr(trainer)
        self._log(trainer, pl_module, h0, step, extra)
        if rule.lr != before:
            self._relog_lr_monitors(trainer)

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
    def _adam_factor(self, optimizer: torch.optim.Optimizer) -> float:
        betas = {float(g["betas"][0]) for g in optimizer.param_groups}
        if len(betas) > 1:
            raise ValueError(
                f"QuasiNewtonLR with {type(optimizer).__name__} needs one beta1 for all param groups, got "
                f"{sorted(betas)}; use the same betas in every group."
            )
        return adam_stability_factor(betas.pop())

    def _momentum_factor(self, optimizer: torch.optim.Optimizer) -> float:
        groups = optimizer.param_groups
        momenta = [float(g.get("momentum", 0.0) or 0.0) for g in groups]
        if not self.momentum_aware:
            if any(m > 0 for m in momenta):
                rank_zero_warn(
                    f"QuasiNewtonLR: the optimiser uses momentum {max(momenta)}, but 1/h0 is the plain-SGD rule; "
                    "pass momentum_aware=True for α = (1+μ)/h0 (half the heavy-ball stability limit 2(1+μ)/h0)."
                )
            return 1.0
        if len(set(momenta)) != 1 or len({bool(g.get("nesterov", False)) for g in groups}) != 1:
            raise ValueError(
                "momentum_aware=True needs the same momentum and nesterov in every param group; got momenta "
                f"{momenta}. Use one momentum for all groups or momentum_aware=False."
            )
        if any(float(g.get("dampening", 0.0) or 0.0) != 0.0 for g in groups):
            raise ValueError(
                "momentum_aware=True assumes dampening=0 (heavy-ball m ← μm + g); set dampening=0 in the "
                "optimiser or momentum_aware=False."
            )
        return momentum_stability_factor(momenta[0], nesterov=bool(groups[0].get("nesterov", False)))

    def _step_loss(self, trainer: pl.Trainer) -> Optional[float]:
        """The mean training loss of the step (all ranks' mean under DDP), or ``None`` without a loss trigger."""
        total, self._loss_sum = self._loss_sum, None
        if total is None or self.rule.loss_rise is None:
            return None
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="mean")
        return float(total)

    def _measure_input(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, micro: list[tuple[Any, dict]]
    ) -> tuple[Any, Any, dict]:
        """``(loss_fn, batch, rng)`` of the measurement: the probe, the step's batch or its micro-batches' mean."""
        if self._loss_fn is None:
            self._loss_fn = resolve_loss_fn(pl_module)
        if self._probe is not None:
            return self._loss_fn, self._probe.get(trainer, pl_module), micro[0][1]
        if len(micro) == 1:
            return self._loss_fn, micro[0][0], micro[0][1]
        return MeanLoss(self._loss_fn, [r for _, r in micro]), [b for b, _ in micro], micro[0][1]

    def _estimate(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, measured: tuple, tol: float, cap: int
    ) -> tuple[float, int]:
        """``(h0, HVPs used)``: SGD's h0 or Adam's λ1(P⁻¹H); a non-finite Hessian reads as NaN."""
        loss_fn, batch, rng = measured
        tracker = self._tracker
        saved = tracker.tol, tracker.max_iter
        tracker.tol, tracker.max_iter = tol, max(1, cap)
        try:
            # The operator never writes to the module's tensors: a guard without copies suffices.
            with preserved_state(pl_module, copy_tensors=False):
                restore_rng(rng)
                if self._adam:
                    result = self._preconditioned_estimate(pl_module, optimizer, loss_fn, batch)
                else:
                    result = tracker.estimate(pl_module, loss_fn, batch)
        finally:
            tracker.tol, tracker.max_iter = saved
        return float(result.eigenvalues[0]), int(result.num_hvps)

    def _preconditioned(self, op: HessianOperator, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer):
        """:math:`P^{-1/2}HP^{-1/2}` from Adam's state, or from the step's gradient before Adam has state."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        pre = preconditioned_operator(op, optimizer, params)
        if pre is not None:
            return pre
        # No v yet (the first step): v̂₁ = g², so P = |g| + ε, what Adam's first step divides by.
        eps = {id(p): float(g["eps"]) for g in optimizer.param_groups for p in g["params"]}
        diag = torch.cat([
            (p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p)).flatten().to(op.dtype)
            + eps[id(p)]
            for p in params
        ]).to(op.device)
        return PreconditionedOperator(op, diag)

    def _preconditioned_estimate(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, loss_fn: Any, batch: Any
    ) -> EigenResult:
        """One warm-started estimate of λ1(P⁻¹H), kept in the tracker like its own estimates."""
        tracker = self._tracker
        init = tracker.eigenvectors
        with torch.enable_grad(), HessianOperator(
            pl_module, loss_fn, batch, backend=self.hvp, dtype=self.dtype, snapshot=False
        ) as op:
            pre = self._preconditioned(op, pl_module, optimizer)
            if init is not None:
                init = init.to(device=op.device, dtype=op.dtype)
            solver = {"lanczos": lanczos, "power": power_iteration, "lyapunov": lyapunov_iteration}[self.method]
            result = solver(pre, k=1, tol=tracker.tol, max_iter=tracker.max_iter, init=init, seed=self.seed)
        tracker.num_estimates += 1
        tracker.total_hvps += int(result.num_hvps)
        if bool(torch.isfinite(result.eigenvalues).all()) and math.isfinite(float(result.eigenvectors.sum())):
            tracker.eigenvectors = result.eigenvectors.detach().clone()
            tracker.eigenvalues = result.eigenvalues.detach().clone()
        return result

    def _rayleigh(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, measured: tuple
    ) -> Optional[float]:
        """:math:`v^\\top A v` of the last unit eigenvector (A = H, or P^{-1/2}HP^{-1/2} for Adam): one HVP."""
        vec = self._tracker.eigenvectors
        if vec is None:
            return None
        loss_fn, batch, rng = measured
        with preserved_state(pl_module, copy_tensors=False):
            restore_rng(rng)
            with torch.enable_grad(), HessianOperator(
                pl_module, loss_fn, batch, backend=self.hvp, dtype=self.dtype, snapshot=False
            ) as op:
                target = self._preconditioned(op, pl_module, optimizer) if self._adam else op
                v = vec[:, 0].to(device=op.device, dtype=op.dtype)
                value = float(v @ target.matvec(v)) / float(v @ v)
        self._tracker.total_hvps += 1
        return float(trainer.strategy.broadcast(value, src=0))

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, h0: float, step: int, extra: dict[str, float]
    ) -> None:
        rule = self.rule
        metrics = dict(extra)
        # Own tags: HessianEigenvalueMonitor logs hessian/* in the same hook, with its own options.
        metrics[f"{self.prefix}/pre_h0" if self._adam else f"{self.prefix}/h0"] = finite_or_nan(h0)
        metrics[f"{self.prefix}/lr"] = rule.lr
        metrics["optim/lr"] = rule.lr
        metrics[f"{self.prefix}/rejected_estimates"] = float(rule.rejected_estimates)
        metrics[f"{self.prefix}/clamped_estimates"] = float(rule.clamped_estimates)
        metrics[f"{self.prefix}/triggered_estimates"] = float(rule.triggers["loss"] + rule.triggers["rayleigh"])
        prog_bar = (f"{self.prefix}/lr",) if self.prog_bar else ()
        log_measurements(trainer, pl_module, metrics, step, prog_bar=prog_bar)
        if self._hessian_tags and trainer.is_global_zero:
            # The figure's curves (hessian/inv_h0), to the loggers only: a HessianEigenvalueMonitor would log
            # these tags through LightningModule.log in the same hook, with its own options.
            if self._adam:
                curves = {"hessian/pre_h0": finite_or_nan(h0)}
            else:
                curves = {"hessian/h0": finite_or_nan(h0)}
                if math.isfinite(h0) and h0 > 0:
                    curves["hessian/inv_h0"] = 1.0 / h0
            for logger in trainer.loggers:
                logger.log_metrics(curves, step=step)

    def _relog_lr_monitors(self, trainer: pl.Trainer) -> None:
        """A LearningRateMonitor logged this step's LR at batch start, before the estimate: log it again."""
        for monitor in self._lr_monitors:
            if monitor.logging_interval != "epoch":
                monitor.on_train_batch_start(trainer)

    def _apply_lr(self, trainer: pl.Trainer) -> None:
        for optimizer in trainer.optimizers:
            groups = optimizer.param_groups
            ratios = self._group_ratios if len(self._group_ratios) == len(groups) else [1.0] * len(groups)
            for group, ratio in zip(groups, ratios):
                group["lr"] = self.lr * ratio


def _move_first(trainer: pl.Trainer, callback: Callback) -> None:
    """Run ``callback`` first, so every other callback (LR monitors, curvature monitors reading the LR in
    ``on_before_optimizer_step``) sees the LR the step really uses."""
    callbacks = trainer.callbacks
    if callback in callbacks and callbacks.index(callback) != 0:
        callbacks.remove(callback)
        callbacks.insert(0, callback)
