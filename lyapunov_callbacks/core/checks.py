"""Argument checks of the curvature core and the callbacks: one exception type per kind of mistake.

Every exception subclasses ``ValueError`` (a bad value) or ``TypeError`` (a bad type), so callers that catch
the built-in types keep working, and every message names the parameter and a valid setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "CheckError",
    "NotAnIntegerError",
    "NotPositiveError",
    "UnknownChoiceError",
    "BadShapeError",
    "BadDtypeError",
    "OperatorInterfaceError",
    "NoTrainableParametersError",
    "check_choice",
    "check_dtype",
    "check_int",
    "check_operator",
    "check_positive",
    "check_shape",
    "finite_or_nan",
    "is_number",
]


class CheckError(Exception):
    """Base of the argument-check errors (catch this to catch any of them)."""


class NotAnIntegerError(CheckError, ValueError):
    """An integer setting is not an ``int`` (``bool`` excluded) or is below its minimum."""


class NotPositiveError(CheckError, ValueError):
    """A setting that must be a finite number ``> 0`` is not."""


class UnknownChoiceError(CheckError, ValueError):
    """A string setting is not one of the supported choices."""


class BadShapeError(CheckError, ValueError):
    """A tensor argument is not a tensor of the expected shape."""


class BadDtypeError(CheckError, ValueError):
    """A ``dtype`` argument is not a floating-point ``torch.dtype``."""


class NoTrainableParametersError(CheckError, ValueError):
    """A model has no parameter with ``requires_grad=True``: there is no Hessian to take."""


class OperatorInterfaceError(CheckError, TypeError):
    """An object given as a linear operator lacks part of the solvers' interface."""


def is_number(value: Any) -> bool:
    """A real number (``int`` or ``float``, not ``bool``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, example: str, minimum: int = 1) -> None:
    """Raise :class:`NotAnIntegerError` unless ``value`` is an ``int`` (not a bool) ``>= minimum``.

    ``example`` is a valid setting, quoted in the message.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise NotAnIntegerError(f"`{name}` must be an integer >= {minimum}, got {value!r}; use e.g. {example}.")


def check_positive(name: str, value: Any, example: str) -> None:
    """Raise :class:`NotPositiveError` unless ``value`` is a finite number ``> 0``; ``example`` is a valid setting."""
    if not is_number(value) or not value > 0 or not math.isfinite(value):
        raise NotPositiveError(f"`{name}` must be a finite number > 0, got {value!r}; use e.g. {example}.")


def check_real(name: str, value: Any, low: float, high: float | None = None, low_inclusive: bool = True) -> float:
    """``float(value)`` if it is a finite number ``>= low`` (``> low`` unless ``low_inclusive``) and ``<= high``;
    :class:`NotPositiveError` naming ``name`` and the range otherwise."""
    ok = is_number(value) and math.isfinite(value)
    if ok:
        ok = value >= low if low_inclusive else value > low
        if ok and high is not None:
            ok = value <= high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + ("" if high is None else f" and <= {high}")
        raise NotPositiveError(f"{name}={value!r} must be a finite number {bound}.")
    return float(value)


def check_beta(name: str, value: Any) -> float:
    """``float(value)`` if it lies in [0, 1) (a momentum or a moment's decay: a stable map); ``ValueError``
    naming ``name`` otherwise."""
    if not is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1) for a stable momentum map, got {value!r}.")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise :class:`UnknownChoiceError` unless ``value`` is one of ``choices``."""
    try:
        if value in choices:
            return
    except TypeError:  # an unhashable value against a set of choices
        pass
    raise UnknownChoiceError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")


def check_dtype(name: str, value: Any) -> None:
    """Raise :class:`BadDtypeError` unless ``value`` is a floating-point ``torch.dtype``."""
    if not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise BadDtypeError(
            f"`{name}` must be a floating-point torch.dtype (e.g. torch.float64) or None, got {value!r}."
        )


def check_shape(name: str, value: Any, dim: int, matrix: bool = False) -> None:
    """Raise :class:`BadShapeError` unless ``value`` is a tensor ``[dim]`` (or ``[dim, j]`` when ``matrix``)."""
    ndims = (1, 2) if matrix else (1,)
    if isinstance(value, torch.Tensor) and value.ndim in ndims and value.shape[0] == dim:
        return
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    want = f"[dim={dim}] or [dim={dim}, j]" if matrix else f"[dim={dim}]"
    raise BadShapeError(f"`{name}` must be a tensor of shape {want}, got {shape}.")


def check_operator(op: Any) -> None:
    """Raise :class:`OperatorInterfaceError` unless ``op`` has ``matvec``/``matmat``/``dim``/``dtype``/``device``/``num_hvps``."""
    for attr in ("matvec", "matmat", "dim", "dtype", "device", "num_hvps"):
        if not hasattr(op, attr):
            raise OperatorInterfaceError(
                f"`op` must provide matvec/matmat/dim/dtype/device/num_hvps; {type(op).__name__} lacks {attr!r}."
            )


def check_gap_safety(gap_safety: Any) -> None:
    """Raise ``ValueError`` unless ``gap_safety`` (the gap rule's safety factor) is a finite number ``>= 1``."""
    check_positive("gap_safety", gap_safety, "gap_safety=10")
    if gap_safety < 1:
        raise ValueError(
            f"gap_safety={gap_safety!r} must be >= 1 (it divides the tolerance of the gap estimate); use gap_safety=10."
        )


def finite_or_nan(value: float) -> float:
    """``value`` if finite, else NaN (a non-finite estimate is reported as NaN, not as ±inf)."""
    return value if math.isfinite(value) else float("nan")
