"""The tangent vector of SGD training, carried through the linearised optimiser steps; its growth is λ."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["TangentDynamics"]


def _check_real(name: str, value: Any, low: float, high: float | None = None, low_inclusive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value >= low if low_inclusive else value > low
        if ok and high is not None:
            ok = value <= high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + ("" if high is None else f" and <= {high}")
        raise ValueError(f"{name}={value!r} must be a finite number {bound}.")
    return float(value)


class TangentDynamics:
    r"""A tangent vector carried along the real SGD steps; its mean log growth is the largest Lyapunov exponent λ.

    The optimiser is ``torch.optim.SGD`` (``maximize=False``) with its exact semantics:
    :math:`g = \nabla L(\theta) + wd\,\theta`; :math:`m \leftarrow \mu m + (1-\tau) g` (on the
    first step :math:`m = g`); :math:`d = g + \mu m` (Nesterov) or :math:`d = m`;
    :math:`\theta \leftarrow \theta - \alpha d`. Its linearisation around the actual trajectory
    propagates the joint tangent state :math:`(\delta\theta, \delta m)`:

    .. math::
        \delta g = H\delta\theta + wd\,\delta\theta,\quad
        \delta m' = \mu\,\delta m + (1-\tau)\,\delta g \ (\delta m' = \delta g \text{ on the first step}),\\
        \delta d = \delta g + \mu\,\delta m' \text{ (Nesterov) or } \delta m',\quad
        \delta\theta' = \delta\theta - \alpha\,\delta d,

    where ``H`` is the Hessian of the step's mini-batch loss at the step's parameters (pass its
    HVP, e.g. ``HessianOperator(...).matvec``, built *before* the step). Without momentum the
    state is just :math:`\delta\theta` and a step is :math:`\delta \leftarrow \delta - \alpha(H\delta + wd\,\delta)`.

    The growth of a step is measured in the Euclidean norm of the concatenated state,
    :math:`\lVert(\delta\theta', \delta m')\rVert / \lVert(\delta\theta, \delta m)\rVert` (just
    :math:`\lVert\delta\theta'\rVert/\lVert\delta\theta\rVert` without momentum); every norm gives
    the same exponent. :meth:`step` returns the log of that growth and renormalises the state to
    unit norm. The mean of the log growths over a window of steps is the finite-time estimate of
    λ (per step); :meth:`flush_window` returns it. The start is a seeded random unit
    :math:`\delta\theta` (CPU generator, so every rank draws the same) and :math:`\delta m = 0`.

    Args:
        dim: length of the flat parameter vector.
        momentum: SGD momentum ``μ`` (default ``0``).
        dampening: SGD dampening ``τ`` (default ``0``).
        nesterov: Nesterov momentum (requires ``momentum > 0`` and ``dampening == 0``, as in SGD).
        weight_decay: L2 weight decay ``wd`` added to the gradient (default ``0``).
        seed: seed of the random start vector.
        dtype: dtype of the tangent state (default ``torch.float32``).
        device: device of the tangent state (default CPU).
        momentum_initialized: ``True`` if the optimiser's momentum buffers already exist (so the
            next step uses ``m ← μm + (1-τ)g`` rather than ``m = g``).

    Raises:
        ValueError: ``dim < 1``, ``momentum``/``dampening`` outside ``[0, 1]``, negative
            ``weight_decay``, or ``nesterov`` without ``momentum > 0`` and ``dampening == 0``.

    Example::

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        tangent = TangentDynamics.from_optimizer(opt, dim=H_dim)
        for batch in loader:
            with HessianOperator(model, loss_fn, batch) as H:
                tangent.step(H.matvec, lr=opt.param_groups[0]["lr"])
            ...                                  # the real training step on the same batch
        lam = tangent.flush_window()             # mean log growth per step = lambda
    """

    def __init__(
        self,
        dim: int,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        momentum_initialized: bool = False,
    ) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim={dim!r} must be a positive integer (the number of trainable parameters).")
        self.momentum = _check_real("momentum", momentum, 0.0, 1.0)
        self.dampening = _check_real("dampening", dampening, 0.0, 1.0)
        self.weight_decay = _check_real("weight_decay", weight_decay, 0.0)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"nesterov=True requires momentum > 0 and dampening == 0 (got momentum={momentum}, "
                f"dampening={dampening}), as in torch.optim.SGD."
            )
        dtype = torch.float32 if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} must be a floating-point torch.dtype.")
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.seed = int(seed)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        delta = torch.randn(dim, generator=gen, dtype=torch.float64)
        self.delta_theta = (delta / torch.linalg.vector_norm(delta)).to(device=self.device, dtype=dtype)
        self.delta_m: torch.Tensor | None = (
            torch.zeros(dim, dtype=dtype, device=self.device) if self.momentum != 0 else None
        )
        self.momentum_initialized = bool(momentum_initialized)
        self.num_steps = 0
        self.log_growth_sum = 0.0
        self.window_log_growth_sum = 0.0
        self.window_steps = 0
        self.last_log_growth: float | None = None

    @classmethod
    def from_optimizer(
        cls,
        optimizer: torch.optim.Optimizer,
        dim: int,
        *,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> TangentDynamics:
        """Tangent dynamics matching ``optimizer``'s hyper-parameters (momentum, dampening, Nesterov, weight decay).

        Args:
            optimizer: a ``torch.optim.SGD`` instance; all param groups must share ``momentum``,
                ``dampening``, ``nesterov``, ``weight_decay`` and ``lr``.
            dim: length of the flat parameter vector; must equal the number of trainable
                parameters the optimiser updates.
            seed: seed of the random start vector.
            dtype: dtype of the tangent state (default float32).
            device: device of the tangent state (default: the device of the optimiser's parameters).

        Raises:
            TypeError: ``optimizer`` is not ``torch.optim.SGD`` (only SGD with or without momentum,
                Nesterov and weight decay is supported).
            ValueError: ``maximize=True``; param groups that differ in those hyper-parameters;
                ``dim`` different from the optimiser's number of trainable parameters.

        Example::

            TangentDynamics.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), dim)
        """
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(
                f"TangentDynamics supports only torch.optim.SGD (with/without momentum, Nesterov, weight decay); "
                f"got {type(optimizer).__name__}. The Lyapunov exponent of other optimisers is not covered."
            )
        groups = optimizer.param_groups
        for g in groups:
            if g.get("maximize", False):
                raise ValueError("SGD(maximize=True) is not supported by TangentDynamics; use maximize=False.")
        keys = ("momentum", "dampening", "nesterov", "weight_decay", "lr")
        for key in keys:
            values = {float(g[key]) if not isinstance(g[key], torch.Tensor) else float(g[key]) for g in groups}
            if len(values) > 1:
                raise ValueError(
                    f"All SGD param groups must share {key!r} for TangentDynamics (got {sorted(values)}); "
                    "the tangent map uses one value for the whole parameter vector."
                )
        params = [p for g in groups for p in g["params"] if p.requires_grad]
        n = sum(p.numel() for p in params)
        if dim != n:
            raise ValueError(f"dim={dim} does not match the {n} trainable parameters updated by the optimizer.")
        momentum_initialized = any(
            optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in params
        )
        if device is None and params:
            device = params[0].device
        g0 = groups[0]
        return cls(
            dim,
            momentum=float(g0["momentum"]),
            dampening=float(g0["dampening"]),
            nesterov=bool(g0["nesterov"]),
            weight_decay=float(g0["weight_decay"]),
            seed=seed,
            dtype=dtype,
            device=device,
            momentum_initialized=momentum_initialized,
        )

    # ------------------------------------------------------------------ dynamics

    def step(self, hvp: Callable[[torch.Tensor], torch.Tensor], lr: float) -> float:
        """Propagate the tangent state through one linearised optimiser step; return its log growth.

        Args:
            hvp: ``hvp(v) -> H v`` for the Hessian of this step's loss at this step's parameters.
            lr: the learning rate ``α`` of this step.

        Returns:
            ``log(‖state'‖ / ‖state‖)`` as a Python float (the state is renormalised to unit norm).

        Raises:
            ValueError: ``lr`` negative or not finite, or ``hvp`` returns a wrong shape.
        """
        lr = _check_real("lr", float(lr) if isinstance(lr, torch.Tensor) else lr, 0.0)
        d_theta = self.delta_theta
        hv = hvp(d_theta)
        if not isinstance(hv, torch.Tensor) or hv.shape != (self.dim,):
            raise ValueError(f"hvp must return a flat tensor of shape [{self.dim}], got {getattr(hv, 'shape', hv)}.")
        d_g = hv.detach().to(device=self.device, dtype=self.dtype)
        if self.weight_decay:
            d_g = d_g + self.weight_decay * d_theta
        old_sq = d_theta.pow(2).sum()
        if self.delta_m is None:
            new_theta = d_theta - lr * d_g
            new_m = None
            new_sq = new_theta.pow(2).sum()
        else:
            old_sq = old_sq + self.delta_m.pow(2).sum()
            if self.momentum_initialized:
                new_m = self.momentum * self.delta_m + (1.0 - self.dampening) * d_g
            else:
                new_m = d_g.clone()
            d_d = d_g + self.momentum * new_m if self.nesterov else new_m
            new_theta = d_theta - lr * d_d
            new_sq = new_theta.pow(2).sum() + new_m.pow(2).sum()
        if float(new_sq) == 0.0:
            # The step annihilated the perturbation (e.g. α = 1/h on a one-dimensional quadratic): the
            # growth is zero, log growth -inf; keep the old direction, there is no new one to normalise.
            log_growth = -math.inf
            if new_m is not None:
                self.momentum_initialized = True
        else:
            log_growth = 0.5 * (math.log(float(new_sq)) - math.log(float(old_sq)))
            norm = torch.sqrt(new_sq)
            self.delta_theta = new_theta / norm
            if new_m is not None:
                self.delta_m = new_m / norm
                self.momentum_initialized = True
        self.num_steps += 1
        self.log_growth_sum += log_growth
        self.window_log_growth_sum += log_growth
        self.window_steps += 1
        self.last_log_growth = log_growth
        return log_growth

    @property
    def lyapunov_exponent(self) -> float | None:
        """Mean log growth per step since the start (``None`` before the first step)."""
        return None if self.num_steps == 0 else self.log_growth_sum / self.num_steps

    def flush_window(self) -> float | None:
        """Mean log growth per step since the last flush (λ over the window); resets the window.

        Returns ``None`` when no step was taken in the window.
        """
        if self.window_steps == 0:
            return None
        value = self.window_log_growth_sum / self.window_steps
        self.window_log_growth_sum = 0.0
        self.window_steps = 0
        return value

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Vectors, counters and hyper-parameters (everything :meth:`load_state_dict` restores)."""
        return {
            "dim": self.dim,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "delta_theta": self.delta_theta.detach().clone(),
            "delta_m": None if self.delta_m is None else self.delta_m.detach().clone(),
            "momentum_initialized": self.momentum_initialized,
            "num_steps": self.num_steps,
            "log_growth_sum": self.log_growth_sum,
            "window_log_growth_sum": self.window_log_growth_sum,
            "window_steps": self.window_steps,
            "last_log_growth": self.last_log_growth,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; vectors are moved to this instance's dtype and device.

        Raises:
            ValueError: the state belongs to a different ``dim`` or a different momentum setting.
        """
        if int(state["dim"]) != self.dim:
            raise ValueError(f"state_dict is for dim={state['dim']}, this TangentDynamics has dim={self.dim}.")
        if (state["delta_m"] is None) != (self.delta_m is None):
            raise ValueError("state_dict momentum setting (with/without momentum) does not match this instance.")
        for key in ("momentum", "dampening", "nesterov", "weight_decay"):
            setattr(self, key, type(getattr(self, key))(state[key]))
        self.seed = int(state.get("seed", self.seed))
        self.delta_theta = state["delta_theta"].to(device=self.device, dtype=self.dtype).clone()
        if state["delta_m"] is not None:
            self.delta_m = state["delta_m"].to(device=self.device, dtype=self.dtype).clone()
        self.momentum_initialized = bool(state["momentum_initialized"])
        self.num_steps = int(state["num_steps"])
        self.log_growth_sum = float(state["log_growth_sum"])
        self.window_log_growth_sum = float(state["window_log_growth_sum"])
        self.window_steps = int(state["window_steps"])
        self.last_log_growth = state.get("last_log_growth")
