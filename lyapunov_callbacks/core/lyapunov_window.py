"""λ over windows of consecutive steps: which steps a window holds, and the mean log growth over them."""

from __future__ import annotations

import math
from typing import Any

from lyapunov_callbacks.core.checks import check_int

__all__ = ["LyapunovWindow"]


class LyapunovWindow:
    """Windows of ``size`` consecutive optimiser steps whose mean log growth of a tangent vector is λ.

    Continuous (``every_n_steps=None``): one window after the other, every step measured. Periodic
    (``every_n_steps=N >= size``): a window starts at each step that is a multiple of N, and a partial window left
    over there (an interrupted run) is discarded. A step whose log growth is not finite is *skipped*: it counts
    towards the window's length (so a window still ends after ``size`` steps) but not towards λ, which is the
    mean over the window's finite steps (NaN if none was); :attr:`skipped` counts them all.

    Args:
        size: steps per window (>= 1).
        every_n_steps: ``None`` (continuous) or the period N >= ``size`` of the windows.

    Example::

        window = LyapunovWindow(size=20)
        for step in range(steps):
            lam = window.add(tangent.step(H.matvec))   # λ at the last step of each window, else None
    """

    def __init__(self, size: int, every_n_steps: int | None = None) -> None:
        check_int("window", size, "window=20")
        if every_n_steps == "auto":
            raise ValueError(
                "every_n_steps='auto' schedules h0 estimates from the relative drift of h0; λ has no such scale (it "
                "sits near 0 and changes sign, so a relative drift is undefined) and keeps a fixed cadence: pass "
                f"every_n_steps=None (continuous) or an integer >= window={size}."
            )
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < size
        ):
            raise ValueError(
                f"every_n_steps must be None (continuous) or an integer >= window={size}, got "
                f"{every_n_steps!r}: a window of {size} steps starts every every_n_steps steps. Pass "
                f"every_n_steps=None or every_n_steps >= {size}."
            )
        self.size = size
        self.every_n_steps = every_n_steps
        self.skipped = 0
        self.clear()

    def clear(self) -> None:
        """Drop the current window's steps."""
        self.log_growth_sum = 0.0
        self.steps = 0
        self.window_skipped = 0

    def active(self, step: int) -> bool:
        """Whether optimiser step ``step`` belongs to a window."""
        return self.every_n_steps is None or step % self.every_n_steps < self.size

    def begin(self, step: int) -> None:
        """Call at the first micro-batch of step ``step``: a periodic window starting here drops a partial one."""
        if self.every_n_steps is not None and step % self.every_n_steps == 0 and self.steps + self.window_skipped:
            self.clear()

    def add(self, log_growth: float) -> float | None:
        """Record one step's log growth (NaN or inf: a skipped step); λ of the window when it is full, else None."""
        if math.isfinite(log_growth):
            self.log_growth_sum += log_growth
            self.steps += 1
        else:
            self.skipped += 1
            self.window_skipped += 1
        if self.steps + self.window_skipped < self.size:
            return None
        value = self.log_growth_sum / self.steps if self.steps else math.nan
        self.clear()
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"log_growth_sum": self.log_growth_sum, "steps": self.steps,
                "window_skipped": self.window_skipped, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_growth_sum = float(state["log_growth_sum"])
        self.steps = int(state["steps"])
        self.window_skipped = int(state.get("window_skipped", 0))
        self.skipped = int(state.get("skipped", 0))
