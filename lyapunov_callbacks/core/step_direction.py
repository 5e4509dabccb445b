r"""The optimiser's own step direction and the greedy learning rate along it: :math:`\alpha^* = \nabla F^\top d / d^\top \nabla^2 F\, d`.

Pure PyTorch (no Lightning). :func:`step_direction` reads what the next ``optimizer.step()`` will do from the
gradients and the optimiser's state without changing either; :func:`directional_sharpness` turns it and one
Hessian-vector product into the curvature per unit slope whose inverse is the greedy step.

**The greedy step.** Every supported optimiser moves :math:`\theta \leftarrow \theta - \alpha\, d` with the LR
:math:`\alpha` of the first param group and a direction :math:`d` (per unit of that LR) that does not depend on
:math:`\alpha` at this step. On the quadratic model of the objective :math:`F` the optimiser descends (the
mini-batch loss :math:`L_B` plus the coupled weight decay :math:`\tfrac{w}{2}\lVert\theta\rVert^2`),

.. math:: F(\theta - \alpha d) \approx F(\theta) - \alpha\, \nabla F^\top d + \tfrac{\alpha^2}{2}\, d^\top \nabla^2 F\, d,

minimised at :math:`\alpha^* = \nabla F^\top d / d^\top \nabla^2 F\, d` when both are positive: Newton's step
restricted to the line the optimiser actually moves along. :func:`directional_sharpness` returns its inverse
:math:`s = d^\top(H_B + wI)d / (\nabla F^\top d)`; with plain SGD (:math:`d = g`) it is the batch sharpness
:math:`g^\top H_B g / \lVert g\rVert^2`.

**The direction of each optimiser** (``torch.optim``'s update rules, per parameter; :math:`g` its ``.grad``):

- ``SGD`` without momentum: :math:`d = g + w\theta` (``weight_decay`` :math:`w`, coupled), so with
  :math:`w = 0`, :math:`\alpha^* = \lVert g\rVert^2 / g^\top H_B g`.
- ``SGD`` with momentum :math:`\mu` (dampening :math:`\tau`): the buffer the step will hold,
  :math:`b = \mu b_{-1} + (1-\tau)(g + w\theta)` (:math:`b = g + w\theta` at the first step, as PyTorch
  initialises it), and :math:`d = b`; Nesterov: :math:`d = (g + w\theta) + \mu b`. **The buffer is the step's
  direction, not** :math:`g` **with an "effective LR"** :math:`\alpha/(1-\mu)`: the displacement of this step is
  exactly :math:`-\alpha b`, so :math:`\alpha^* = \nabla F^\top b / b^\top \nabla^2 F\, b` is the exact
  minimiser of the model along the step taken. In a steady state :math:`b \to g/(1-\mu)` and
  :math:`\alpha^* \to (1-\mu)\lVert g\rVert^2/g^\top H g`, the effective-LR rule; away from it they differ, and
  only the buffer rule keeps the full-batch loss of a quadratic monotone: its exact line search makes
  :math:`\nabla F_{+}^\top b = 0`, so the next slope is :math:`\nabla F_{+}^\top b_{+} = \lVert\nabla F_{+}\rVert^2 > 0`
  (heavy ball with exact line search is conjugate gradients with :math:`\beta = \mu`), while the effective-LR
  step along :math:`b` overshoots whenever :math:`b` has turned towards sharper directions than :math:`g`
  (``tests/test_step_direction.py`` measures both on an ill-conditioned quadratic).
- ``Adam`` / ``AdamW``: with the step count :math:`t` after this step,
  :math:`m = \beta_1 m_{-1} + (1-\beta_1) g`, :math:`v = \beta_2 v_{-1} + (1-\beta_2) g^2` (``amsgrad``: the
  running maximum of :math:`v`), :math:`d = \hat m / (\sqrt{\hat v} + \epsilon)` with
  :math:`\hat m = m/(1-\beta_1^t)`, :math:`\sqrt{\hat v} = \sqrt v / \sqrt{1-\beta_2^t}` (PyTorch's order of
  operations). Before the optimiser has state (the first step) :math:`m_{-1} = v_{-1} = 0`, so
  :math:`d = g/(|g| + \epsilon)`, the sign-like first step Adam really takes. Adam's ``weight_decay`` is coupled
  (added to :math:`g` before the moments, and to :math:`F`); AdamW's is decoupled,
  :math:`\theta \leftarrow \theta(1 - \alpha w)`, so :math:`d` gains :math:`w\theta` while :math:`F = L_B`.

**Param groups.** A group whose LR is :math:`r_i\alpha` moves :math:`r_i d_i`; ``group_scales`` (default: the
groups' ``lr`` over the first group's) multiplies each group's direction, so the single :math:`\alpha` of the
first group is the greedy one for the whole step. Parameters without a gradient or outside the optimiser do not
move (:math:`d = 0` there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from lyapunov_callbacks.core.space import local_tensor, space_of

__all__ = [
    "DirectionalSharpness",
    "StepDirection",
    "check_step_optimizer",
    "directional_sharpness",
    "measure_directional_sharpness",
    "step_direction",
]

_ADAM = (torch.optim.Adam, torch.optim.AdamW)


@dataclass
class StepDirection:
    """What the next ``optimizer.step()`` does per unit of the first group's LR, as flat vectors.

    Attributes:
        direction: :math:`d`, the step is :math:`\\theta \\leftarrow \\theta - \\alpha d`.
        gradient: :math:`\\nabla F = g + w_c\\theta`, the gradient of the objective the optimiser descends
            (``w_c`` the coupled weight decay of SGD/Adam; 0 for AdamW, whose decay is in ``direction``).
        decay: :math:`w_c` per coordinate, :math:`\\nabla^2 F = H_B + \\mathrm{diag}(w_c)`; ``None`` when no
            group has coupled decay. ``direction`` and ``gradient`` may be one tensor (plain SGD).
    """

    direction: torch.Tensor
    gradient: torch.Tensor
    decay: Optional[torch.Tensor] = None


@dataclass
class DirectionalSharpness:
    r"""The model of :math:`F` along :math:`d`: slope, curvature, and their quotient.

    Attributes:
        slope: :math:`\nabla F^\top d`.
        curvature: :math:`d^\top (H_B + \mathrm{diag}(w_c)) d`.
        sharpness: ``curvature / slope`` (the greedy LR is its inverse); NaN when the slope is not positive
            (:math:`d` is no descent direction of :math:`F`: no greedy step exists) or either is not finite;
            :math:`\le 0` when the curvature is (the model along :math:`d` has no minimum).
        num_hvps: Hessian-vector products used (1).
    """

    slope: float
    curvature: float
    sharpness: float
    num_hvps: int = 1


def check_step_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` unless :func:`step_direction` knows ``optimizer``'s update (SGD/Adam/AdamW, minimising)."""
    if not (isinstance(optimizer, torch.optim.SGD) or type(optimizer) in _ADAM):
        raise ValueError(
            f"step_direction knows the update of torch.optim.SGD, Adam and AdamW only, got "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}; use one of those optimisers."
        )
    for i, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise ValueError(f"param group {i} has maximize=True; the greedy step is for minimisation: set it False.")


