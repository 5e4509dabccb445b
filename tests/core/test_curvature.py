"""CurvatureEstimates and preconditioning_applies (the monitor's measurement, in the core) on exact Hessians."""

from __future__ import annotations

import pytest
import torch

from lyapunov_callbacks import HessianOperator
from lyapunov_callbacks.core.curvature import CurvatureEstimates, preconditioning_applies
from lyapunov_callbacks.core.stability import adam_stability_factor

from test_preconditioned import exact_hessian, loss_fn, make_batch, manual_diagonal, mlp, train


def _estimates(k=3):
    return CurvatureEstimates(method="lanczos", k=k, tol=1e-8, max_iter=200, seed=0, warm_start=True, gap_safety=10.0)


def test_spectrum_is_the_exact_top_k_with_its_ratio_and_inverse():
    model, batch = mlp(), make_batch()
    exact = torch.linalg.eigvalsh(exact_hessian(model, batch)).flip(0)
    with HessianOperator(model, loss_fn, batch) as op:
        values = _estimates().spectrum(op, lr=0.3)
    assert [values[f"h{i}"] for i in (1, 2)] == pytest.approx(exact[1:3].tolist(), rel=1e-6)
    assert values["h0"] == pytest.approx(float(exact[0]), rel=1e-8)
    assert values["inv_h0"] == 1.0 / values["h0"] and values["stability"] == 0.3 * values["h0"]
    assert values["num_hvps"] > 0 and "h3" not in values


def test_preconditioned_is_the_top_eigenvalue_of_p_half_h_p_half_for_adam_and_h0_for_sgd():
    model, batch = mlp(), make_batch()
    params = list(model.parameters())
    adam = torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.999))
    train(model, adam, 3)
    h = exact_hessian(model, batch)
    d = manual_diagonal(adam, params).rsqrt()
    exact = float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])
    estimates = _estimates(k=1)
    with HessianOperator(model, loss_fn, batch) as op:
        pre = estimates.preconditioned(op, adam, params, h0=123.0, lr=0.01)
        sgd = estimates.preconditioned(op, torch.optim.SGD(params, lr=0.1, momentum=0.9), params, h0=5.0, lr=0.1)
    assert pre["pre_h0"] == pytest.approx(exact, rel=1e-6) and pre["pre_num_hvps"] > 0
    assert pre["pre_stability"] == pytest.approx(0.01 * exact / adam_stability_factor(0.8), rel=1e-6)
    assert sgd == {"pre_h0": 5.0, "pre_stability": 0.1 * 5.0 / 1.9, "pre_num_hvps": 0.0}


def test_state_round_trips_and_the_cap_reaches_both_trackers():
    model, batch = mlp(), make_batch()
    first = _estimates(k=2)
    with HessianOperator(model, loss_fn, batch) as op:
        first.spectrum(op, lr=0.1)
    second = _estimates(k=2)
    second.load_state_dict(first.state_dict())
    assert torch.equal(second.tracker.eigenvectors, first.tracker.eigenvectors)
    second.set_max_iter(7)
    assert (second.tracker.max_iter, second.pre_tracker.max_iter) == (7, 7)


def test_preconditioning_applies_by_default_to_adam_only_and_refuses_an_unknown_p():
    params = list(mlp().parameters())
    assert preconditioning_applies(torch.optim.AdamW(params), params, None, "M") is True
    assert preconditioning_applies(torch.optim.SGD(params, lr=0.1), params, None, "M") is False
    assert preconditioning_applies(torch.optim.SGD(params, lr=0.1), params, True, "M") is True
    assert preconditioning_applies(torch.optim.RMSprop(params), params, False, "M") is False
    with pytest.raises(ValueError, match=r"M\(pre_h0=True\) needs torch.optim.SGD, Adam or AdamW.*RMSprop"):
        preconditioning_applies(torch.optim.RMSprop(params), params, True, "M")
    split = torch.optim.Adam([{"params": params[:2], "betas": (0.9, 0.999)}, {"params": params[2:], "betas": (0.5, 0.9)}])
    with pytest.raises(ValueError, match=r"pre_h0=True.*betas\[0\].*pre_h0=False"):
        preconditioning_applies(split, params, True, "M")
