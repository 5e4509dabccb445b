"""Preconditioned sharpness λ1(P⁻¹H) against eigvalsh(P^{-1/2} H P^{-1/2}) of an exact Hessian, P from Adam's state."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lyapunov_callbacks import HessianOperator, MatrixOperator, lanczos, power_iteration
from lyapunov_callbacks.core.preconditioned import PreconditionedOperator, preconditioned_operator, preconditioner_diagonal


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def exact_hessian(model, batch):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta):
        pieces = dict(zip(names, (t.view(s) for t, s in zip(theta.split(sizes), shapes))))
        return loss_fn(lambda x: functional_call(model, pieces, (x,)), batch)

    return torch.autograd.functional.hessian(f, flat)


def train(model, opt, steps, seed=5):
    for i in range(steps):
        opt.zero_grad()
        loss_fn(model, make_batch(seed + i)).backward()
        opt.step()


def manual_diagonal(opt, params):
    """√(v / (1 − β2^step)) + ε per parameter from the optimiser state, written out independently."""
    out = []
    for p in params:
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        st = opt.state[p]
        v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
        out.append((v / (1 - group["betas"][1] ** float(st["step"]))).sqrt().reshape(-1) + group["eps"])
    return torch.cat(out)


@pytest.mark.parametrize(
    ("cls", "kwargs", "split"),
    [
        (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1), False),
        (torch.optim.Adam, dict(lr=0.01, amsgrad=True), False),
        (torch.optim.Adam, dict(lr=0.01, eps=1e-3), True),
    ],
    ids=["adamw", "adam_amsgrad", "adam_two_groups_large_eps"],
)
def test_pre_h0_matches_eigvalsh_of_the_exact_preconditioned_hessian(cls, kwargs, split):
    model = mlp()
    if split:  # groups in reverse model order, with their own β2 and ε
        groups = [{"params": list(model[2].parameters()), "betas": (0.9, 0.99), "eps": 1e-6},
                  {"params": list(model[0].parameters())}]
    else:
        groups = [{"params": list(model.parameters())}]
    opt = cls(groups, **kwargs)
    train(model, opt, 7)
    params = list(model.parameters())
    diag = preconditioner_diagonal(opt, params, dtype=torch.float64)
    assert torch.allclose(diag, manual_diagonal(opt, params), rtol=1e-12, atol=0)
    batch = make_batch(0)
    H = exact_hessian(model, batch)
    S = H / diag.sqrt().unsqueeze(0) / diag.sqrt().unsqueeze(1)
    exact = torch.linalg.eigvalsh(S)
    # The same eigenvalues as P⁻¹H (similar matrices).
    nonsym = torch.linalg.eigvals(H / diag.unsqueeze(1)).real.sort().values
    assert torch.allclose(exact, nonsym, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))
    with HessianOperator(model, loss_fn, batch) as op:
        pre = preconditioned_operator(op, opt, params)
        res = lanczos(pre, k=2, tol=1e-8, max_iter=pre.dim)
        assert float(res.eigenvalues[0]) == pytest.approx(float(exact[-1]), rel=1e-3)
        assert float(res.eigenvalues[1]) == pytest.approx(float(exact[-2]), rel=1e-3)
        # Warm start from the eigenvector: power iteration needs few products.
        before = op.num_hvps
        warm = power_iteration(pre, k=1, tol=1e-6, max_iter=50, init=res.eigenvectors[:, 0])
        assert float(warm.eigenvalues[0]) == pytest.approx(float(exact[-1]), rel=1e-3)
        assert op.num_hvps - before == warm.num_hvps <= 5
        V = torch.randn(pre.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(pre.matmat(V), S @ V, rtol=1e-8, atol=1e-10)
        assert torch.allclose(pre.matvec(V[:, 0]), S @ V[:, 0], rtol=1e-8, atol=1e-10)


def test_no_state_before_the_first_step_gives_none_and_sgd_gives_identity():
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=0.01)
    with HessianOperator(model, loss_fn, make_batch()) as op:
        assert preconditioner_diagonal(opt, params) is None
        assert preconditioned_operator(op, opt, params) is None
        sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        pre = preconditioned_operator(op, sgd, params)
        v = torch.randn(op.dim, dtype=torch.float64)
        assert torch.equal(pre.matvec(v), op.matvec(v))
    train(model, opt, 1)
    assert preconditioner_diagonal(opt, params) is not None


def test_validation():
    model = mlp()
    params = list(model.parameters())
    A = MatrixOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape \\[dim=3\\]"):
        PreconditionedOperator(A, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive finite"):
        PreconditionedOperator(A, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="lacks 'matvec'"):
        PreconditionedOperator(object(), torch.ones(3))
    with pytest.raises(TypeError, match="RMSprop"):
        preconditioner_diagonal(torch.optim.RMSprop(params), params)
    with pytest.raises(ValueError, match="not a trainable parameter"):
        preconditioner_diagonal(torch.optim.Adam(params[:2]), params)
    opt = torch.optim.Adam(params, eps=0.0)
    train(model, opt, 1)
    next(iter(opt.state.values()))["exp_avg_sq"].zero_()
    with pytest.raises(ValueError, match="eps > 0"):
        preconditioner_diagonal(opt, params)


def test_adam_core_names_are_exported_without_importing_lightning():
    import subprocess
    import sys

    code = (
        "import sys, lyapunov_callbacks as lc\n"
        "from lyapunov_callbacks import (AdamTangentDynamics, PreconditionedOperator, batch_sharpness, "
        "pre_stability, preconditioned_operator, tangent_dynamics)\n"
        "assert {'AdamTangentDynamics', 'PreconditionedOperator', 'batch_sharpness', 'pre_stability', "
        "'preconditioned_operator', 'tangent_dynamics'} <= set(lc.__all__)\n"
        "assert preconditioned_operator.__module__ == 'lyapunov_callbacks.core.preconditioned'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