def _default_scales(optimizer: torch.optim.Optimizer) -> list[float]:
    lrs = [float(g.get("lr", 0.0)) for g in optimizer.param_groups]
    if len(set(lrs)) <= 1 or not lrs[0] > 0:
        return [1.0] * len(lrs)
    return [lr / lrs[0] for lr in lrs]


@torch.no_grad()
def _sgd_direction(p: torch.Tensor, g: torch.Tensor, group: dict, state: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    w = float(group.get("weight_decay", 0.0) or 0.0)
    grad = g + w * p if w != 0.0 else g
    mu = float(group.get("momentum", 0.0) or 0.0)
    if mu == 0.0:
        return grad, grad, w
    buf = state.get("momentum_buffer")
    if buf is None:
        b = grad.clone()
    else:
        b = mu * buf.to(grad.dtype) + (1.0 - float(group.get("dampening", 0.0) or 0.0)) * grad
    d = grad + mu * b if group.get("nesterov", False) else b
    return d, grad, w


@torch.no_grad()
def _adam_direction(
    p: torch.Tensor, g: torch.Tensor, group: dict, state: dict, decoupled: bool
) -> tuple[torch.Tensor, torch.Tensor, float]:
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    w = float(group.get("weight_decay", 0.0) or 0.0)
    grad = g + w * p if (w != 0.0 and not decoupled) else g
    step = state.get("step")
    t = (0 if step is None else int(float(step))) + 1
    m_prev = state.get("exp_avg")
    v_prev = state.get("exp_avg_sq")
    m = (1.0 - beta1) * grad if m_prev is None else beta1 * m_prev.to(grad.dtype) + (1.0 - beta1) * grad
    v = (1.0 - beta2) * grad * grad if v_prev is None else beta2 * v_prev.to(grad.dtype) + (1.0 - beta2) * grad * grad
    if group.get("amsgrad", False):
        v_max = state.get("max_exp_avg_sq")
        if v_max is not None:
            v = torch.maximum(v_max.to(grad.dtype), v)
    bias1 = 1.0 - beta1**t
    bias2_sqrt = math.sqrt(1.0 - beta2**t)
    d = (m / bias1) / (v.sqrt() / bias2_sqrt + eps)
    if decoupled:
        # AdamW: θ ← θ(1 − αw) − α·m̂/(√v̂+ε); the decay is part of the displacement, not of F.
        return (d + w * p if w != 0.0 else d), grad, 0.0
    return d, grad, w


@torch.no_grad()
def step_direction(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
    group_scales: Optional[Sequence[float]] = None,
    dtype: Optional[torch.dtype] = None,
) -> StepDirection:
    r"""The direction :math:`d` the next ``optimizer.step()`` moves ``params`` along, per unit of the first LR.

    Reads ``optimizer``'s hyperparameters and state (momentum buffer, Adam moments and step count) and changes
    neither; see the module docstring for each optimiser's :math:`d`.

    Args:
        optimizer: ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (not ``maximize``).
        params: the tensors of the flat vectors, in their order (e.g. a Hessian operator's trainable
            parameters); those the optimiser does not hold get :math:`d = 0`.
        grads: their gradients (default: each ``.grad``); ``None`` entries do not move.
        group_scales: each param group's LR over the first group's (default: from the groups' ``lr``).
        dtype: dtype of the returned vectors (default: the first parameter's).

    Returns:
        :class:`StepDirection` of flat vectors of length ``sum(p.numel())``.

    Raises:
        ValueError: another optimiser, ``maximize=True``, ``grads``/``group_scales`` of the wrong length.

    Example::

        loss.backward()
        sd = step_direction(opt, list(model.parameters()))
        # opt.step() will do exactly: θ ← θ − lr · sd.direction (per parameter, flattened)
    """
    check_step_optimizer(optimizer)
    params = list(params)
    if grads is None:
        grads = [p.grad for p in params]
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"grads must hold one entry per parameter ({len(params)}), got {len(grads)}.")
    scales = list(group_scales) if group_scales is not None else _default_scales(optimizer)
    if len(scales) != len(optimizer.param_groups):
        raise ValueError(
            f"group_scales must hold one number per param group ({len(optimizer.param_groups)}), got {len(scales)}."
        )
    dtype = dtype or (params[0].dtype if params else torch.float32)
    where = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    directions, gradients, decays = [], [], []
    for p, g in zip(params, grads):
        i = where.get(id(p))
        # Sharded parameters (FSDP2 DTensors): this rank's shards of p, g and the state, element by element.
        state = {k: local_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in optimizer.state.get(p, {}).items()}
        p, g = local_tensor(p), None if g is None else local_tensor(g)
        if g is None or i is None:
            zero = torch.zeros(p.numel(), dtype=dtype, device=p.device)
            directions.append(zero)
            gradients.append(zero if g is None else g.detach().reshape(-1).to(dtype))
            decays.append(0.0)
            continue
        group = optimizer.param_groups[i]
        pd, gd = p.detach().to(dtype), g.detach().to(dtype)
        if isinstance(optimizer, torch.optim.SGD):
            d, grad, w = _sgd_direction(pd, gd, group, state)
        else:
            d, grad, w = _adam_direction(pd, gd, group, state, decoupled)
        directions.append((d if scales[i] == 1.0 else scales[i] * d).reshape(-1))
        gradients.append(grad.reshape(-1))
        decays.append(w)
    # Plain SGD: d is the gradient itself, so one flat copy serves both (a vector op saved per parameter).
    gradient = torch.cat(gradients)
    same = all(d is g or (d.data_ptr() == g.data_ptr() and d.shape == g.shape) for d, g in zip(directions, gradients))
    direction = gradient if same else torch.cat(directions)
    decay = None
    if any(w != 0.0 for w in decays):
        decay = torch.cat([
            torch.full((local_tensor(p).numel(),), w, dtype=dtype, device=p.device) for p, w in zip(params, decays)
        ])
    return StepDirection(direction, gradient, decay)


