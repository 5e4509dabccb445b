"""TrainingGraphProducts: H δ on the micro-batch losses' own graphs, summed, against the exact Hessian."""

from __future__ import annotations

import math

import pytest
import torch

from lyapunov_callbacks.core.tangent import TangentDynamics
from lyapunov_callbacks.core.training_graph import TrainingGraphProducts


def _least_squares(seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    return a, b, w


def test_the_micro_batch_products_sum_to_the_mean_loss_hessian_times_delta():
    a, b, w = _least_squares()
    delta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    graph = TrainingGraphProducts([w])
    for rows in (slice(0, 4), slice(4, 8)):  # two micro-batches, each loss divided by 2 as Lightning passes it
        loss = 0.5 * ((a[rows] @ w - b[rows]) ** 2).mean() / 2
        assert graph.add(loss, delta) is None
        loss.backward()  # the graph was retained for the training backward
    product = graph.take(2, delta)
    exact = torch.autograd.functional.hessian(lambda x: 0.5 * ((a @ x - b) ** 2).mean(), w.detach()) @ delta
    torch.testing.assert_close(product(delta), exact, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="other than δ"):
        product(delta.clone())
    assert graph.take(2, delta) is None  # taken once


def test_a_step_whose_micro_batches_did_not_all_contribute_gives_no_product():
    a, b, w = _least_squares()
    delta = torch.ones(3, dtype=torch.float64)
    graph = TrainingGraphProducts([w])
    graph.add(0.5 * ((a @ w - b) ** 2).mean(), delta)
    assert graph.take(2, delta) is None and graph.parts == 0


def test_a_failing_product_turns_the_products_off_and_returns_the_error():
    a, b, w = _least_squares()
    graph = TrainingGraphProducts([w])
    err = graph.add(((a @ w - b) ** 2).mean().detach(), torch.ones(3, dtype=torch.float64))
    assert isinstance(err, ValueError) and not graph.enabled
    assert not TrainingGraphProducts().enabled


def test_step_or_undo_keeps_the_state_of_a_non_finite_step():
    sgd = torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1)
    tangent = TangentDynamics.from_optimizer(sgd, 3, seed=0, dtype=torch.float64)
    assert tangent.step_or_undo(lambda v: 2.0 * v) == pytest.approx(math.log(0.8), rel=1e-12)
    before = tangent.delta_theta.clone(), tangent.num_steps
    growth = tangent.step_or_undo(lambda v: torch.full_like(v, float("inf")))
    assert growth != growth  # NaN
    assert torch.equal(tangent.delta_theta, before[0]) and tangent.num_steps == before[1]
