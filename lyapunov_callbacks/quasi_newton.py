"""The quasi-Newton learning rate: every step uses α = scale / h0, h0 the Hessian's top eigenvalue measured online."""

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
    ProbeBatch,
    check_choice,
    check_int,
    check_positive,
    check_prefix,
    check_supported,
    fast_dev_run_budget,
    finite_or_nan,
    is_number,
    log_measurements,
    resolve_dtype,
    resolve_loss_fn,
)
from lyapunov_callbacks.eigen import METHODS
from lyapunov_callbacks.hessian import BACKENDS

__all__ = ["QuasiNewtonLR", "momentum_stability_factor"]

def momentum_stability_factor(momentum: float, nesterov: bool = False) -> float:
    r"""How much larger than plain GD's the stable step of (Nesterov) heavy-ball SGD is, on one curvature.

    On a quadratic direction of curvature :math:`h`, SGD with momentum :math:`\mu` (dampening 0, PyTorch's
    ``m ← μm + g; θ ← θ − α m``) is the linear map on :math:`(\theta_t, \theta_{t-1})`

    .. math:: \begin{pmatrix} 1 + \mu - \alpha h & -\mu \\ 1 & 0 \end{pmatrix},

    with characteristic polynomial :math:`z^2 - (1+\mu-\alpha h) z + \mu`. By the Jury (Schur–Cohn) conditions
    both roots lie in the unit disc iff :math:`|\mu| < 1`, :math:`1 - T + D = \alpha h > 0` and
    :math:`1 + T + D = 2(1+\mu) - \alpha h > 0`, i.e. :math:`0 < \alpha h < 2(1+\mu)`: the limit is
    :math:`(1+\mu)` times plain GD's :math:`2/h`.

    Nesterov (PyTorch's ``m ← μm + g; θ ← θ − α(g + μ m)``) on :math:`(\theta, \alpha m)` is
    :math:`\begin{pmatrix} 1 - x(1+\mu) & -\mu^2 \\ x & \mu \end{pmatrix}` with :math:`x = \alpha h`, so
    :math:`T = 1 + \mu - x(1+\mu)`, :math:`D = \mu(1-x)`; :math:`1 - T + D = x > 0` and
    :math:`1 + T + D = 2(1+\mu) - x(1+2\mu) > 0` give :math:`0 < \alpha h < 2(1+\mu)/(1+2\mu)`
    (:math:`|D| < 1` holds there for :math:`0 \le \mu < 1`). The factor is :math:`(1+\mu)/(1+2\mu)`.
    ``tests/test_quasi_newton.py`` checks both limits against the spectral radius of the explicit maps.

    Args:
        momentum: :math:`\mu \in [0, 1)`.
        nesterov: Nesterov momentum.

    Returns:
        The factor :math:`c` with stability limit :math:`2c/h` (1 for plain SGD).

    Raises:
        ValueError: if ``momentum`` is not in ``[0, 1)``.

    Example::

        momentum_stability_factor(0.9)                  # 1.9
        momentum_stability_factor(0.9, nesterov=True)   # 1.9 / 2.8
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"`momentum` must be in [0, 1) for a stable heavy-ball map, got {momentum!r}.")
    if nesterov:
        return (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return 1.0 + momentum


class QuasiNewtonLR(Callback):
    r"""Set the learning rate to ``scale / h0`` (the quasi-Newton step), h0 measured online.

    ``h0`` is the largest eigenvalue of the Hessian of the training loss at the current weights. Plain gradient
    descent on curvature :math:`h` is stable for :math:`\alpha h < 2`; :math:`\alpha = 1/h_0` is Newton's step
    along the sharpest direction (it removes that component of the error in one step on a quadratic) and keeps
    every direction stable with the margin of half the stability limit.

    What happens when:

    - **Warm-up**, at the first training batch (global step 0, before the first optimiser step; also at the
      first batch of a run resumed from a checkpoint that has no state of this callback): h0 is estimated at
      the initial weights until it is stable — warm-started successive estimates, each run to the solver's own
      tolerance ``warmup_tol``, until two consecutive estimates differ by less than ``warmup_tol`` relatively —
      capped at ``warmup_max_hvps`` Hessian-vector products. Training starts only then. The number of HVPs is
      logged as ``quasi_newton/warmup_hvps``; hitting the cap before it was stable warns.
    - **Every** ``every_n_steps`` optimiser steps (``global_step % every_n_steps == 0``), in
      ``on_train_batch_start``, h0 is re-estimated at the pre-step weights, warm-started from the last
      eigenvector (a few HVPs), on the batch about to be trained on (``batch="current"``) or on a fixed probe
      batch (``batch="fixed"``). With ``smoothing = s > 0`` the LR uses the EMA
      :math:`\bar h_0 \leftarrow s \bar h_0 + (1-s) h_0`.
    - **Every** training batch, in ``on_train_batch_start``, the param groups' ``lr`` are set from the current
      α, so the optimiser step that follows uses it (also right after a checkpoint resume). A
      :class:`~lightning.pytorch.callbacks.LearningRateMonitor` listed before this callback is moved after it at
      setup so that it logs the LR the step really uses.

    The LR is :math:`\alpha = \mathrm{clamp}(\text{scale} \cdot c / (\bar h_0 + w),\ \text{min\_lr},
    \text{max\_lr})` where :math:`w` is the largest coupled ``weight_decay`` of ``torch.optim.SGD``'s groups
    (it adds :math:`w I` to the curvature of the update map; 0 otherwise) and :math:`c = 1` by default.

    **Momentum.** :math:`1/h_0` is the plain-SGD rule (half of GD's limit :math:`2/h_0`). With
    ``momentum_aware=True`` and SGD with heavy-ball momentum :math:`\mu` (dampening 0) the largest stable step
    on curvature :math:`h_0` is :math:`2(1+\mu)/h_0` — the eigenvalues of
    :math:`\begin{pmatrix} 1+\mu-\alpha h & -\mu \\ 1 & 0 \end{pmatrix}` lie in the unit disc iff
    :math:`0 < \alpha h < 2(1+\mu)` — so the analogue with the same margin is :math:`c = 1 + \mu`,
    :math:`\alpha = (1+\mu)/h_0`. With Nesterov the limit is :math:`2(1+\mu)/(h_0(1+2\mu))` and
    :math:`c = (1+\mu)/(1+2\mu)`; see :func:`momentum_stability_factor` for both derivations. With
    ``momentum_aware=False`` and momentum > 0 a warning says that 1/h0 is the plain-SGD rule.

    **Parameter groups.** α is the LR of the first param group; every other group ``i`` gets
    ``α · lr_i / lr_0`` with ``lr_i`` the LRs ``configure_optimizers`` gave them, so the ratios between groups are
    kept (one group, or groups of one LR: every group gets α).

    **Refits, resumes.** Every ``fit`` starts from a clean state (a new warm-up, no h0 carried over from an
    earlier fit, e.g. with the same callback instance on another model) unless this callback's state is
    restored from a checkpoint (:attr:`state_key` identifies it).

    **fast_dev_run.** Under ``Trainer(fast_dev_run=...)`` the warm-up and each re-estimate are capped at a
    handful of HVPs (the code path runs; h0 is not converged), as Lightning's tuner callbacks cut their work
    under ``fast_dev_run``; an info message says so.

    **Safety.** An estimate that is NaN, infinite or :math:`\le 0` (a concave region, a diverged loss) never
    reaches the optimiser: the last good LR is kept (before the first good estimate: the optimiser's
    configured LR, clamped), the event is counted in ``quasi_newton/rejected_estimates`` and a warning is
    emitted once.

    **Distributed.** The core's Hessian-vector products are all-reduced, so every rank computes the same h0 of
    the Hessian of the mean loss over all shards; the value used is additionally broadcast from rank 0, so
    every rank sets exactly the same LR on every step.

    Logged at each estimate (``trainer.callback_metrics`` and every logger, at the measured step), ``{prefix}``
    being the ``prefix`` argument (default ``"quasi_newton"``): ``{prefix}/lr``, ``optim/lr`` (the same α),
    ``hessian/h0`` (raw estimate), ``hessian/inv_h0``, ``{prefix}/rejected_estimates``; at the warm-up also
    ``{prefix}/warmup_hvps``.

    Cost: the warm-up (typically 10–40 HVPs, one HVP ≈ 2.5–3.3 forward+backward passes) plus a few HVPs every
    ``every_n_steps`` steps.

    Args:
        scale: α = scale·c/h0; 1 is the quasi-Newton step, must be > 0.
        every_n_steps: re-estimate every this many optimiser steps (≥ 1).
        method: eigen-solver, ``"lanczos"`` (default), ``"power"`` or ``"lyapunov"``.
        hvp: Hessian-vector products, ``"autograd"`` (exact) or ``"finite_difference"``.
        batch: ``"current"`` (the batch about to be trained on) or ``"fixed"`` (a probe batch drawn once).
        probe_size: size of the fixed probe batch (``batch="fixed"``), ≥ 1.
        tol: relative tolerance of each re-estimate (> 0, default 1e-2): a bound on the relative Ritz residual
            ``‖Hy − θy‖ ≤ tol·|θ|``, so (H being symmetric) h0 is within ``tol`` relative of an eigenvalue —
            usually far closer, the error being of order ``(tol·θ)²/gap`` — which is more than the LR needs
            (the eigenvalue nearest θ: with h0 and h1 a few percent apart, h1 may be returned).
        max_iter: HVP cap of each re-estimate (≥ 1).
        warmup_tol: relative tolerance of the warm-up (solver and consecutive estimates), > 0.
        warmup_max_hvps: HVP cap of the warm-up (≥ 1).
        smoothing: EMA factor ``s`` in ``[0, 1)`` for h0 (0: no smoothing).
        min_lr: lower clamp of α (> 0).
        max_lr: upper clamp of α (≥ ``min_lr``).
        momentum_aware: scale α by the momentum stability factor (SGD with momentum; see above).
        seed: seed of the solver's random start vector and of the probe batch's indices.
        dtype: dtype of the estimate, ``None`` (the parameters', float32 under mixed precision),
            ``"float32"``/``"float64"`` or a ``torch.dtype``.
        prefix: tag prefix of ``{prefix}/lr``, ``{prefix}/warmup_hvps``, ``{prefix}/rejected_estimates``
            (default ``"quasi_newton"``).
        prog_bar: also show ``{prefix}/lr`` in the progress bar (default False).

    Raises:
        ValueError: at construction, for ``scale <= 0``, ``every_n_steps < 1``, an unknown ``method``, ``hvp``,
            ``batch`` or ``dtype``, ``probe_size < 1``, ``tol``/``warmup_tol <= 0``, ``max_iter``/
            ``warmup_max_hvps < 1``, ``smoothing`` outside ``[0, 1)``, ``min_lr <= 0`` or ``min_lr > max_lr``.
            At fit start, for an optimiser whose param groups have no ``lr``, and with ``momentum_aware=True``
            for an optimiser without ``momentum``, with dampening, or with groups of different momentum; for a
            configured LR scheduler (remove it: this callback sets the LR), several optimisers, manual
            optimisation, a torch.compile'd module, or a first param group with ``lr <= 0`` when there are
            several groups.

    Example::

        import lightning as L
        from lyapunov_callbacks import LyapunovExponentMonitor, QuasiNewtonLR

        trainer = L.Trainer(callbacks=[QuasiNewtonLR(every_n_steps=10), LyapunovExponentMonitor(window=20)])
        trainer.fit(model, datamodule)   # model.configure_optimizers returns plain SGD, no scheduler
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
        seed: int = 0,
        dtype: Optional[Union[str, torch.dtype]] = None,
        prefix: str = "quasi_newton",
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        self.prefix = check_prefix(prefix)
        self.prog_bar = bool(prog_bar)
        check_positive("scale", scale, "scale=1.0 (α = scale/h0)")
        check_int("every_n_steps", every_n_steps, "every_n_steps=10")
        check_choice("method", method, METHODS)
        check_choice("hvp", hvp, BACKENDS)
        check_choice("batch", batch, BATCHES)
        check_int("probe_size", probe_size, "probe_size=256")
        check_positive("tol", tol, "tol=1e-2")
        check_int("max_iter", max_iter, "max_iter=50")
        check_positive("warmup_tol", warmup_tol, "warmup_tol=1e-3")
        check_int("warmup_max_hvps", warmup_max_hvps, "warmup_max_hvps=200")
        if not is_number(smoothing) or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"`smoothing` must be in [0, 1) (EMA factor of h0; 0 = none), got {smoothing!r}.")
        if not is_number(min_lr) or not min_lr > 0:
            raise ValueError(f"`min_lr` must be > 0, got {min_lr!r}; use e.g. min_lr=1e-5.")
        if not is_number(max_lr) or not max_lr >= min_lr:
            raise ValueError(
                f"`min_lr` ({min_lr!r}) must not exceed `max_lr` ({max_lr!r}); raise max_lr or lower min_lr."
            )
        dtype = resolve_dtype(dtype)

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
        self.seed = int(seed)
        self.dtype = dtype
        self.probe_size = probe_size
        self._loss_fn = None
        # Set at fit start from the optimiser.
        self._factor = 1.0
        self._weight_decay = 0.0
        self._configured_lr: Optional[float] = None
        self._group_ratios: list[float] = [1.0]
        self._warmup_budget = warmup_max_hvps
        self._reset()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            prefix=self.prefix, scale=self.scale, every_n_steps=self.every_n_steps, method=self.method, batch=self.batch
        )

    def _reset(self) -> None:
        """Forget every estimate: the next training batch runs the warm-up again."""
        self._tracker = EigenTracker(
            method=self.method, hvp=self.hvp, k=1, tol=self.tol, max_iter=self.max_iter, seed=self.seed,
            warm_start=True, dtype=self.dtype,
        )
        self._probe = ProbeBatch(size=self.probe_size, seed=self.seed) if self.batch == "fixed" else None
        # Checkpointed state (see state_dict).
        self.h0: Optional[float] = None
        self.h0_smoothed: Optional[float] = None
        self.lr: Optional[float] = None
        self.warmup_done = False
        self.warmup_hvps = 0
        self.rejected_estimates = 0
        self.num_estimates = 0
        self._last_estimate_step = -1
        self._warned_rejection = False

    # ---------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ---------------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._loss_fn = resolve_loss_fn(pl_module)
            _move_before_lr_monitors(trainer, self)
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
        self._configured_lr = float(optimizer.param_groups[0]["lr"])
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        if len(set(lrs)) > 1 and not lrs[0] > 0:
            raise ValueError(
                f"QuasiNewtonLR keeps the ratios of the param groups' LRs {lrs} relative to the first group, whose "
                "lr must then be > 0; give the first group a positive lr."
            )
        self._group_ratios = [lr / lrs[0] if len(set(lrs)) > 1 else 1.0 for lr in lrs]
        self._warmup_budget = self.warmup_max_hvps
        self._tracker.max_iter = self.max_iter
        if fast_dev_run_budget(
            trainer, "QuasiNewtonLR", f"the warm-up and each re-estimate are capped at {FAST_DEV_RUN_HVPS} HVPs"
        ):
            self._warmup_budget = min(self.warmup_max_hvps, FAST_DEV_RUN_HVPS)
            self._tracker.max_iter = min(self.max_iter, FAST_DEV_RUN_HVPS)
        self._factor = self._momentum_factor(optimizer)
        self._weight_decay = (
            max(float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups)
            if isinstance(optimizer, torch.optim.SGD)
            else 0.0
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the optimiser state (restored after on_fit_start) holds the old LR: re-apply ours.
        if self.lr is not None:
            self._apply_lr(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.warmup_done:
            self._warm_up(trainer, pl_module, batch, step)
        elif step % self.every_n_steps == 0 and step != self._last_estimate_step:
            self._re_estimate(trainer, pl_module, batch, step)
        self._apply_lr(trainer)

    # ---------------------------------------------------------------------------------------------------------
    # Checkpointing
    # ---------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """h0 (raw and smoothed), the LR, warm-up flag and counters, warm-start vectors and probe indices."""
        return {
            "h0": self.h0,
            "h0_smoothed": self.h0_smoothed,
            "lr": self.lr,
            "warmup_done": self.warmup_done,
            "warmup_hvps": self.warmup_hvps,
            "rejected_estimates": self.rejected_estimates,
            "num_estimates": self.num_estimates,
            "last_estimate_step": self._last_estimate_step,
            "warned_rejection": self._warned_rejection,
            "tracker": self._tracker.state_dict(),
            "probe": None if self._probe is None else self._probe.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: a resumed run keeps h0 and the LR and does not repeat the warm-up."""
        self.h0 = state_dict["h0"]
        self.h0_smoothed = state_dict["h0_smoothed"]
        self.lr = state_dict["lr"]
        self.warmup_done = bool(state_dict["warmup_done"])
        self.warmup_hvps = int(state_dict["warmup_hvps"])
        self.rejected_estimates = int(state_dict["rejected_estimates"])
        self.num_estimates = int(state_dict["num_estimates"])
        self._last_estimate_step = int(state_dict["last_estimate_step"])
        self._warned_rejection = bool(state_dict.get("warned_rejection", False))
        self._tracker.load_state_dict(state_dict["tracker"])
        if self._probe is not None and state_dict.get("probe") is not None:
            self._probe.load_state_dict(state_dict["probe"])

    @property
    def total_hvps(self) -> int:
        """HVPs spent by this callback so far (warm-up included)."""
        return self._tracker.total_hvps

    # ---------------------------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------------------------
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
        if any("momentum" not in g for g in groups):
            raise ValueError(
                f"momentum_aware=True needs SGD-style param groups with 'momentum'; {type(optimizer).__name__} has "
                "none. Use torch.optim.SGD(momentum=...) or momentum_aware=False."
            )
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

    def _measure_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
        return self._probe.get(trainer, pl_module) if self._probe is not None else batch

    def _warm_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> None:
        """Estimate h0 at the initial weights until two consecutive warm-started estimates agree."""
        batch = self._measure_batch(trainer, pl_module, batch)
        tracker = self._tracker
        saved_tol, saved_max_iter = tracker.tol, tracker.max_iter
        used, previous, h0, stable = 0, None, float("nan"), False
        tracker.tol = self.warmup_tol
        try:
            while used < self._warmup_budget:
                # Every estimate may use what is left of the budget; the solver stops at its own tolerance.
                tracker.max_iter = self._warmup_budget - used
                h0, hvps = self._estimate(pl_module, batch)
                used += hvps
                if not math.isfinite(h0) or hvps == 0:
                    break
                if previous is not None and abs(h0 - previous) <= self.warmup_tol * abs(h0):
                    stable = True
                    break
                previous = h0
        finally:
            tracker.tol, tracker.max_iter = saved_tol, saved_max_iter
        self.warmup_done = True
        self.warmup_hvps = used
        if not stable and math.isfinite(h0) and self._warmup_budget == self.warmup_max_hvps:
            rank_zero_warn(
                f"QuasiNewtonLR: the warm-up used warmup_max_hvps={self.warmup_max_hvps} HVPs before h0 was stable "
                f"to warmup_tol={self.warmup_tol} (last estimate {h0:.6g}); training starts with it. Raise "
                "warmup_max_hvps or warmup_tol."
            )
        self._accept(trainer, pl_module, h0, step, {f"{self.prefix}/warmup_hvps": float(used)})

    def _re_estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> None:
        h0, _ = self._estimate(pl_module, self._measure_batch(trainer, pl_module, batch))
        self._accept(trainer, pl_module, h0, step, {})

    def _estimate(self, pl_module: pl.LightningModule, batch: Any) -> tuple[float, int]:
        """``(h0, HVPs used)``; a non-finite Hessian (a diverged loss) reads as h0 = NaN."""
        result = self._tracker.estimate(pl_module, self._loss_fn, batch)
        return float(result.eigenvalues[0]), int(result.num_hvps)

    def _accept(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, h0: float, step: int, extra: dict[str, float]
    ) -> None:
        """Turn an estimate into the LR (or reject it), and log."""
        # Every rank must set the same LR: use rank 0's value (identical anyway with all-reduced HVPs).
        h0 = float(trainer.strategy.broadcast(h0, src=0))
        self.num_estimates += 1
        self._last_estimate_step = step
        metrics = dict(extra)
        if math.isfinite(h0) and h0 > 0:
            self.h0 = h0
            if self.h0_smoothed is None or self.smoothing == 0.0:
                self.h0_smoothed = h0
            else:
                self.h0_smoothed = self.smoothing * self.h0_smoothed + (1.0 - self.smoothing) * h0
            self.lr = self._clamp(self.scale * self._factor / (self.h0_smoothed + self._weight_decay))
            metrics["hessian/inv_h0"] = 1.0 / h0
        else:
            self.rejected_estimates += 1
            if self.lr is None:
                configured = self._configured_lr if self._configured_lr is not None else self.min_lr
                self.lr = self._clamp(configured)
            if not self._warned_rejection:
                self._warned_rejection = True
                rank_zero_warn(
                    f"QuasiNewtonLR rejected the h0 estimate {h0!r} at step {step} (NaN, infinite or <= 0: a "
                    f"diverged loss or a concave region) and keeps lr={self.lr:.6g}; further rejections are "
                    f"counted in {self.prefix}/rejected_estimates without another warning."
                )
        metrics["hessian/h0"] = finite_or_nan(h0)
        metrics[f"{self.prefix}/lr"] = self.lr
        metrics["optim/lr"] = self.lr
        metrics[f"{self.prefix}/rejected_estimates"] = float(self.rejected_estimates)
        prog_bar = (f"{self.prefix}/lr",) if self.prog_bar else ()
        log_measurements(trainer, pl_module, metrics, step, prog_bar=prog_bar)

    def _clamp(self, lr: float) -> float:
        return min(max(lr, self.min_lr), self.max_lr)

    def _apply_lr(self, trainer: pl.Trainer) -> None:
        for optimizer in trainer.optimizers:
            groups = optimizer.param_groups
            ratios = self._group_ratios if len(self._group_ratios) == len(groups) else [1.0] * len(groups)
            for group, ratio in zip(groups, ratios):
                group["lr"] = self.lr * ratio


def _move_before_lr_monitors(trainer: pl.Trainer, callback: Callback) -> None:
    """Run ``callback`` before any LearningRateMonitor, so that monitor logs the LR the step really uses."""
    callbacks = trainer.callbacks
    monitors = [i for i, c in enumerate(callbacks) if isinstance(c, LearningRateMonitor)]
    if not monitors or callback not in callbacks:
        return
    own = callbacks.index(callback)
    if monitors[0] < own:
        callbacks.pop(own)
        callbacks.insert(monitors[0], callback)

