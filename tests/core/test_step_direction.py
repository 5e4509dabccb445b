"""The optimiser's own step direction and the greedy LR along it, on exact quadratics in float64."""

import math

import pytest
import torch
from torch import nn

from lyapunov_callbacks.core.hessian import HessianOperator
from lyapunov_callbacks.core.step_direction import (
    StepDirection,
    check_step_optimizer,
    directional_sharpness,
    measure_directional_sharpness,
    step_direction,
)

DIM = 7
_gen = torch.Generator().manual_seed(3)
_Q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=_gen, dtype=torch.float64))
SPECTRUM = torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.03], dtype=torch.float64)
A = _Q @ torch.diag(SPECTRUM) @ _Q.T
B = torch.randn(DIM, generator=_gen, dtype=torch.float64)


class TwoPieceQuadratic(nn.Module):
    """L(θ) = ½θᵀAθ − bᵀθ with θ = (weight [2×2] flattened, bias [3]): two parameters, one exact Hessian A."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(1.0, 2.0, 4, dtype=torch.float64).reshape(2, 2))
        self.bias = nn.Parameter(torch.tensor([-1.0, 0.5, 3.0], dtype=torch.float64))

    def theta(self):
        return torch.cat([self.weight.reshape(-1), self.bias])


def loss_fn(model, batch):
    t = model.theta()
    return 0.5 * t @ (A @ t) - B @ t


def _grad(model):
    model.zero_grad(set_to_none=True)
    loss_fn(model, None).backward()
    return model.theta().detach().clone(), torch.cat([model.weight.grad.reshape(-1), model.bias.grad])


def _exact_alpha(grad_f, d, decay=0.0):
    return float(grad_f @ d) / float(d @ (A @ d) + decay * (d @ d))


OPTIMISERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_wd": lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.05),
    "dampening": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.8, dampening=0.3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.99)),
    "adam_wd_amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.2),
}


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_direction_is_the_displacement_of_the_optimiser_step(name):
    # θ_before − θ_after = lr · d, at the first step (no state yet) and at later ones.
    model = TwoPieceQuadratic()
    opt = OPTIMISERS[name](model.parameters())
    lr = opt.param_groups[0]["lr"]
    for _ in range(4):
        theta, _ = _grad(model)
        sd = step_direction(opt, list(model.parameters()))
        opt.step()
        moved = theta - model.theta().detach()
        torch.testing.assert_close(moved, lr * sd.direction, rtol=1e-10, atol=1e-14)


def test_direction_of_param_groups_with_their_own_lr():
    model = TwoPieceQuadratic()
    opt = torch.optim.SGD(
        [{"params": [model.weight], "lr": 0.02}, {"params": [model.bias], "lr": 0.06}], lr=0.02, momentum=0.5
    )
    for _ in range(3):
        theta, _ = _grad(model)
        sd = step_direction(opt, list(model.parameters()))
        opt.step()
        torch.testing.assert_close(theta - model.theta().detach(), 0.02 * sd.direction, rtol=1e-10, atol=1e-14)


def _sharpness(model, opt, backend):
    return measure_directional_sharpness(model, loss_fn, None, opt, backend=backend).sharpness


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
def test_plain_sgd_greedy_lr_is_gradient_norm_over_batch_sharpness(backend):
    model = TwoPieceQuadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        _, g = _grad(model)
        expected = float(g @ g) / float(g @ (A @ g))
        assert 1.0 / _sharpness(model, opt, backend) == pytest.approx(expected, rel=1e-6)
        opt.step()


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_greedy_lr_along_the_new_buffer(backend, nesterov):
    # The heavy-ball buffer tracked here by hand: b = μ b + g (b = g at the first step), d = b or g + μ b.
    mu, w = 0.9, 0.01
    model = TwoPieceQuadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=mu, nesterov=nesterov, weight_decay=w)
    buf = None
    for _ in range(5):
        theta, g = _grad(model)
        grad_f = g + w * theta
        buf = grad_f.clone() if buf is None else mu * buf + grad_f
        d = grad_f + mu * buf if nesterov else buf
        expected = _exact_alpha(grad_f, d, decay=w)
        assert 1.0 / _sharpness(model, opt, backend) == pytest.approx(expected, rel=1e-6)
        opt.step()


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_greedy_lr_along_m_hat_over_root_v_hat_from_the_first_step(backend, decoupled):
    beta1, beta2, eps, w = 0.9, 0.999, 1e-8, 0.05
    model = TwoPieceQuadratic()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(model.parameters(), lr=0.01, betas=(beta1, beta2), eps=eps, weight_decay=w)
    m = v = torch.zeros(DIM, dtype=torch.float64)
    for t in range(1, 5):
        theta, g = _grad(model)
        grad_f = g if decoupled else g + w * theta
        m = beta1 * m + (1 - beta1) * grad_f
        v = beta2 * v + (1 - beta2) * grad_f**2
        d = (m / (1 - beta1**t)) / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
        if t == 1:
            torch.testing.assert_close(d, grad_f / (grad_f.abs() + eps))   # before Adam has state
        if decoupled:
            d = d + w * theta
        expected = _exact_alpha(grad_f, d, decay=0.0 if decoupled else w)
        assert 1.0 / _sharpness(model, opt, backend) == pytest.approx(expected, rel=1e-6)
        opt.step()


def test_greedy_step_minimises_the_loss_along_the_step_taken():
    # On a quadratic the model is exact: θ − α* d is the minimum of L on that line, for momentum too.
    model = TwoPieceQuadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        _grad(model)
        opt.step()
    theta, _ = _grad(model)
    sd = step_direction(opt, list(model.parameters()))
    alpha = 1.0 / _sharpness(model, opt, "autograd")

    def line(a):
        t = theta - a * sd.direction
        return float(0.5 * t @ (A @ t) - B @ t)

    assert line(alpha) < min(line(alpha * 0.99), line(alpha * 1.01))


def _heavy_ball_on_quadratic(rule, steps=300, mu=0.9):
    """Full-batch heavy ball on ½θᵀHθ (κ = 1000) with the LR of ``rule`` at every step; the losses."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    h = q @ torch.diag(torch.logspace(-3, 0, 40, dtype=torch.float64)) @ q.T
    theta = torch.randn(40, generator=gen, dtype=torch.float64)
    buf, losses = None, [float(0.5 * theta @ h @ theta)]
    for _ in range(steps):
        g = h @ theta
        buf = g.clone() if buf is None else mu * buf + g
        if rule == "buffer":       # the greedy step along the buffer the step moves along
            alpha = float(g @ buf) / float(buf @ h @ buf)
        else:                      # "effective LR": α/(1 − μ) set to plain SGD's greedy ‖g‖²/gᵀHg
            alpha = (1 - mu) * float(g @ g) / float(g @ h @ g)
        theta = theta - alpha * buf
        losses.append(float(0.5 * theta @ h @ theta))
    return losses


