r"""Stability limits of SGD and Adam on a quadratic, and the curvatures compared with them (batch sharpness).

Every optimiser here is, on a quadratic direction of curvature :math:`\lambda` (of :math:`H` for SGD, of the
preconditioned :math:`P^{-1/2} H P^{-1/2}` for Adam), stable iff :math:`\alpha\lambda < 2c` for a factor
:math:`c` of its momentum; :math:`\alpha\lambda/c` then has its edge at 2 for all of them and
:math:`\alpha = \mathrm{scale}\cdot c/\lambda` is the quasi-Newton step with the margin (half the limit) that
:math:`1/h_0` has for plain SGD.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lyapunov_callbacks.core.checks import check_beta, check_real
from lyapunov_callbacks.core.space import space_of

__all__ = [
    "adam_quasi_newton_lr",
    "adam_stability_factor",
    "batch_sharpness",
    "momentum_stability_factor",
    "pre_stability",
    "rule_stability_factor",
    "stability_factor",
]


def momentum_stability_factor(momentum: float, nesterov: bool = False) -> float:
    r"""How much larger than plain GD's the stable step of (Nesterov) heavy-ball SGD is, on one curvature.

    On a quadratic direction of curvature :math:`h`, SGD with momentum :math:`\mu` (dampening 0, PyTorch's
    ``m ← μm + g; θ ← θ − α m``) is the linear map on :math:`(\theta_t, \theta_{t-1})`

    .. math:: \begin{pmatrix} 1 + \mu - \alpha h & -\mu \\ 1 & 0 \end{pmatrix},

    with characteristic polynomial :math:`z^2 - (1+\mu-\alpha h) z + \mu`. By the Jury (Schur–Cohn) conditions
    both roots lie in the unit disc iff :math:`|\mu| < 1`, :math:`1 - T + D = \alpha h > 0` and
    :math:`1 + T + D = 2(1+\mu) - \alpha h > 0`, i.e. :math:`0 < \alpha h < 2(1+\mu)`: the limit is
    :math:`(1+\mu)` times plain GD's :math:`2/h`.

    Nesterov (PyTorch's ``m ← μm + g; θ ← θ − α(g + μ m)``) on :math:`(\theta, \alpha m)` is
    :math:`\begin{pmatrix} 1 - x(1+\mu) & -\mu^2 \\ x & \mu \end{pmatrix}` with :math:`x = \alpha h`, so
    :math:`T = 1 + \mu - x(1+\mu)`, :math:`D = \mu(1-x)`; :math:`1 - T + D = x > 0` and
    :math:`1 + T + D = 2(1+\mu) - x(1+2\mu) > 0` give :math:`0 < \alpha h < 2(1+\mu)/(1+2\mu)`
    (:math:`|D| < 1` holds there for :math:`0 \le \mu < 1`). The factor is :math:`(1+\mu)/(1+2\mu)`.
    ``tests/test_quasi_newton.py`` checks both limits against the spectral radius of the explicit maps.

    Args:
        momentum: :math:`\mu \in [0, 1)`.
        nesterov: Nesterov momentum.

    Returns:
        The factor :math:`c` with stability limit :math:`2c/h` (1 for plain SGD).

    Raises:
        ValueError: if ``momentum`` is not in ``[0, 1)``.

    Example::

        momentum_stability_factor(0.9)                  # 1.9
        momentum_stability_factor(0.9, nesterov=True)   # 1.9 / 2.8
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"`momentum` must be in [0, 1) for a stable heavy-ball map, got {momentum!r}.")
    if nesterov:
        return (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return 1.0 + momentum


def adam_stability_factor(beta1: float) -> float:
    r"""Adam's factor :math:`c = (1+\beta_1)/(1-\beta_1)`: with P frozen, stable iff :math:`\alpha\lambda_1(P^{-1}H) < 2c`.

    **Derivation.** Late in training (bias corrections :math:`\to 1`) and with :math:`v` changing slowly, Adam
    on the quadratic :math:`L = \tfrac12\theta^\top H\theta` with the preconditioner
    :math:`P = \mathrm{diag}(\sqrt{\hat v} + \epsilon)` frozen is the linear map

    .. math:: m' = \beta_1 m + (1-\beta_1) H\theta,\qquad \theta' = \theta - \alpha P^{-1} m'.

    In the variables :math:`\varphi = P^{1/2}\theta`, :math:`n = P^{-1/2}m` it reads
    :math:`n' = \beta_1 n + (1-\beta_1) S\varphi`, :math:`\varphi' = \varphi - \alpha n'` with the symmetric
    :math:`S = P^{-1/2} H P^{-1/2}`, which has the eigenvalues of :math:`P^{-1}H`. Along an eigenvector of
    :math:`S` with eigenvalue :math:`\lambda` and :math:`x = \alpha(1-\beta_1)\lambda` the map on
    :math:`(\varphi, n)` is

    .. math:: \begin{pmatrix} 1 - x & -\alpha\beta_1 \\ (1-\beta_1)\lambda & \beta_1 \end{pmatrix},

    heavy-ball SGD with momentum :math:`\beta_1` on curvature :math:`(1-\beta_1)\lambda`: trace
    :math:`T = 1 + \beta_1 - x`, determinant :math:`D = \beta_1`. The Jury conditions :math:`|D| < 1`,
    :math:`1 - T + D = x > 0`, :math:`1 + T + D = 2(1+\beta_1) - x > 0` give
    :math:`0 < \alpha\lambda < 2(1+\beta_1)/(1-\beta_1)` (38/α for :math:`\beta_1 = 0.9`, Cohen et al. 2022,
    "Adaptive gradient methods at the edge of stability"). Decoupled weight decay :math:`w_d` (AdamW) adds
    :math:`1 - \alpha w_d` to the :math:`\theta` map and coupled decay (Adam) adds :math:`w_c I` to :math:`H`;
    both are left out here, as the bias corrections and the change of :math:`v` are.
    ``tests/test_stability.py`` checks the limit against the spectral radius of the explicit
    :math:`2n \times 2n` map on :math:`(\theta, m)`.

    Args:
        beta1: :math:`\beta_1 \in [0, 1)`.

    Returns:
        :math:`(1+\beta_1)/(1-\beta_1)` (19 for :math:`\beta_1 = 0.9`; 1 for :math:`\beta_1 = 0`).

    Raises:
        ValueError: ``beta1`` not in ``[0, 1)``.

    Example::

        adam_stability_factor(0.9)   # 19.0: edge at α λ1(P⁻¹H) = 38
    """
    beta1 = check_beta("beta1", beta1)
    return (1.0 + beta1) / (1.0 - beta1)


def pre_stability(lr: float, pre_h0: float, beta1: float) -> float:
    r""":math:`\alpha\,\lambda_1(P^{-1}H)\,(1-\beta_1)/(1+\beta_1)`: Adam's stability measure, with its edge at 2.

    Scaled like ``hessian/stability`` :math:`= \alpha h_0` of plain SGD (see :func:`adam_stability_factor`).
    With :math:`\beta_1 = 0` and :math:`P = I` it is :math:`\alpha h_0`.

    Args:
        lr: the learning rate :math:`\alpha \ge 0`.
        pre_h0: :math:`\lambda_1(P^{-1}H)` (any finite real; negative in a concave region).
        beta1: :math:`\beta_1 \in [0, 1)`.

    Raises:
        ValueError: ``lr`` negative or not finite, ``pre_h0`` not finite, ``beta1`` not in ``[0, 1)``.

    Example::

        pre_stability(1e-3, 3.8e4, 0.9)   # 2.0: at the edge
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"`lr` must be a finite number >= 0, got {lr!r}.")
    if isinstance(pre_h0, bool) or not isinstance(pre_h0, (int, float)) or not math.isfinite(pre_h0):
        raise ValueError(f"`pre_h0` must be a finite number, got {pre_h0!r}.")
    return float(lr) * float(pre_h0) / adam_stability_factor(beta1)


def adam_quasi_newton_lr(pre_h0: float, beta1: float, scale: float = 1.0) -> float:
    r"""Adam's quasi-Newton LR :math:`\alpha = \mathrm{scale}\cdot(1+\beta_1)/((1-\beta_1)\,\lambda_1(P^{-1}H))`.

    Half of the stability limit :math:`2(1+\beta_1)/((1-\beta_1)\lambda_1)` of :func:`adam_stability_factor`
    at ``scale = 1``, the margin that :math:`1/h_0` has for plain SGD (``pre_stability`` = 1).

    Args:
        pre_h0: :math:`\lambda_1(P^{-1}H) > 0`.
        beta1: :math:`\beta_1 \in [0, 1)`.
        scale: multiplier, > 0 (default 1).

    Raises:
        ValueError: ``pre_h0`` or ``scale`` not positive and finite, ``beta1`` not in ``[0, 1)``.

    Example::

        adam_quasi_newton_lr(1.9e4, 0.9)   # 1e-3
    """
    pre_h0 = check_real("pre_h0", pre_h0, 0.0, low_inclusive=False)
    scale = check_real("scale", scale, 0.0, low_inclusive=False)
    return scale * adam_stability_factor(beta1) / pre_h0


def stability_factor(optimizer: torch.optim.Optimizer) -> float:
    r"""The factor :math:`c` of ``optimizer``'s stability limit :math:`\alpha\lambda < 2c` (λ of :math:`P^{-1}H`).

    ``torch.optim.Adam`` / ``AdamW``: :func:`adam_stability_factor` of :math:`\beta_1`. ``torch.optim.SGD``:
    1 without momentum, :func:`momentum_stability_factor` with Nesterov, and :math:`(1+\mu)/(1-\tau)` for
    heavy ball with dampening :math:`\tau` (the map of :func:`adam_stability_factor` with
    :math:`(1-\beta_1) \to (1-\tau)`; :math:`1+\mu` for :math:`\tau = 0`).

    Raises:
        TypeError: another optimiser.
        ValueError: param groups that differ in ``betas[0]`` (Adam) or ``momentum``/``dampening``/``nesterov``
            (SGD): one factor would not describe them all.
    """
    groups = optimizer.param_groups
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        betas = {float(g["betas"][0]) for g in groups}
        if len(betas) > 1:
            raise ValueError(
                f"param groups differ in betas[0] ({sorted(betas)}); one stability factor needs one beta1."
            )
        return adam_stability_factor(betas.pop())
    if isinstance(optimizer, torch.optim.SGD):
        settings = {(float(g["momentum"]), float(g["dampening"]), bool(g["nesterov"])) for g in groups}
        if len(settings) > 1:
            raise ValueError(
                f"param groups differ in (momentum, dampening, nesterov) ({sorted(settings)}); one stability "
                "factor needs one setting."
            )
        mu, tau, nesterov = settings.pop()
        if mu == 0:
            return 1.0
        if nesterov:
            return momentum_stability_factor(mu, nesterov=True)
        if tau >= 1:
            raise ValueError(
                f"dampening={tau} >= 1 makes the momentum buffer constant; the step has no curvature limit."
            )
        return momentum_stability_factor(mu) / (1.0 - tau)
    raise TypeError(
        f"stability_factor supports torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW; got "
        f"{type(optimizer).__module__}.{type(optimizer).__name__}."
    )


def rule_stability_factor(optimizer: torch.optim.Optimizer, momentum_aware: bool = False) -> float:
    r"""The factor :math:`c` of the quasi-Newton rule :math:`\alpha = \mathrm{scale}\cdot c/h_0`.

    :func:`stability_factor` for Adam/AdamW (with :math:`h_0 = \lambda_1(P^{-1}H)`) and, with ``momentum_aware``,
    for SGD; plain SGD's 1 otherwise, also for SGD with momentum (the paper's rule).

    Raises:
        ValueError: as :func:`stability_factor`, with the fix (one β1 in every group; one momentum setting).
    """
    adam = type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
    if not adam and not momentum_aware:
        return 1.0
    try:
        return stability_factor(optimizer)
    except ValueError as err:
        fix = "use the same betas in every group" if adam else "use one setting or momentum_aware=False"
        raise ValueError(f"QuasiNewtonLR with {type(optimizer).__name__}: {err} Fix: {fix}.") from err


def batch_sharpness(op: Any, gradient: torch.Tensor | None = None) -> float:
    r"""Batch sharpness :math:`g^\top H_B g / \lVert g\rVert^2`: the mini-batch loss's curvature along its gradient.

    Andreyev & Beneventano ("Edge of stochastic stability", 2024) find it, not :math:`\lambda_1` of the full
    Hessian, at :math:`2/\alpha` under mini-batch SGD. One product of ``op``.

    Args:
        op: the operator of the mini-batch Hessian :math:`H_B` (e.g. a
            :class:`~lyapunov_callbacks.core.hessian.HessianOperator` on the training batch).
        gradient: the flat mini-batch gradient :math:`g`; ``None`` = ``op.gradient()``.

    Returns:
        The Rayleigh quotient as a float; ``nan`` when :math:`g = 0` (the direction is undefined).

    Raises:
        ValueError: ``gradient`` of the wrong shape, or ``None`` with an ``op`` that has no ``gradient()``.

    Example::

        with HessianOperator(model, loss_fn, batch) as H:
            bs = batch_sharpness(H)      # compare with 2 / lr
    """
    if gradient is None:
        if not callable(getattr(op, "gradient", None)):
            raise ValueError(f"{type(op).__name__} has no gradient(); pass gradient= (the flat mini-batch gradient).")
        gradient = op.gradient()
    if not isinstance(gradient, torch.Tensor) or gradient.shape != (op.dim,):
        shape = tuple(gradient.shape) if isinstance(gradient, torch.Tensor) else type(gradient).__name__
        raise ValueError(f"gradient must be a flat tensor of shape [dim={op.dim}], got {shape}.")
    g = gradient.detach().to(device=op.device, dtype=op.dtype)
    space = space_of(op)  # a sharded operator's vectors are this rank's entries: inner products over the ranks
    norm_sq = space.dot(g, g)
    if norm_sq == 0.0:
        return math.nan
    return space.dot(g, op.matvec(g)) / norm_sq
