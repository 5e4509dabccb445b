"""The argument checks of ``lyapunov_callbacks.core.checks``: one exception type per kind of mistake, each a
ValueError or TypeError, with a message naming the parameter."""

from __future__ import annotations

import math

import pytest
import torch

from lyapunov_callbacks import MatrixOperator, lanczos, top_hessian_eigenvalues
from lyapunov_callbacks.core import checks as C


@pytest.mark.parametrize(
    ("error", "base"),
    [
        (C.NotAnIntegerError, ValueError),
        (C.NotPositiveError, ValueError),
        (C.UnknownChoiceError, ValueError),
        (C.BadShapeError, ValueError),
        (C.BadDtypeError, ValueError),
        (C.NoTrainableParametersError, ValueError),
        (C.OperatorInterfaceError, TypeError),
    ],
)
def test_each_error_is_a_builtin_kind_and_a_check_error(error, base):
    assert issubclass(error, base) and issubclass(error, C.CheckError)


def test_check_int():
    C.check_int("k", 3, "k=1")
    C.check_int("steps", 0, "steps=0", minimum=0)
    for bad in (0, -1, 1.0, True, "2", None):
        with pytest.raises(C.NotAnIntegerError, match=r"`k` must be an integer >= 1, got .*; use e.g. k=1"):
            C.check_int("k", bad, "k=1")


def test_check_positive():
    C.check_positive("tol", 1e-4, "tol=1e-4")
    C.check_positive("tol", 2, "tol=1e-4")
    for bad in (0, 0.0, -1e-3, math.nan, math.inf, True, "1e-3", None):
        with pytest.raises(C.NotPositiveError, match=r"`tol` must be a finite number > 0"):
            C.check_positive("tol", bad, "tol=1e-4")
    assert C.is_number(1) and C.is_number(0.5) and not C.is_number(True) and not C.is_number("1")


def test_check_choice():
    C.check_choice("method", "power", ("lanczos", "power"))
    for bad in ("Power", None, ["power"], 3):
        with pytest.raises(C.UnknownChoiceError, match=r"`method` must be one of 'lanczos', 'power', got"):
            C.check_choice("method", bad, ("lanczos", "power"))


def test_check_dtype_shape_operator():
    C.check_dtype("dtype", torch.float64)
    for bad in (torch.int64, "float64", None):
        with pytest.raises(C.BadDtypeError, match="`dtype` must be a floating-point torch.dtype"):
            C.check_dtype("dtype", bad)
    C.check_shape("v", torch.zeros(4), 4)
    C.check_shape("init", torch.zeros(4, 2), 4, matrix=True)
    with pytest.raises(C.BadShapeError, match=r"`v` must be a tensor of shape \[dim=4\], got \(4, 2\)"):
        C.check_shape("v", torch.zeros(4, 2), 4)
    with pytest.raises(C.BadShapeError, match=r"\[dim=4\] or \[dim=4, j\], got list"):
        C.check_shape("init", [0.0] * 4, 4, matrix=True)
    C.check_operator(MatrixOperator(torch.eye(2)))
    with pytest.raises(C.OperatorInterfaceError, match="lacks 'matvec'"):
        C.check_operator(object())


def test_solvers_raise_the_specific_types():
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(C.NotAnIntegerError, match="k=5"):
        lanczos(op, k=5)
    with pytest.raises(C.NotPositiveError, match="tol"):
        lanczos(op, tol=-1.0)
    with pytest.raises(C.BadShapeError, match="init"):
        lanczos(op, init=torch.zeros(3))
    with pytest.raises(C.OperatorInterfaceError):
        lanczos(torch.eye(4))
    model = torch.nn.Linear(2, 1).double()
    with pytest.raises(C.UnknownChoiceError, match="method"):
        top_hessian_eigenvalues(model, lambda m, b: m(b).sum(), torch.ones(1, 2, dtype=torch.float64), method="x")
