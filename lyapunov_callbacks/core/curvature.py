"""What a curvature monitor reads off one Hessian operator: h0 and the top k, λ1(P⁻¹H) and the batch sharpness.

Pure PyTorch. :class:`CurvatureEstimates` holds the two warm-started trackers a monitor carries from one
measurement to the next (the spectrum of H, and the top eigenpair of P^{-1/2} H P^{-1/2}) and turns one operator
into the values a monitor logs, under short names (``h0``, ``inv_h0``, ``h1`` …, ``stability``, ``num_hvps``,
``pre_h0``, ``pre_stability``, ``pre_num_hvps``); the caller adds its tag prefix.
"""

from __future__ import annotations

from typing import Any

import torch

from lyapunov_callbacks.core.checks import finite_or_nan
from lyapunov_callbacks.core.eigen import LinearOperator
from lyapunov_callbacks.core.preconditioned import step_preconditioned
from lyapunov_callbacks.core.stability import stability_factor
from lyapunov_callbacks.core.tangent import _ADAM_TYPES, ordered_parameters
from lyapunov_callbacks.core.tracker import EigenTracker

__all__ = ["CurvatureEstimates", "preconditioning_applies"]

_PRECONDITIONED_TYPES = (torch.optim.SGD, *_ADAM_TYPES)


class CurvatureEstimates:
    """h0 and the top ``k`` eigenvalues of successive Hessians, and λ1(P⁻¹H) of the optimiser's preconditioner.

    Args:
        method, k, tol, max_iter, seed, warm_start, gap_safety: of the spectrum's
            :class:`~lyapunov_callbacks.core.tracker.EigenTracker` (two-vector warm start, gap stopping rule).
            λ1(P⁻¹H) has its own tracker (``k=1``, seed ``seed + 1``, the residual stopping rule: P moves with
            Adam's v between measurements).
    """

    def __init__(
        self, *, method: str, k: int, tol: float, max_iter: int, seed: int, warm_start: bool, gap_safety: float
    ) -> None:
        self.tracker = EigenTracker(
            method=method, k=k, tol=tol, max_iter=max_iter, seed=seed, warm_start=warm_start,
            two_vector_start=True, gap_safety=gap_safety,
        )
        self.pre_tracker = EigenTracker(
            method=method, k=1, tol=tol, max_iter=max_iter, seed=seed + 1, warm_start=warm_start, stop="residual"
        )

    def set_max_iter(self, max_iter: int) -> None:
        """Cap every solve at ``max_iter`` HVPs (e.g. a pipeline check)."""
        self.tracker.max_iter = self.pre_tracker.max_iter = max_iter

    def spectrum(self, op: LinearOperator, lr: float) -> dict[str, float]:
        """``h0``, ``inv_h0`` (1/h0), ``h1`` … ``h{k-1}``, ``stability`` (α·h0) and ``num_hvps`` of ``op``.

        A non-finite value is NaN (as is ``inv_h0`` for h0 = 0).
        """
        result = self.tracker.estimate(op)
        values = [float(v) for v in result.eigenvalues.detach().cpu()]
        h0 = values[0]
        metrics = {"h0": finite_or_nan(h0), "inv_h0": finite_or_nan(1.0 / h0) if h0 != 0 else float("nan")}
        for i in range(1, len(values)):
            metrics[f"h{i}"] = finite_or_nan(values[i])
        metrics["stability"] = finite_or_nan(lr * h0)
        metrics["num_hvps"] = float(result.num_hvps)
        return metrics

    def preconditioned(
        self, op: LinearOperator, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], h0: float, lr: float
    ) -> dict[str, float]:
        """``pre_h0`` = λ1(P⁻¹H), ``pre_stability`` = α·λ1(P⁻¹H)/c and ``pre_num_hvps``.

        P is :func:`~lyapunov_callbacks.core.preconditioned.step_preconditioner` of the coming step and c the
        optimiser's :func:`~lyapunov_callbacks.core.stability.stability_factor`. SGD: P = I, so ``pre_h0`` is
        ``h0`` (no second solve).
        """
        if isinstance(optimizer, _ADAM_TYPES):
            result = self.pre_tracker.estimate(step_preconditioned(op, optimizer, params))
            pre_h0, hvps = float(result.eigenvalues[0]), int(result.num_hvps)
        else:
            pre_h0, hvps = h0, 0
        return {
            "pre_h0": finite_or_nan(pre_h0),
            "pre_stability": finite_or_nan(lr * pre_h0 / stability_factor(optimizer)),
            "pre_num_hvps": float(hvps),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "pre_tracker": self.pre_tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        if "pre_tracker" in state:
            self.pre_tracker.load_state_dict(state["pre_tracker"])
        elif state.get("pre_vector") is not None:  # a checkpoint of an earlier release
            self.pre_tracker.eigenvectors = state["pre_vector"].clone()


def preconditioning_applies(
    optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor], requested: bool | None, owner: str
) -> bool:
    """Whether λ1(P⁻¹H) is measured: ``requested`` None = for Adam/AdamW only.

    Raises:
        ValueError: ``requested=True`` with an optimiser whose P is unknown (not SGD, Adam or AdamW), Adam groups
            that differ in β1, SGD groups that differ in momentum, or parameters the optimiser does not hold.
    """
    on = isinstance(optimizer, _ADAM_TYPES) if requested is None else requested
    if not on:
        return False
    if type(optimizer) not in _PRECONDITIONED_TYPES:
        raise ValueError(
            f"{owner}(pre_h0=True) needs torch.optim.SGD, Adam or AdamW (whose preconditioner P is known); got "
            f"{type(optimizer).__name__}. Use pre_h0=None (auto) or pre_h0=False."
        )
    try:
        ordered_parameters(optimizer, params)
        stability_factor(optimizer)
    except ValueError as err:
        raise ValueError(f"{owner}(pre_h0=True): {err} Pass pre_h0=False to measure h0 alone.") from err
    return True
