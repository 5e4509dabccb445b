"""Preconditioned Hessian operator P^{-1/2} H P^{-1/2}, P = diag(√v̂ + ε) from Adam's state (P = I for SGD)."""

from __future__ import annotations

from typing import Any

import torch

from lyapunov_callbacks.core.space import local_tensor
from lyapunov_callbacks.core.tangent import _ADAM_TYPES, _adam_parameters, check_adam, ordered_parameters

__all__ = [
    "PreconditionedOperator", "preconditioned_operator", "preconditioner_diagonal", "step_preconditioned",
    "step_preconditioner",
]


def preconditioner_diagonal(
    optimizer: torch.optim.Optimizer,
    params: Any = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    r"""The diagonal of the optimiser's preconditioner :math:`P` in the flat parameter order, or ``None``.

    For ``torch.optim.Adam`` / ``AdamW``, :math:`P = \mathrm{diag}(\sqrt{\hat v} + \epsilon)` with
    :math:`\hat v = v / (1 - \beta_2^{t})`, :math:`v` the parameter's ``exp_avg_sq`` (``max_exp_avg_sq`` under
    ``amsgrad``, the one Adam divides by) and :math:`t` its own ``state["step"]`` — the denominator of the last
    step, which the next step uses up to the new gradient's contribution to :math:`v`. ``β2``, ``ε`` are read
    per param group. For ``torch.optim.SGD``, :math:`P = I` (a vector of ones).

    Args:
        optimizer: ``torch.optim.SGD``, ``Adam`` or ``AdamW``.
        params: parameters in the flat order of the Hessian operator (``None``: the optimiser's order).
        dtype: dtype of the result (default float32).
        device: device of the result (default: the first parameter's).

    Returns:
        A ``[dim]`` tensor of positive entries, or ``None`` for Adam before its first step (no ``v`` yet;
        a monitor skips ``pre_h0`` then).

    Raises:
        TypeError: another optimiser.
        ValueError: ``params`` not updated by the optimiser; a zero entry (``v = 0`` with ``eps = 0``), for
            which :math:`P^{-1/2}` does not exist.

    Example::

        p = preconditioner_diagonal(opt, list(model.parameters()), dtype=torch.float64)
    """
    params = ordered_parameters(optimizer, params)
    dtype = torch.float32 if dtype is None else dtype
    device = (params[0].device if params else torch.device("cpu")) if device is None else torch.device(device)
    if type(optimizer) in _ADAM_TYPES:
        check_adam(optimizer, "preconditioner_diagonal")
        records = _adam_parameters(optimizer, params)
        if any(r.v is None for r in records):
            return None
        diag = torch.cat([
            ((r.vmax if r.amsgrad else r.v).to(device=device, dtype=dtype) / (1 - r.beta2**r.step)).sqrt() + r.eps
            for r in records
        ])
        if bool((diag <= 0).any()):
            raise ValueError(
                "the Adam preconditioner has a zero entry (v = 0 with eps = 0), so P^{-1/2} does not exist; "
                "use eps > 0."
            )
        return diag
    if isinstance(optimizer, torch.optim.SGD):
        return torch.ones(sum(local_tensor(p).numel() for p in params), dtype=dtype, device=device)
    raise TypeError(
        f"preconditioner_diagonal supports torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW; got "
        f"{type(optimizer).__module__}.{type(optimizer).__name__}."
    )


def step_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: Any = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""The diagonal of the preconditioner :math:`P` of the optimiser's coming step, in the flat parameter order.

    The one policy for :math:`P`, also before Adam has state. Once Adam has stepped, :func:`preconditioner_diagonal`:
    :math:`\sqrt{\hat v} + \epsilon` of the last step. Before its first step there is no :math:`v`; the first step
    sets :math:`v_1 = (1-eta_2)g^2`, so :math:`\hat v_1 = g^2` and it divides by :math:`|g| + \epsilon`, with
    :math:`g` the step's gradient, read from each parameter's ``.grad`` (a parameter without one: :math:`\epsilon`).
    Call it where ``.grad`` holds the step's gradient (``on_before_optimizer_step``). SGD: :math:`P = I`.

    Args:
        optimizer: ``torch.optim.SGD``, ``Adam`` or ``AdamW``.
        params: parameters in the operator's flat order (``None``: the optimiser's order).
        dtype: dtype of the result (default float32).
        device: device of the result (default: the first parameter's).

    Raises:
        TypeError / ValueError: as :func:`preconditioner_diagonal`.
    """
    diagonal = preconditioner_diagonal(optimizer, params, dtype=dtype, device=device)
    if diagonal is not None:
        return diagonal
    params = ordered_parameters(optimizer, params)
    dtype = torch.float32 if dtype is None else dtype
    device = params[0].device if device is None else torch.device(device)
    eps = {id(p): float(g["eps"]) for g in optimizer.param_groups for p in g["params"]}
    return torch.cat([
        (local_tensor(p.grad).detach().abs() if p.grad is not None else torch.zeros_like(local_tensor(p)))
        .flatten().to(dtype) + eps[id(p)]
        for p in params
    ]).to(device)


class PreconditionedOperator:
    r"""The symmetric operator :math:`P^{-1/2} H P^{-1/2}` for a diagonal :math:`P`, wrapping any operator ``H``.

    :math:`P^{-1/2} H P^{-1/2}` is similar to :math:`P^{-1} H` (same eigenvalues), so its top eigenvalue is the
    preconditioned sharpness :math:`\lambda_1(P^{-1}H)`, found by the symmetric solvers (``lanczos``,
    ``power_iteration``) with their warm starts. A product costs one product of ``H``. An eigenvector
    :math:`u` of this operator maps to the eigenvector :math:`P^{-1/2}u` of :math:`P^{-1}H`.

    Args:
        op: an operator with ``matvec``/``matmat``/``dim``/``dtype``/``device``/``num_hvps`` (e.g.
            :class:`~lyapunov_callbacks.core.hessian.HessianOperator`, :class:`~lyapunov_callbacks.core.eigen.MatrixOperator`).
        diagonal: ``[dim]`` positive diagonal of :math:`P`.

    Raises:
        ValueError: ``diagonal`` of the wrong shape, or with an entry that is not positive and finite.

    Example::

        with HessianOperator(model, loss_fn, batch) as H:
            pre = PreconditionedOperator(H, preconditioner_diagonal(opt, list(model.parameters())))
            pre_h0 = float(lanczos(pre, k=1).eigenvalues[0])
    """

    def __init__(self, op: Any, diagonal: torch.Tensor) -> None:
        for attr in ("matvec", "matmat", "dim", "dtype", "device", "num_hvps"):
            if not hasattr(op, attr):
                raise TypeError(
                    f"op must provide matvec/matmat/dim/dtype/device/num_hvps; {type(op).__name__} lacks {attr!r}."
                )
        if not isinstance(diagonal, torch.Tensor) or diagonal.shape != (op.dim,):
            shape = tuple(diagonal.shape) if isinstance(diagonal, torch.Tensor) else type(diagonal).__name__
            raise ValueError(f"diagonal must be a tensor of shape [dim={op.dim}], got {shape}.")
        if not bool(torch.isfinite(diagonal).all()) or bool((diagonal <= 0).any()):
            raise ValueError("diagonal must hold positive finite entries (P = diag(√v̂ + ε) with ε > 0).")
        self.op = op
        self.dim = op.dim
        self.dtype = op.dtype
        self.device = op.device
        self.diagonal = diagonal.detach().to(device=op.device, dtype=op.dtype)
        self.inv_sqrt = self.diagonal.rsqrt()
        self.distributed = getattr(op, "distributed", False)
        self.process_group = getattr(op, "process_group", None)
        if hasattr(op, "space"):  # a sharded operator's vectors are this rank's entries: same space, same split
            self.space = op.space
            self.global_dim = op.global_dim

    @property
    def num_hvps(self) -> int:
        """Products of the wrapped operator so far."""
        return self.op.num_hvps

    @property
    def nonsmooth(self) -> list[str]:
        """What the wrapped operator declares unreliable (its products are this operator's)."""
        return list(getattr(self.op, "nonsmooth", ()))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`P^{-1/2} H P^{-1/2} v` as a new tensor (one product of ``H``)."""
        return self.inv_sqrt * self.op.matvec(self.inv_sqrt * v.to(self.dtype))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """:math:`P^{-1/2} H P^{-1/2} V` for ``V`` ``[dim, b]``."""
        d = self.inv_sqrt.unsqueeze(1)
        return d * self.op.matmat(d * V.to(self.dtype))

    def __repr__(self) -> str:
        return f"PreconditionedOperator({self.op!r})"


def step_preconditioned(op: Any, optimizer: torch.optim.Optimizer, params: Any = None) -> PreconditionedOperator:
    """:math:`P^{-1/2} H P^{-1/2}` for ``op`` = H and the :func:`step_preconditioner` of the coming step (also
    before Adam's first step, where P = |g| + ε); ``params`` in ``op``'s flat order."""
    return PreconditionedOperator(op, step_preconditioner(optimizer, params, dtype=op.dtype, device=op.device))


def preconditioned_operator(
    op: Any, optimizer: torch.optim.Optimizer, params: Any = None
) -> PreconditionedOperator | None:
    """:math:`P^{-1/2} H P^{-1/2}` for ``op`` = H and the optimiser's preconditioner; ``None`` before Adam's first step.

    Args:
        op: the Hessian operator (its ``dim`` must equal the number of ``params``).
        optimizer: ``torch.optim.SGD`` (P = I), ``Adam`` or ``AdamW``.
        params: parameters in ``op``'s flat order (``None``: the optimiser's order).

    Raises:
        TypeError / ValueError: as :func:`preconditioner_diagonal` and :class:`PreconditionedOperator`.

    Example::

        pre = preconditioned_operator(H, opt, [p for p in model.parameters() if p.requires_grad])
        if pre is not None:
            res = lanczos(pre, k=1, init=last_vector)
    """
    diagonal = preconditioner_diagonal(optimizer, params, dtype=op.dtype, device=op.device)
    return None if diagonal is None else PreconditionedOperator(op, diagonal)