def directional_sharpness(op: Any, step: StepDirection) -> DirectionalSharpness:
    r"""Curvature of the objective along the step's direction per unit slope: one product of ``op``.

    :math:`s = d^\top (H_B + \mathrm{diag}(w_c))\, d \,/\, \nabla F^\top d`; the greedy LR is
    :math:`\alpha^* = 1/s` (see the module docstring). For plain SGD without weight decay, :math:`s` is the
    batch sharpness :math:`g^\top H_B g/\lVert g\rVert^2`
    (:func:`~lyapunov_callbacks.core.stability.batch_sharpness`).

    Args:
        op: the operator of :math:`H_B` (``matvec``, ``dim``, ``dtype``, ``device``), e.g. a
            :class:`~lyapunov_callbacks.core.hessian.HessianOperator` on the step's batch.
        step: the step's :class:`StepDirection`, over ``op``'s parameters in its order.

    Returns:
        :class:`DirectionalSharpness`; ``sharpness`` is NaN when the slope is not positive or not finite.

    Raises:
        ValueError: vectors of ``step`` whose length is not ``op.dim``.
    """
    d = step.direction.detach().to(device=op.device, dtype=op.dtype)
    shapes = {tuple(t.shape) for t in (step.direction, step.gradient, step.decay) if t is not None}
    if shapes != {(op.dim,)}:
        raise ValueError(f"the step's vectors must have length op.dim={op.dim}, got {sorted(shapes)}.")
    g = step.gradient.detach().to(device=op.device, dtype=op.dtype)
    space = space_of(op)  # a sharded operator's vectors are this rank's entries: inner products over the ranks
    slope = space.dot(g, d)
    if not (math.isfinite(slope) and slope > 0.0):
        # No descent along d (or a non-finite gradient): the product is not needed to reject it.
        return DirectionalSharpness(slope, math.nan, math.nan, num_hvps=0)
    curvature = space.dot(d, op.matvec(d))
    if step.decay is not None:
        curvature += space.dot(step.decay.detach().to(device=op.device, dtype=op.dtype) * d, d)
    sharpness = curvature / slope if math.isfinite(curvature) else math.nan
    return DirectionalSharpness(slope, curvature, sharpness)


