"""Lightning callbacks that measure Hessian curvature and the Lyapunov exponent of training."""

from __future__ import annotations

import importlib
from typing import Any

from lyapunov_callbacks import _moved
from lyapunov_callbacks.core.eigen import (
    EigenResult,
    MatrixOperator,
    lanczos,
    lyapunov_iteration,
    power_iteration,
    top_hessian_eigenvalues,
)
from lyapunov_callbacks.core.hessian import (
    AutogradHessian,
    FiniteDifferenceHessian,
    HessianOperator,
    StaleOperatorError,
    graph_hvp,
    preserved_state,
)
from lyapunov_callbacks.core.preconditioned import PreconditionedOperator, preconditioned_operator
from lyapunov_callbacks.core.stability import batch_sharpness, pre_stability
from lyapunov_callbacks.core.tangent import AdamTangentDynamics, TangentDynamics, tangent_dynamics

_moved.install()

# The callbacks import Lightning (seconds); load them on first access so the pure-PyTorch core
# (`import lyapunov_callbacks`, DDP worker processes) stays light.
_LAZY = {
    "HessianEigenvalueMonitor": "lyapunov_callbacks.callbacks.hessian_monitor",
    "LyapunovExponentMonitor": "lyapunov_callbacks.callbacks.lyapunov_monitor",
    "QuasiNewtonLR": "lyapunov_callbacks.callbacks.quasi_newton",
}

__all__ = [
    "AdamTangentDynamics",
    "AutogradHessian",
    "EigenResult",
    "FiniteDifferenceHessian",
    "HessianEigenvalueMonitor",
    "HessianOperator",
    "LyapunovExponentMonitor",
    "MatrixOperator",
    "PreconditionedOperator",
    "QuasiNewtonLR",
    "StaleOperatorError",
    "TangentDynamics",
    "batch_sharpness",
    "graph_hvp",
    "lanczos",
    "lyapunov_iteration",
    "power_iteration",
    "pre_stability",
    "preconditioned_operator",
    "preserved_state",
    "tangent_dynamics",
    "top_hessian_eigenvalues",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lyapunov_callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
