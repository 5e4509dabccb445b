"""The quasi-Newton learning-rate rule as a plain object: when to estimate h0, and which LR an estimate gives.

No model, no optimiser, no Lightning: the caller measures (h0, the loss, a Rayleigh quotient, a tangent growth
factor) and this object decides. ``QuasiNewtonLR`` wires it into Lightning's hooks; a plain PyTorch loop uses it
the same way (see :class:`QuasiNewtonRule`'s example).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional, Union

import torch

from lyapunov_callbacks.core.cadence import AdaptiveCadence, check_every_n_steps, is_auto

# One definition of each stability factor (re-exported here for the rule's callers).
from lyapunov_callbacks.core.checks import check_int, check_positive, finite_or_nan, is_number
from lyapunov_callbacks.core.stability import adam_stability_factor, rule_stability_factor
from lyapunov_callbacks.core.step_direction import check_step_optimizer

__all__ = ["QuasiNewtonRule", "RULES", "TRIGGERS", "adam_stability_factor", "check_sharpness_settings"]

#: The step rules: ``"newton"`` (the paper's α·h0 = scale), ``"edge"`` (α·h0 = ``edge`` < 2) and
#: ``"batch_sharpness"`` (α = scale/s, s the curvature along the optimiser's own step per unit slope).
RULES = ("newton", "edge", "batch_sharpness")
#: Why an estimate was asked for, in the order they are checked.
TRIGGERS = ("warmup", "rayleigh", "growth", "loss", "schedule")
# A fresh warm-up estimate is "the same" as the previous one within warmup_tol relatively; with fewer HVPs than
# this left in the warm-up budget no further estimate is asked for (a 1-HVP estimate is only a Rayleigh quotient).
_MIN_WARMUP_HVPS = 2


class QuasiNewtonRule:
    r"""When to estimate the Hessian's top eigenvalue h0, and the learning rate α each estimate gives.

    **The LR.** With :math:`\bar h_0` the (smoothed) estimate, :math:`w` the coupled weight decay and :math:`c` the
    optimiser's stability factor (its step is stable for :math:`\alpha (h + w) < 2c`),

    .. math:: \alpha = \mathrm{clamp}\big(k\,\text{scale}\cdot c / (\bar h_0 + w),\ \text{min\_lr},\ \text{max\_lr}\big),
       \qquad k = 1 \ (\text{rule}=\text{"newton"}),\quad k = \text{edge}\ (\text{rule}=\text{"edge"}),

    and an estimate may raise α by at most the factor ``max_lr_growth`` over the LR in use (a fall is applied at
    once: it is what keeps the step stable).

    - ``rule="newton"`` (the paper's α = 1/h0): Newton's step along the sharpest direction, half the stability
      limit. It removes that component in one step on a quadratic, decreases the loss monotonically on a
      quadratic, and stays stable with an h0 estimate up to 2× too low (a stale or noisy mini-batch estimate).
      Use it when h0 is measured on mini-batches or rarely.
    - ``rule="edge"`` (α·h0 = ``edge`` < 2, like CDAT, Roulet et al. 2024, "Stepping on the edge"): the step
      gradient descent settles into by itself at the edge of stability. Every direction flatter than h0 moves
      ``edge``× faster than under ``"newton"``, which is what wins over a full run; the sharpest direction
      oscillates (the loss is not monotone) and the margin is only 2/edge − 1 (11 % at edge = 1.8), so the
      estimate must be fresh and accurate: use it with a fixed large probe batch and the triggers below.

    :math:`c = 1` for plain SGD; the caller passes ``momentum_stability_factor(μ, nesterov)`` of
    ``lyapunov_callbacks.core.stability`` for heavy-ball SGD and :func:`adam_stability_factor` (with h0 =
    λ1(P⁻¹H)) for Adam. :math:`w` is SGD's coupled ``weight_decay``: it adds :math:`wI` to the curvature of the
    update map, so with :math:`h_0 \ll w` the step is set by :math:`w`.

    **rule="batch_sharpness"** (the greedy step along the optimiser's own direction). The measurement passed
    to :meth:`update` is not h0 but :math:`s = d^\top \nabla^2 F\, d / \nabla F^\top d`, the curvature of the
    mini-batch objective along the step's direction :math:`d` per unit slope
    (:func:`~lyapunov_callbacks.core.step_direction.directional_sharpness`, one HVP on the step's batch), and

    .. math:: \alpha = \mathrm{clamp}\big(\text{scale} / \hat s,\ \text{min\_lr},\ \text{max\_lr}\big),
       \qquad \hat s_n = \frac{\text{EMA}_\beta(s)_n}{1 - \beta^n},

    :math:`\beta` = ``sharpness_ema`` and :math:`n` the number of good measurements (the bias correction makes
    the first one count fully). :math:`1/s` minimises the quadratic model of the batch's objective along the
    step the optimiser takes (for plain SGD, :math:`\lVert g\rVert^2/g^\top H_B g`); momentum, Nesterov, Adam
    and weight decay are inside :math:`d`, so ``stability_factor`` and ``weight_decay`` do not enter this
    rule. It is not bounded by :math:`2/h_0`: the greedy step may exceed it for a step (it then overshoots
    only the sharpest direction, which the next gradient turns towards), and that is where it outruns
    ``"newton"``. Safety is the same as the other rules': NaN/∞/≤ 0 measurements (no descent along
    :math:`d`, or no positive curvature) are rejected, ``max_lr_growth`` limits each rise, the clamps hold, and
    a **loss-rise brake**: an estimate asked for by the loss trigger is taken at once, :math:`\hat s \leftarrow
    \max(\hat s, s)` (the EMA continues from there), so a sharpening lowers the LR at the next step instead of
    being averaged away. The warm-up is the first measurement at the initial weights (exact: one HVP, nothing
    to converge), which sets the LR without the growth limit. Then ``"schedule"`` asks for a measurement at
    every step of the first ``warmup_steps`` steps, and every ``every_n_steps`` steps after them: the
    curvature moves fastest early, and measuring sparsely from the start overshoots there.

    **When to estimate.** :meth:`needs_estimate` answers, at a step, whether h0 should be (re-)estimated now:

    - ``"warmup"``: until the warm-up is done, at the initial weights. Warm-started estimates are repeated until
      two consecutive ones agree to ``warmup_tol`` relatively, or ``warmup_max_hvps`` HVPs are spent
      (:attr:`warmup_hvps_left` is the budget of the next estimate). A NaN/inf/≤ 0 warm-up estimate ends it.
    - ``"schedule"``: ``every_n_steps`` steps after the last estimate (a triggered estimate restarts the count);
      with ``every_n_steps="auto"`` an :class:`~lyapunov_callbacks.core.cadence.AdaptiveCadence` (``drift_tol``,
      ``min_every``, ``max_every``) picks each interval from the rate of change of the estimates so far (the
      good post-warm-up ones, the last warm-up estimate first), so that h0 is predicted to move by
      ``drift_tol`` until the next; :attr:`every_n_steps_in_use` is the interval scheduled last.
    - Triggers, cheap signals that the curvature has moved, ask for an estimate at once:

      * ``"loss"``: the loss passed in rose above ``(1 + loss_rise)`` times the mean of the last ``loss_window``
        losses since the last estimate (the loss at that estimate included). An instability multiplies the
        loss by about :math:`(\alpha h - 1)^2` per step, 10⁴ for a 100× sharpening under the Newton rule, so
        the loss of the step after the sharpening shows it. Free: the loss is the training step's.
      * ``"rayleigh"``: every ``rayleigh_every`` steps (when :meth:`wants_rayleigh` says so) the caller computes
        :math:`r = v^\top H v` of the last eigenvector :math:`v` (one HVP) and passes it; :math:`r` is a lower
        bound of the new h0, so :math:`r > (1 + \text{rayleigh\_rise})\,\bar h_0` means the curvature grew.
        (A fall of :math:`r` is left to the schedule: a too small LR is slow, not unstable.) Cost: one HVP
        every ``rayleigh_every`` steps (LeCun, Simard & Pearlmutter 1993 update the eigenvector this way).
      * ``"growth"``: the one-step growth factor :math:`\lVert J\delta\rVert / \lVert\delta\rVert` of a tangent
        vector (from ``LyapunovExponentMonitor``'s dynamics, when one runs) above ``growth_limit``: the step is
        locally expanding, so some :math:`\alpha(h+w) > 2c`. Free when the tangent is propagated anyway.

    **Safety.** An estimate that is NaN, infinite or ≤ 0 never reaches the LR: :meth:`update` keeps the last
    LR (before any good estimate: the ``initial_lr`` given to :meth:`reset`, clamped, else ``min_lr``) and
    counts it in :attr:`rejected_estimates`. ``max_lr`` is a safety net for a vanishing h0, not the operating
    point: with ``max_lr_growth`` the LR approaches it geometrically, :attr:`clamped` says when it binds and
    :attr:`clamped_estimates` counts the good estimates whose LR a clamp set.

    **Smoothing.** With ``smoothing = s > 0``: :math:`\bar h_0 \leftarrow \max(h_0, s\bar h_0 + (1-s)h_0)` —
    a fall of h0 is averaged, a rise is taken at once (smoothing a sharpening would keep a diverging LR).

    Args:
        rule: ``"newton"`` (α = scale·c/(h0 + w), default), ``"edge"`` (α = edge·scale·c/(h0 + w)) or
            ``"batch_sharpness"`` (α = scale/ŝ, the greedy step along the optimiser's direction; see above).
        scale: multiplies α (> 0); 1 is the quasi-Newton step.
        edge: target of α·(h0 + w)/c under ``rule="edge"``, in (0, 2); default 1.8.
        stability_factor: c > 0, the optimiser's stability limit over plain GD's (1 for SGD).
        weight_decay: w ≥ 0, coupled weight decay added to h0.
        every_n_steps: scheduled re-estimate this many steps after the last one (≥ 1), default 10, or
            ``"auto"``: the interval adapts to the rate of change of h0 (see :class:`AdaptiveCadence`).
        drift_tol: ``"auto"`` only: predicted relative change of h0 between estimates (> 0), default 0.05.
        min_every: ``"auto"`` only: shortest interval (≥ 1), default 10.
        max_every: ``"auto"`` only: longest interval (≥ ``min_every``), default 200.
        warmup_tol: relative agreement of consecutive warm-up estimates (> 0), default 1e-3.
        warmup_max_hvps: HVP budget of the warm-up (≥ 1), default 200.
        smoothing: EMA factor s of h0 in [0, 1) (0: none).
        min_lr: lower clamp of α (> 0), default 1e-5.
        max_lr: upper clamp of α (≥ ``min_lr``), default 10.
        max_lr_growth: largest factor (> 1) by which one estimate may raise the LR, default 2; ``math.inf``
            disables the limit.
        loss_rise: relative loss rise (> 0) that triggers an estimate, default 1.0 (the loss doubled over its
            recent mean); ``None`` disables the loss trigger.
        loss_window: number of recent losses (≥ 1) whose mean is the reference, default 10.
        rayleigh_every: ask for a Rayleigh check every this many steps (≥ 1); ``None`` (default) never.
        rayleigh_rise: relative rise (> 0) of the Rayleigh quotient over h0 that triggers, default 0.1.
        growth_limit: tangent growth factor per step (> 0) above which an estimate is triggered, default 1.1.
        sharpness_ema: EMA factor β in [0, 1) of ``rule="batch_sharpness"``'s measurement (0: none),
            default 0.9; unused by the other rules.
        warmup_steps: ``rule="batch_sharpness"``: measure at every step of the first ``warmup_steps`` (≥ 0)
            steps before the ``every_n_steps`` schedule starts, default 0; unused by the other rules.

    Raises:
        ValueError: for an unknown ``rule``, ``scale``/``stability_factor``/``warmup_tol``/``min_lr``/
            ``rayleigh_rise``/``growth_limit``/``loss_rise`` ≤ 0 or not finite, ``edge`` outside (0, 2),
            ``weight_decay`` < 0, ``every_n_steps`` neither ≥ 1 nor ``"auto"``, ``drift_tol`` ≤ 0, ``min_every`` <
            1, ``max_every`` < ``min_every``, ``warmup_max_hvps``/``loss_window``/``rayleigh_every`` < 1,
            ``smoothing`` outside [0, 1), ``max_lr`` < ``min_lr`` or ``max_lr_growth`` ≤ 1; with
            ``rule="batch_sharpness"``: ``sharpness_ema`` outside [0, 1), ``warmup_steps`` < 0, a ``smoothing``
            other than 0 (the rule smooths with ``sharpness_ema``) or a ``rayleigh_every`` (no eigenvector).

    Example::

        import torch
        from lyapunov_callbacks import top_hessian_eigenvalues
        from lyapunov_callbacks.core.quasi_newton_rule import QuasiNewtonRule

        rule = QuasiNewtonRule(every_n_steps=10)
        rule.reset(initial_lr=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        vec = None
        for step, batch in enumerate(loader):
            loss = loss_fn(model, batch)
            while rule.needs_estimate(step, loss=float(loss)):       # loops during the warm-up only
                res = top_hessian_eigenvalues(model, loss_fn, batch, tol=1e-2, init=vec,
                                              max_iter=rule.warmup_hvps_left if not rule.warmup_done else 50)
                vec = res.eigenvectors
                rule.update(float(res.eigenvalues[0]), step, hvps=res.num_hvps)
            for group in opt.param_groups:
                group["lr"] = rule.lr
            opt.zero_grad(); loss.backward(); opt.step()
    """

    def __init__(
        self,
        rule: str = "newton",
        scale: float = 1.0,
        edge: float = 1.8,
        stability_factor: float = 1.0,
        weight_decay: float = 0.0,
        every_n_steps: Union[int, str] = 10,
        warmup_tol: float = 1e-3,
        warmup_max_hvps: int = 200,
        smoothing: float = 0.0,
        min_lr: float = 1e-5,
        max_lr: float = 10.0,
        max_lr_growth: float = 2.0,
        loss_rise: Optional[float] = 1.0,
        loss_window: int = 10,
        rayleigh_every: Optional[int] = None,
        rayleigh_rise: float = 0.1,
        growth_limit: float = 1.1,
        drift_tol: float = 0.05,
        min_every: int = 10,
        max_every: int = 200,
        sharpness_ema: float = 0.9,
        warmup_steps: int = 0,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"`rule` must be one of {', '.join(map(repr, RULES))}, got {rule!r}.")
        check_positive("scale", scale, "scale=1.0")
        if not is_number(edge) or not 0.0 < edge < 2.0:
            raise ValueError(f"`edge` must be in (0, 2) (α·h0 below GD's limit 2), got {edge!r}; e.g. edge=1.8.")
        check_positive("stability_factor", stability_factor, "stability_factor=1.0 (plain SGD)")
        if not is_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
            raise ValueError(f"`weight_decay` must be a finite number >= 0, got {weight_decay!r}; e.g. 0.0.")
        check_every_n_steps(every_n_steps)
        # The loss trigger is the rule's own (below): the cadence only schedules.
        self._cadence_settings = dict(drift_tol=drift_tol, min_every=min_every, max_every=max_every, loss_rise=None)
        AdaptiveCadence(**self._cadence_settings)  # validates drift_tol/min_every/max_every, naming them
        check_positive("warmup_tol", warmup_tol, "warmup_tol=1e-3")
        check_int("warmup_max_hvps", warmup_max_hvps, "warmup_max_hvps=200")
        if not is_number(smoothing) or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"`smoothing` must be in [0, 1) (EMA factor of h0; 0 = none), got {smoothing!r}.")
        check_positive("min_lr", min_lr, "min_lr=1e-5")
        if not is_number(max_lr) or not max_lr >= min_lr:
            raise ValueError(f"`max_lr` ({max_lr!r}) must be >= `min_lr` ({min_lr!r}); raise max_lr or lower min_lr.")
        if not is_number(max_lr_growth) or not max_lr_growth > 1.0:
            raise ValueError(
                f"`max_lr_growth` must be > 1 (the largest factor one estimate may raise the LR by), got "
                f"{max_lr_growth!r}; e.g. max_lr_growth=2.0, or math.inf for no limit."
            )
        if loss_rise is not None:
            check_positive("loss_rise", loss_rise, "loss_rise=1.0, or None to disable the loss trigger")
        check_int("loss_window", loss_window, "loss_window=10")
        if rayleigh_every is not None:
            check_int("rayleigh_every", rayleigh_every, "rayleigh_every=5, or None for no Rayleigh check")
        check_positive("rayleigh_rise", rayleigh_rise, "rayleigh_rise=0.1")
        check_positive("growth_limit", growth_limit, "growth_limit=1.1")
        if not is_number(sharpness_ema) or not 0.0 <= sharpness_ema < 1.0:
            raise ValueError(
                f"`sharpness_ema` must be in [0, 1) (EMA factor of the batch sharpness; 0 = none), got {sharpness_ema!r}."
            )
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}; use e.g. warmup_steps=0.")
        if rule == "batch_sharpness":
            if smoothing != 0:
                raise ValueError(
                    f"rule='batch_sharpness' smooths its measurement with `sharpness_ema`; got smoothing={smoothing!r}: "
                    "leave smoothing=0 and set sharpness_ema (e.g. 0.9)."
                )
            if rayleigh_every is not None:
                raise ValueError(
                    f"rule='batch_sharpness' keeps no eigenvector for a Rayleigh check; got rayleigh_every="
                    f"{rayleigh_every!r}: use rayleigh_every=None (the loss trigger is its brake)."
                )

        self.rule = rule
        self.scale = float(scale)
        self.edge = float(edge)
        self.stability_factor = float(stability_factor)
        self.weight_decay = float(weight_decay)
        self.every_n_steps = every_n_steps
        self.drift_tol = float(drift_tol)
        self.min_every = min_every
        self.max_every = max_every
        self.warmup_tol = float(warmup_tol)
        self.warmup_max_hvps = warmup_max_hvps
        self.smoothing = float(smoothing)
        self.min_lr = float(min_lr)
        self.max_lr = float(max_lr)
        self.max_lr_growth = float(max_lr_growth)
        self.loss_rise = None if loss_rise is None else float(loss_rise)
        self.loss_window = loss_window
        self.rayleigh_every = rayleigh_every
        self.rayleigh_rise = float(rayleigh_rise)
        self.growth_limit = float(growth_limit)
        self.sharpness_ema = float(sharpness_ema)
        self.warmup_steps = warmup_steps
        self.reset()

    # ---------------------------------------------------------------------------------------------------------
    # State
    # ---------------------------------------------------------------------------------------------------------
    def reset(self, initial_lr: Optional[float] = None) -> None:
        """Forget every estimate (a new fit); ``initial_lr`` (clamped) is the LR until the first good estimate."""
        if initial_lr is not None and not (is_number(initial_lr) and math.isfinite(initial_lr) and initial_lr > 0):
            raise ValueError(f"`initial_lr` must be a finite number > 0 or None, got {initial_lr!r}.")
        self.initial_lr: Optional[float] = None if initial_lr is None else float(initial_lr)
        self.lr: Optional[float] = None if initial_lr is None else self._clamp(float(initial_lr))
        self.h0: Optional[float] = None
        self.h0_smoothed: Optional[float] = None
        self.warmup_done = False
        self.warmup_hvps = 0
        self.warmup_converged = False
        self._warmup_previous: Optional[float] = None
        self.num_estimates = 0
        self.rejected_estimates = 0
        self.triggers = {name: 0 for name in TRIGGERS}
        self.last_trigger: Optional[str] = None
        self.clamped = False
        self.clamped_estimates = 0
        self._last_estimate_step: Optional[int] = None
        self._pending: Optional[str] = None
        self._losses: deque = deque(maxlen=self.loss_window)
        self._loss_step: Optional[int] = None
        self._last_loss: Optional[float] = None
        # rule="batch_sharpness": the EMA of the measurement before bias correction, and its number of samples.
        self._ema: float = 0.0
        self._ema_count = 0
        self.cadence: Optional[AdaptiveCadence] = (
            AdaptiveCadence(**self._cadence_settings) if is_auto(self.every_n_steps) else None
        )

    @property
    def every_n_steps_in_use(self) -> int:
        """The interval to the next scheduled estimate: ``every_n_steps``, or the adaptive cadence's last choice."""
        return self.every_n_steps if self.cadence is None else self.cadence.every_n_steps

    def state_dict(self) -> dict[str, Any]:
        """Everything the decisions depend on besides the settings: estimates, LR, counters, loss history."""
        return {
            "initial_lr": self.initial_lr,
            "lr": self.lr,
            "h0": self.h0,
            "h0_smoothed": self.h0_smoothed,
            "warmup_done": self.warmup_done,
            "warmup_hvps": self.warmup_hvps,
            "warmup_converged": self.warmup_converged,
            "warmup_previous": self._warmup_previous,
            "num_estimates": self.num_estimates,
            "rejected_estimates": self.rejected_estimates,
            "triggers": dict(self.triggers),
            "last_trigger": self.last_trigger,
            "clamped": self.clamped,
            "clamped_estimates": self.clamped_estimates,
            "last_estimate_step": self._last_estimate_step,
            "pending": self._pending,
            "losses": list(self._losses),
            "loss_step": self._loss_step,
            "last_loss": self._last_loss,
            "cadence": None if self.cadence is None else self.cadence.state_dict(),
            "ema": self._ema,
            "ema_count": self._ema_count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed fit continues without a new warm-up)."""
        self.initial_lr = state_dict["initial_lr"]
        self.lr = state_dict["lr"]
        self.h0 = state_dict["h0"]
        self.h0_smoothed = state_dict["h0_smoothed"]
        self.warmup_done = bool(state_dict["warmup_done"])
        self.warmup_hvps = int(state_dict["warmup_hvps"])
        self.warmup_converged = bool(state_dict["warmup_converged"])
        self._warmup_previous = state_dict["warmup_previous"]
        self.num_estimates = int(state_dict["num_estimates"])
        self.rejected_estimates = int(state_dict["rejected_estimates"])
        self.triggers = {name: int(state_dict["triggers"].get(name, 0)) for name in TRIGGERS}
        self.last_trigger = state_dict["last_trigger"]
        self.clamped = bool(state_dict["clamped"])
        self.clamped_estimates = int(state_dict.get("clamped_estimates", 0))
        self._last_estimate_step = state_dict["last_estimate_step"]
        self._pending = state_dict["pending"]
        self._losses = deque(state_dict["losses"], maxlen=self.loss_window)
        self._loss_step = state_dict["loss_step"]
        self._last_loss = state_dict["last_loss"]
        if self.cadence is not None and state_dict.get("cadence") is not None:
            self.cadence.load_state_dict(state_dict["cadence"])
        self._ema = float(state_dict.get("ema", 0.0))
        self._ema_count = int(state_dict.get("ema_count", 0))

    def configure_for(self, optimizer: Any, momentum_aware: bool = False) -> Optional[str]:
        """Take the constants of ``optimizer`` (``torch.optim.SGD``, ``Adam`` or ``AdamW``) the rule depends on.

        The stability factor c (:func:`~lyapunov_callbacks.core.stability.rule_stability_factor`: Adam's, or heavy
        ball's with ``momentum_aware``, else 1) and SGD's largest coupled ``weight_decay`` w (added to h0; Adam's
        estimate is of P⁻¹H, so w = 0). ``rule="batch_sharpness"`` checks instead that the step direction can be
        read from the optimiser (momentum, β1 and decay are inside it).

        Returns:
            A warning for SGD with momentum under the plain-SGD factor (``momentum_aware=False``), else ``None``.

        Raises:
            ValueError: as ``rule_stability_factor`` / ``check_step_optimizer``, with the fix.
        """
        adam = type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
        groups = optimizer.param_groups
        self.weight_decay = 0.0 if adam else max(float(g.get("weight_decay", 0.0)) for g in groups)
        if self.rule == "batch_sharpness":
            check_step_optimizer(optimizer)
            return None
        self.stability_factor = rule_stability_factor(optimizer, momentum_aware)
        momentum = max(float(g.get("momentum", 0.0) or 0.0) for g in groups)
        if adam or momentum_aware or momentum <= 0:
            return None
        return (
            f"QuasiNewtonLR: the optimiser uses momentum {momentum}, but 1/h0 is the plain-SGD rule; pass "
            "momentum_aware=True for α = (1+μ)/h0 (half the heavy-ball stability limit 2(1+μ)/h0)."
        )

    def log_values(self, value: float, preconditioned: bool = False, warmup: bool = False) -> dict[str, float]:
        """What a caller logs after the estimates of one step, under short names (it adds its prefix).

        The measured curvature ``value`` (NaN if not finite) as ``sharpness`` (``rule="batch_sharpness"``),
        ``pre_h0`` (``preconditioned``: λ1(P⁻¹H)) or ``h0``; ``lr``; the counters ``rejected_estimates``,
        ``clamped_estimates`` and ``triggered_estimates``; ``every_n_steps`` with the adaptive cadence; and with
        ``warmup`` (the step ended the warm-up) ``warmup_hvps``.
        """
        name = "sharpness" if self.rule == "batch_sharpness" else ("pre_h0" if preconditioned else "h0")
        values = {"warmup_hvps": float(self.warmup_hvps)} if warmup else {}
        values[name] = finite_or_nan(value)
        values["lr"] = self.lr
        values["rejected_estimates"] = float(self.rejected_estimates)
        values["clamped_estimates"] = float(self.clamped_estimates)
        values["triggered_estimates"] = float(self.triggers["loss"] + self.triggers["rayleigh"])
        if self.cadence is not None:
            values["every_n_steps"] = float(self.every_n_steps_in_use)
        return values

    def warmup_warning(self, value: float) -> Optional[str]:
        """Why the warm-up that just ended is not converged (``warmup_max_hvps`` ran out), or ``None``."""
        if self.warmup_converged or not math.isfinite(value) or self.rule == "batch_sharpness":
            return None
        return (
            f"QuasiNewtonLR: the warm-up used warmup_max_hvps={self.warmup_max_hvps} HVPs before h0 was stable to "
            f"warmup_tol={self.warmup_tol} (last estimate {value:.6g}); training starts with it. Raise "
            "warmup_max_hvps or warmup_tol."
        )

    @property
    def warmup_hvps_left(self) -> int:
        """HVP budget left for the next warm-up estimate (0 once the warm-up is done)."""
        return 0 if self.warmup_done else self.warmup_max_hvps - self.warmup_hvps

    @property
    def target(self) -> float:
        """The product α·(h0 + w)/c this rule aims at: ``scale`` (newton, batch_sharpness: α·s) or ``edge·scale``."""
        return self.scale * (self.edge if self.rule == "edge" else 1.0)

    def lr_for(self, h0: float) -> float:
        """The LR of curvature ``h0`` before the growth limit and the clamps: ``target·c/(h0 + w)``
        (``rule="batch_sharpness"``: ``scale/h0``, h0 being the directional sharpness s)."""
        if self.rule == "batch_sharpness":
            return self.scale / h0
        return self.target * self.stability_factor / (h0 + self.weight_decay)

    # ---------------------------------------------------------------------------------------------------------
    # Decisions
    # ---------------------------------------------------------------------------------------------------------
    def wants_rayleigh(self, step: int) -> bool:
        """Whether the caller should compute the Rayleigh quotient of the last eigenvector at ``step`` (1 HVP)."""
        return (
            self.rayleigh_every is not None
            and self.warmup_done
            and self.h0_smoothed is not None
            and self._last_estimate_step is not None
            and step != self._last_estimate_step
            and (step - self._last_estimate_step) % self.rayleigh_every == 0
        )

    def needs_estimate(
        self,
        step: int,
        loss: Optional[float] = None,
        rayleigh: Optional[float] = None,
        growth: Optional[float] = None,
    ) -> bool:
        """Whether h0 should be estimated at ``step`` (before that step's update); records the signals given.

        Args:
            step: the optimiser step about to be taken (0-based, non-decreasing).
            loss: the training loss at the current weights (this step's batch), or ``None``. Recorded once per
                step, so calling again at the same step (the warm-up loop) does not count it twice.
            rayleigh: :math:`v^\\top H v` of the last unit eigenvector at the current weights, or ``None``.
            growth: a tangent vector's growth factor over the last step, or ``None``.

        Returns:
            ``True`` when an estimate is due; :attr:`last_trigger` is then set to its reason (one of
            :data:`TRIGGERS`), and :meth:`update` should follow at this step.
        """
        if not self.warmup_done:
            self._record_loss(step, loss)
            return self._ask("warmup")
        if self._last_estimate_step is not None and step == self._last_estimate_step:
            return False
        reason = None
        h_ref = self.h0_smoothed
        if rayleigh is not None and h_ref is not None and math.isfinite(rayleigh):
            if rayleigh > (1.0 + self.rayleigh_rise) * h_ref:
                reason = "rayleigh"
        if reason is None and growth is not None and math.isfinite(growth) and growth > self.growth_limit:
            reason = "growth"
        if reason is None and loss is not None and self.loss_rise is not None and step != self._loss_step:
            if self._losses and _loss_rose(loss, self._losses, self.loss_rise):
                reason = "loss"
        self._record_loss(step, loss)
        if reason is None and self._scheduled(step):
            reason = "schedule"
        return False if reason is None else self._ask(reason)

    def update(self, h0: float, step: int, hvps: int = 0) -> float:
        """Take an estimate of h0 made at ``step`` and return the LR to use from this step on.

        A NaN, infinite or ≤ 0 ``h0`` is rejected (counted, the LR kept). During the warm-up ``hvps`` (the
        estimate's HVP count) is added to the warm-up budget; the warm-up ends when this estimate agrees with the
        previous one to ``warmup_tol``, when the budget is spent or when the estimate is rejected.
        """
        h0 = float(h0)
        if self.rule == "batch_sharpness":
            return self._update_sharpness(h0, step, hvps)
        good = math.isfinite(h0) and h0 > 0
        self._record_estimate(step)
        if not self.warmup_done:
            self.warmup_hvps += int(hvps)
            previous, self._warmup_previous = self._warmup_previous, (h0 if good else None)
            agreed = good and previous is not None and abs(h0 - previous) <= self.warmup_tol * abs(h0)
            self.warmup_converged = agreed
            if agreed or not good or self.warmup_max_hvps - self.warmup_hvps < _MIN_WARMUP_HVPS:
                self.warmup_done = True
                if self.cadence is not None:  # the warm-up's last estimate is the cadence's first
                    self.cadence.update(step, h0)
            if not good:
                self._reject()
                return self.lr
            # Warm-up estimates at one point replace each other: the LR is the last one's, unlimited.
            self.h0 = self.h0_smoothed = h0
            self.lr = self._clamp(self.lr_for(h0))
            self.clamped_estimates += int(self.clamped)
            return self.lr
        if self.cadence is not None:
            self.cadence.update(step, h0)  # a bad estimate schedules the next one min_every steps later
        if not good:
            self._reject()
            return self.lr
        self.h0 = h0
        if self.h0_smoothed is None or self.smoothing == 0.0:
            self.h0_smoothed = h0
        else:
            self.h0_smoothed = max(h0, self.smoothing * self.h0_smoothed + (1.0 - self.smoothing) * h0)
        lr = self.lr_for(self.h0_smoothed)
        if self.lr is not None:
            lr = min(lr, self.lr * self.max_lr_growth)
        self.lr = self._clamp(lr)
        self.clamped_estimates += int(self.clamped)
        return self.lr

    def _record_estimate(self, step: int) -> None:
        """What every estimate records: its count and step, and the loss at it as the next loss trigger's reference."""
        self.num_estimates += 1
        self._last_estimate_step = step
        self._pending = None
        self._losses.clear()
        if self._last_loss is not None and self._loss_step == step and math.isfinite(self._last_loss):
            self._losses.append(self._last_loss)

    def _update_sharpness(self, s: float, step: int, hvps: int) -> float:
        """:meth:`update` of ``rule="batch_sharpness"``: ``s`` is the directional sharpness of this step."""
        good = math.isfinite(s) and s > 0
        trigger = self.last_trigger
        self._record_estimate(step)
        warm = not self.warmup_done
        if warm:
            # One measurement is exact (no iteration to converge): the warm-up is the first one.
            self.warmup_hvps += int(hvps)
            self.warmup_done = True
            self.warmup_converged = good
        if not good:
            self._reject()
            return self.lr
        self.h0 = s
        beta = self.sharpness_ema
        self._ema = beta * self._ema + (1.0 - beta) * s
        self._ema_count += 1
        smoothed = self._ema / (1.0 - beta**self._ema_count)
        if trigger == "loss" and s > smoothed:
            # The brake: a loss rise is answered by this step's curvature at once, and the EMA goes on from it.
            smoothed = s
            self._ema = s * (1.0 - beta**self._ema_count)
        self.h0_smoothed = smoothed
        lr = self.lr_for(smoothed)
        if self.lr is not None and not warm:
            lr = min(lr, self.lr * self.max_lr_growth)
        self.lr = self._clamp(lr)
        self.clamped_estimates += int(self.clamped)
        return self.lr

    # ---------------------------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------------------------
    def _ask(self, reason: str) -> bool:
        if self._pending != reason:
            self.triggers[reason] += 1
        self._pending = reason
        self.last_trigger = reason
        return True

    def _record_loss(self, step: int, loss: Optional[float]) -> None:
        if loss is None or step == self._loss_step:
            return
        loss = float(loss)
        self._loss_step, self._last_loss = step, loss
        if math.isfinite(loss):
            self._losses.append(loss)

    def _scheduled(self, step: int) -> bool:
        if self._last_estimate_step is None:
            return True
        if self.rule == "batch_sharpness" and step < self.warmup_steps:
            return True  # measured at every step of its warm-up
        if self.cadence is not None:
            return self.cadence.due(step)
        return step - self._last_estimate_step >= self.every_n_steps

    def _reject(self) -> None:
        self.rejected_estimates += 1
        if self.lr is None:
            self.lr = self._clamp(self.initial_lr if self.initial_lr is not None else self.min_lr)

    def _clamp(self, lr: float) -> float:
        clamped = min(max(lr, self.min_lr), self.max_lr)
        self.clamped = clamped != lr
        return clamped

    def __repr__(self) -> str:
        return (
            f"QuasiNewtonRule(rule={self.rule!r}, target={self.target:g}, stability_factor={self.stability_factor:g}, "
            f"weight_decay={self.weight_decay:g}, lr={self.lr}, h0={self.h0}, warmup_done={self.warmup_done})"
        )


def _loss_rose(loss: float, recent: deque, rise: float) -> bool:
    """``loss`` above ``(1 + rise)`` times the mean of ``recent`` (a non-finite loss counts as risen)."""
    if not math.isfinite(loss):
        return True
    reference = sum(recent) / len(recent)
    return loss > (1.0 + rise) * reference


def check_sharpness_settings(batch: str, momentum_aware: bool) -> None:
    """Refuse, at construction, the settings ``rule="batch_sharpness"`` has no use for."""
    if batch != "current":
        raise ValueError(
            f"rule='batch_sharpness' measures the step's own batch along the step's own direction; got "
            f"batch={batch!r}: use batch='current'."
        )
    if momentum_aware:
        raise ValueError(
            "rule='batch_sharpness' reads momentum from the optimiser's buffer (it is inside the step's "
            "direction); got momentum_aware=True: leave momentum_aware=False."
        )