def test_momentum_buffer_rule_is_monotone_where_the_effective_lr_rule_is_not():
    buffer = _heavy_ball_on_quadratic("buffer")
    effective = _heavy_ball_on_quadratic("effective")
    assert all(b <= a * (1 + 1e-12) for a, b in zip(buffer, buffer[1:]))          # never a rise
    assert sum(b > a for a, b in zip(effective, effective[1:])) >= 10             # it overshoots repeatedly
    assert buffer[-1] < 0.1 * effective[-1]


def test_no_descent_direction_is_nan_and_no_product_is_spent():
    model = TwoPieceQuadratic()
    with HessianOperator(model, loss_fn, None) as op:
        theta, g = _grad(model)
        step = StepDirection(direction=-g, gradient=g, decay=None)
        res = directional_sharpness(op, step)
        assert math.isnan(res.sharpness) and res.num_hvps == 0 and op.num_hvps == 0
        # Negative curvature along a descent direction: s < 0, which the rule rejects.
        concave = StepDirection(direction=g, gradient=g, decay=torch.full((DIM,), -100.0, dtype=torch.float64))
        assert directional_sharpness(op, concave).sharpness < 0


def test_measuring_changes_neither_gradients_nor_optimiser_state():
    model = TwoPieceQuadratic()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _grad(model)
    opt.step()
    _grad(model)
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    measure_directional_sharpness(model, loss_fn, None, opt)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(opt.state[model.weight][k], v) for k, v in state.items())


def test_unknown_or_maximising_optimisers_are_refused():
    model = TwoPieceQuadratic()
    with pytest.raises(ValueError, match="SGD, Adam and AdamW"):
        check_step_optimizer(torch.optim.RMSprop(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="maximize"):
        check_step_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))