def measure_directional_sharpness(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    optimizer: torch.optim.Optimizer,
    backend: str = "finite_difference",
    dtype: Optional[torch.dtype] = None,
    group_scales: Optional[Sequence[float]] = None,
) -> DirectionalSharpness:
    r"""The step's :class:`DirectionalSharpness` in a plain loop: after ``loss.backward()``, before ``opt.step()``.

    Reads the ``.grad`` the backward left; with ``backend="finite_difference"`` (default) they are also the
    operator's :math:`\nabla L(\theta)`, so the one product costs one forward and backward at
    :math:`\theta + \epsilon d`; ``"autograd"`` builds a double-backward graph of its own (exact, about 2–3× the
    cost). The gradient is reused only when ``loss_fn(model, batch)`` is the loss that was differentiated:
    a model with dropout must have its RNG restored to the state before the step's forward (the callback does).
    Nothing of the model, its ``.grad`` or the optimiser changes.

    Example::

        rule = QuasiNewtonRule(rule="batch_sharpness")
        for step, batch in enumerate(loader):
            loss = loss_fn(model, batch)
            needs = rule.needs_estimate(step, loss=float(loss))
            opt.zero_grad(); loss.backward()
            if needs:
                rule.update(measure_directional_sharpness(model, loss_fn, batch, opt).sharpness, step)
            for group in opt.param_groups:
                group["lr"] = rule.lr
            opt.step()
    """
    from lyapunov_callbacks.core.hessian import HessianOperator, backend_class, trainable_parameters

    params = [p for _, p in trainable_parameters(model)]
    grads = [p.grad for p in params]
    options = {}
    if backend_class(backend).takes_gradient:  # the step's gradient is ∇L(θ): one backward saved
        options["gradient"] = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
    with torch.enable_grad(), HessianOperator(
        model, loss_fn, batch, backend=backend, dtype=dtype, snapshot=False, **options
    ) as op:
        step = step_direction(optimizer, params, grads=grads, group_scales=group_scales, dtype=op.dtype)
        return directional_sharpness(op, step)
