"""When to estimate h0 next: an adaptive, deterministic cadence chosen from how fast the logged h0 moves.

No model, no optimiser, no Lightning: the caller reports each estimate ``(step, h0)`` (and, optionally, the
training loss of every step) and this object answers at each step whether an estimate is due. It is what
``every_n_steps="auto"`` means in :class:`~lyapunov_callbacks.callbacks.hessian_monitor.HessianEigenvalueMonitor` and
:class:`~lyapunov_callbacks.core.quasi_newton_rule.QuasiNewtonRule`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional, Union

from lyapunov_callbacks.core.checks import NotPositiveError, check_int, check_positive, is_number

__all__ = ["AUTO", "AdaptiveCadence", "check_every_n_steps", "is_auto"]

#: The value of ``every_n_steps`` that selects :class:`AdaptiveCadence`.
AUTO = "auto"


def is_auto(every_n_steps: Any) -> bool:
    """Whether ``every_n_steps`` asks for the adaptive cadence (the string ``"auto"``)."""
    return isinstance(every_n_steps, str) and every_n_steps == AUTO


def check_every_n_steps(every_n_steps: Any, example: str = "every_n_steps=10") -> None:
    """Raise a :class:`~lyapunov_callbacks.core.checks.NotAnIntegerError` unless ``every_n_steps`` is an int ≥ 1 or
    ``"auto"``."""
    if is_auto(every_n_steps):
        return
    check_int("every_n_steps", every_n_steps, f'{example} or every_n_steps="auto" (adaptive)')


class AdaptiveCadence:
    r"""Schedule the next estimate of h0 so that h0 is predicted to move by ``drift_tol`` (relatively) until then.

    After each estimate :math:`(t_i, h_i)` the rate of relative change of h0 is the slope :math:`r` of a
    least-squares line through the last ``history`` points :math:`(t_j, \log h_j)` (a relative change per step),
    and the next estimate is :math:`n` steps later,

    .. math:: n = \mathrm{clamp}\big(\lfloor \text{drift\_tol} / |r| \rfloor,\ \text{min\_every},\
       \min(\text{max\_every},\ \lfloor\text{max\_growth}\cdot n_{i-1}\rfloor)\big),

    :math:`n_{i-1}` the interval scheduled at the estimate before, like an integrator choosing its step from
    the error it sees. The line over several estimates, not the last
    difference, is what makes the rate that of the trend: at the edge of stability h0 oscillates by a few percent
    from step to step, and a two-point difference of that noise would read as drift and keep the cadence at
    ``min_every``; over ``history = 4`` equally spaced estimates noise of relative size σ gives a slope of about
    :math:`\sigma/(\sqrt5\,n)`, so the interval still grows when :math:`\sigma < \sqrt5\,\text{drift\_tol}`.
    A jump of relative size J at the last estimate gives a slope 0.3 J/n: the next interval is
    :math:`n\,\text{drift\_tol}/(0.3 J)` at once: a sharpening that moved h0 by more than
    :math:`\text{drift\_tol}/0.3` (17 % at the default) by the first estimate after it, i.e. within one interval,
    shortens the next interval there; a smaller move is answered over the following estimates, which see the
    trend in more points and converge on ``drift_tol/r``. (An instability that the step makes blow up is the
    loss trigger's: it answers at the next step.)
    ``history = 4`` rather than 3 because h0 of the small MLP of ``benchmarks/cadence.py`` oscillates from step
    to step at the edge of stability, a noise the line through 3 points read as drift often enough to keep the
    interval near ``min_every``.

    The growth limit ``max_growth`` (an interval may at most double per estimate by default) keeps one quiet
    stretch from jumping to ``max_every``; a shrink applies at once. It is taken on the interval scheduled, not
    on the steps since the last estimate, so an estimate brought forward by the loss trigger does not by itself
    shorten the schedule (only the rate it measures does). The first interval is ``min_every``; an
    estimate that is NaN, infinite or ≤ 0 is not used for the rate and the next estimate comes ``min_every``
    steps later.

    **Loss trigger** (``loss_rise``, optional): :meth:`observe_loss` records the training loss of each step; a
    loss above ``(1 + loss_rise)`` times the mean of the last ``loss_window`` losses since the last estimate
    makes an estimate due at the next step (an instability multiplies the loss before a scheduled estimate
    would see h0 move). Callers that have their own loss trigger (``QuasiNewtonRule``) pass ``loss_rise=None``.

    **Deterministic**: every decision is a function of the reported steps, h0 values and losses (no wall
    time), so two runs that log the same values estimate at the same steps. :meth:`state_dict` holds all of
    it for a resume.

    Args:
        drift_tol: predicted relative change of h0 (> 0) between two estimates, default 0.05.
        min_every: shortest interval in steps (≥ 1), default 10 (the fixed default: ``"auto"`` never
            schedules more often; a loss trigger may come earlier).
        max_every: longest interval in steps (≥ ``min_every``), default 200.
        history: number of recent estimates (≥ 2) the rate is fitted to, default 4.
        max_growth: largest factor (> 1) by which one interval may exceed the previous one, default 2.
        loss_rise: relative loss rise (> 0) that brings the next estimate forward, default 1.0 (the loss
            doubled over its recent mean); ``None`` disables it.
        loss_window: number of recent losses (≥ 1) whose mean is the reference, default 10.

    Raises:
        ValueError: for ``drift_tol``/``loss_rise`` ≤ 0 or not finite, ``min_every`` < 1, ``max_every`` <
            ``min_every``, ``history`` < 2, ``max_growth`` ≤ 1, ``loss_window`` < 1 (each message names it).

    Example::

        from lyapunov_callbacks.core.cadence import AdaptiveCadence

        cadence = AdaptiveCadence(drift_tol=0.05, min_every=10, max_every=200)
        for step, batch in enumerate(loader):
            if cadence.due(step):
                h0 = top_hessian_eigenvalues(model, loss_fn, probe, tol=1e-2).eigenvalues[0]
                cadence.update(step, float(h0))       # schedules the next estimate
            loss = train_step(batch)
            cadence.observe_loss(step, float(loss))  # a spike makes the next step due
    """

    def __init__(
        self,
        drift_tol: float = 0.05,
        min_every: int = 10,
        max_every: int = 200,
        history: int = 4,
        max_growth: float = 2.0,
        loss_rise: Optional[float] = 1.0,
        loss_window: int = 10,
    ) -> None:
        check_positive("drift_tol", drift_tol, "drift_tol=0.05")
        check_int("min_every", min_every, "min_every=10")
        check_int("max_every", max_every, f"max_every=200 (at least min_every={min_every})", minimum=min_every)
        check_int("history", history, "history=3", minimum=2)
        if not is_number(max_growth) or not max_growth > 1.0 or not math.isfinite(max_growth):
            raise NotPositiveError(
                f"`max_growth` must be a finite number > 1 (the largest factor from one interval to the next), got "
                f"{max_growth!r}; use e.g. max_growth=2.0."
            )
        if loss_rise is not None:
            check_positive("loss_rise", loss_rise, "loss_rise=1.0, or None to disable the loss trigger")
        check_int("loss_window", loss_window, "loss_window=10")
        self.drift_tol = float(drift_tol)
        self.min_every = min_every
        self.max_every = max_every
        self.history = history
        self.max_growth = float(max_growth)
        self.loss_rise = None if loss_rise is None else float(loss_rise)
        self.loss_window = loss_window
        self.reset()

    # ------------------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget every estimate: the next step is due."""
        self.every_n_steps: int = self.min_every  # the interval scheduled after the last estimate
        self.next_step: Optional[int] = None  # None: the first step asked about is due
        self.last_step: Optional[int] = None
        self.rate: Optional[float] = None  # the last fitted |d log h0 / d step|
        self.loss_triggers = 0
        self._points: deque = deque(maxlen=self.history)  # (step, log h0) of the last good estimates
        self._losses: deque = deque(maxlen=self.loss_window)
        self._loss_step: Optional[int] = None
        self._triggered = False

    def state_dict(self) -> dict[str, Any]:
        """Everything the schedule depends on besides the settings."""
        return {
            "every_n_steps": self.every_n_steps,
            "next_step": self.next_step,
            "last_step": self.last_step,
            "rate": self.rate,
            "loss_triggers": self.loss_triggers,
            "points": [list(p) for p in self._points],
            "losses": list(self._losses),
            "loss_step": self._loss_step,
            "triggered": self._triggered,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: a resumed run estimates at the steps the uninterrupted one would."""
        self.every_n_steps = int(state_dict["every_n_steps"])
        self.next_step = state_dict["next_step"]
        self.last_step = state_dict["last_step"]
        self.rate = state_dict["rate"]
        self.loss_triggers = int(state_dict["loss_triggers"])
        self._points = deque((tuple(p) for p in state_dict["points"]), maxlen=self.history)
        self._losses = deque(state_dict["losses"], maxlen=self.loss_window)
        self._loss_step = state_dict["loss_step"]
        self._triggered = bool(state_dict["triggered"])

    # --------------------------------------------------------------------------------------------- decisions
    def due(self, step: int) -> bool:
        """Whether an estimate is due at ``step``: scheduled, or brought forward by a loss spike."""
        if self.last_step is not None and step == self.last_step:
            return False
        return self._triggered or self.next_step is None or step >= self.next_step

    def observe_loss(self, step: int, loss: Optional[float]) -> bool:
        """Record the training loss of ``step`` (once per step); return whether it triggers an estimate."""
        if self.loss_rise is None or loss is None or step == self._loss_step:
            return False
        loss = float(loss)
        self._loss_step = step
        rose = not math.isfinite(loss) or (
            bool(self._losses) and loss > (1.0 + self.loss_rise) * (sum(self._losses) / len(self._losses))
        )
        if math.isfinite(loss):
            self._losses.append(loss)
        if rose and not self._triggered:
            self._triggered = True
            self.loss_triggers += 1
        return rose

    def update(self, step: int, h0: float) -> int:
        """Take the estimate ``h0`` made at ``step`` and return the interval to the next one (in steps)."""
        h0 = float(h0)
        previous = self.last_step
        self.last_step = step
        self._triggered = False
        # The losses since this estimate are the next trigger's reference.
        last_loss = self._losses[-1] if (self._losses and self._loss_step == step) else None
        self._losses.clear()
        if last_loss is not None:
            self._losses.append(last_loss)
        if not (math.isfinite(h0) and h0 > 0):
            interval = self.min_every
        else:
            self._points.append((int(step), math.log(h0)))
            interval = self._interval(previous is None)
        self.every_n_steps = interval
        self.next_step = step + interval
        return interval

    # --------------------------------------------------------------------------------------------- helpers
    def _interval(self, first: bool) -> int:
        if len(self._points) < 2 or first:
            self.rate = None
            return self.min_every
        self.rate = abs(_slope(self._points))
        longest = min(self.max_every, max(self.min_every, math.floor(self.max_growth * self.every_n_steps)))
        if self.rate * longest <= self.drift_tol:
            return longest
        return max(self.min_every, min(longest, math.floor(self.drift_tol / self.rate)))

    def __repr__(self) -> str:
        return (
            f"AdaptiveCadence(drift_tol={self.drift_tol:g}, min_every={self.min_every}, max_every={self.max_every}, "
            f"every_n_steps={self.every_n_steps}, next_step={self.next_step})"
        )


def _slope(points: Union[deque, list]) -> float:
    """Least-squares slope of ``y`` over ``t`` through ``points = [(t, y), ...]`` (at least two distinct t)."""
    n = len(points)
    t_mean = sum(t for t, _ in points) / n
    y_mean = sum(y for _, y in points) / n
    stt = sum((t - t_mean) ** 2 for t, _ in points)
    if stt == 0:
        return 0.0
    return sum((t - t_mean) * (y - y_mean) for t, y in points) / stt
