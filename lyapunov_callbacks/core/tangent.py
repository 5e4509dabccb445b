"""The tangent vector of SGD / Adam / AdamW training, carried through the linearised steps; its growth is λ."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lyapunov_callbacks.core.checks import check_real
from lyapunov_callbacks.core.space import LOCAL, LocalSpace, local_tensor

__all__ = ["AdamTangentDynamics", "TangentDynamics", "tangent_dynamics"]


def _axpy(x: torch.Tensor, y: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
    """``x − step·y`` as a new tensor: one fused kernel for a scalar step, element-wise for per-coordinate ones."""
    if isinstance(step, torch.Tensor):
        return x - step * y
    return torch.add(x, y, alpha=-step)


class _TangentBase:
    """What every tangent shares: the seeded unit start δθ, the log-growth bookkeeping and the window of λ."""

    dim: int
    dtype: torch.dtype
    device: torch.device
    seed: int

    def _init_common(
        self, dim: int, seed: int, dtype: torch.dtype | None, device: torch.device | str | None,
        space: LocalSpace | None = None,
    ) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim={dim!r} must be a positive integer (the number of trainable parameters).")
        dtype = torch.float32 if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} must be a floating-point torch.dtype.")
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.seed = int(seed)
        # Where the vectors live: whole (LOCAL), or this rank's shards of them (a ShardedSpace, whose squared norms
        # are summed over the ranks, so every rank gets the same growth).
        self.space = space or LOCAL
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        if self.space.sharded:
            delta = self.space.randn(dim, 1, gen, torch.float64)[:, 0]
            delta = delta / self.space.norm(delta)
        else:
            delta = torch.randn(dim, generator=gen, dtype=torch.float64)
            delta = delta / torch.linalg.vector_norm(delta)
        self.delta_theta = delta.to(device=self.device, dtype=dtype)
        self.num_steps = 0
        self.log_growth_sum = 0.0
        self.window_log_growth_sum = 0.0
        self.window_steps = 0
        self.last_log_growth: float | None = None

    def _total(self, square: torch.Tensor) -> torch.Tensor:
        """A squared norm of this rank's entries, summed over the ranks in a sharded space (else as it is)."""
        if not self.space.sharded:
            return square
        return self.space.all_sum(square)[0].to(square.dtype)

    def _hv(self, hvp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        hv = hvp(self.delta_theta)
        if not isinstance(hv, torch.Tensor) or hv.shape != (self.dim,):
            raise ValueError(f"hvp must return a flat tensor of shape [{self.dim}], got {getattr(hv, 'shape', hv)}.")
        return hv.detach().to(device=self.device, dtype=self.dtype)

    def _record(self, log_growth: float) -> float:
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

    def _counters(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "seed": self.seed,
            "num_steps": self.num_steps,
            "log_growth_sum": self.log_growth_sum,
            "window_log_growth_sum": self.window_log_growth_sum,
            "window_steps": self.window_steps,
            "last_log_growth": self.last_log_growth,
        }

    def _load_counters(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))
        self.num_steps = int(state["num_steps"])
        self.log_growth_sum = float(state["log_growth_sum"])
        self.window_log_growth_sum = float(state["window_log_growth_sum"])
        self.window_steps = int(state["window_steps"])
        self.last_log_growth = state.get("last_log_growth")

    def snapshot(self) -> dict[str, Any]:
        """The tangent's state by reference, for :meth:`restore` (cheap: a step never writes to its tensors,
        it replaces them), e.g. to undo a step whose growth turned out non-finite."""
        return dict(self.__dict__)

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Put back the state of :meth:`snapshot` (vectors, counters, flags)."""
        self.__dict__.update(snapshot)

    def step_or_undo(self, hvp: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """:meth:`step` with each group's own LR, undone when its log growth is not finite (a diverged loss or an
        annihilated perturbation): returns the log growth, or NaN with the state as it was before the call.

        The growth is finite exactly when the new state's squared norm is finite and non-zero, i.e. when the
        product and every entry of the new state are finite, so no separate pass over them is needed.
        """
        saved = self.snapshot()
        growth = self.step(hvp)
        if math.isfinite(growth):
            return growth
        self.restore(saved)
        return float("nan")

    def _vector(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(device=self.device, dtype=self.dtype).clone()


class TangentDynamics(_TangentBase):
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
                tangent.step(H.matvec)           # each group's LR, read from opt now
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
        space: LocalSpace | None = None,
    ) -> None:
        self.momentum = check_real("momentum", momentum, 0.0, 1.0)
        self.dampening = check_real("dampening", dampening, 0.0, 1.0)
        self.weight_decay = check_real("weight_decay", weight_decay, 0.0)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"nesterov=True requires momentum > 0 and dampening == 0 (got momentum={momentum}, "
                f"dampening={dampening}), as in torch.optim.SGD."
            )
        self._init_common(dim, seed, dtype, device, space)
        self.delta_m: torch.Tensor | None = (
            torch.zeros(dim, dtype=self.dtype, device=self.device) if self.momentum != 0 else None
        )
        self.momentum_initialized = bool(momentum_initialized)
        # Set by from_optimizer: the optimiser and the parameters in flat order, so that step(lr=None) reads
        # each param group's own LR at step time (schedulers change it between steps).
        self.optimizer: torch.optim.Optimizer | None = None
        self._lr_slices: list[tuple[slice, dict]] = []

    @classmethod
    def from_optimizer(
        cls,
        optimizer: torch.optim.Optimizer,
        dim: int,
        *,
        params: Any = None,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        space: LocalSpace | None = None,
    ) -> TangentDynamics:
        """Tangent dynamics matching ``optimizer``'s hyper-parameters (momentum, dampening, Nesterov, weight decay).

        The returned tangent keeps a reference to ``optimizer``: ``step(hvp)`` (``lr=None``) then applies each
        param group's own LR, read at step time, to that group's coordinates of the flat vector.

        Args:
            optimizer: a ``torch.optim.SGD`` instance; all param groups must share ``momentum``,
                ``dampening``, ``nesterov`` and ``weight_decay`` (the LR may differ between groups).
            dim: length of the flat parameter vector; must equal the number of trainable
                parameters the optimiser updates.
            params: the parameters in the order of the flat vector (that of the Hessian operator,
                ``[p for p in model.parameters() if p.requires_grad]``); ``None`` = the optimiser's order.
                Only matters when the groups' LRs differ.
            seed: seed of the random start vector.
            dtype: dtype of the tangent state (default float32).
            device: device of the tangent state (default: the device of the optimiser's parameters).
            space: a :class:`~lyapunov_callbacks.core.space.ShardedSpace` when the parameters are shards: the
                vectors then hold this rank's entries (``dim`` = their number) and norms are summed over the ranks.

        Raises:
            TypeError: ``optimizer`` is not ``torch.optim.SGD`` (only SGD with or without momentum,
                Nesterov and weight decay is supported).
            ValueError: ``maximize=True``; param groups that differ in those hyper-parameters;
                ``dim`` different from the optimiser's number of trainable parameters; ``params`` not the
                optimiser's.

        Example::

            TangentDynamics.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), dim)
        """
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(
                f"TangentDynamics supports only torch.optim.SGD (with/without momentum, Nesterov, weight decay); "
                f"got {type(optimizer).__name__}. For torch.optim.Adam / AdamW use tangent_dynamics(optimizer, dim) "
                "or AdamTangentDynamics; other optimisers are not covered."
            )
        groups = optimizer.param_groups
        for g in groups:
            if g.get("maximize", False):
                raise ValueError("SGD(maximize=True) is not supported by TangentDynamics; use maximize=False.")
        keys = ("momentum", "dampening", "nesterov", "weight_decay")
        for key in keys:
            values = {float(g[key]) if not isinstance(g[key], torch.Tensor) else float(g[key]) for g in groups}
            if len(values) > 1:
                raise ValueError(
                    f"All SGD param groups must share {key!r} for TangentDynamics (got {sorted(values)}); "
                    "the tangent map uses one value for the whole parameter vector (only the LR may differ "
                    "between groups)."
                )
        params = ordered_parameters(optimizer, params)
        n = sum(local_tensor(p).numel() for p in params)
        if dim != n:
            raise ValueError(f"dim={dim} does not match the {n} trainable parameters updated by the optimizer.")
        momentum_initialized = any(
            optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in params
        )
        if device is None and params:
            device = params[0].device
        g0 = groups[0]
        tangent = cls(
            dim,
            momentum=float(g0["momentum"]),
            dampening=float(g0["dampening"]),
            nesterov=bool(g0["nesterov"]),
            weight_decay=float(g0["weight_decay"]),
            seed=seed,
            dtype=dtype,
            device=device,
            momentum_initialized=momentum_initialized,
            space=space,
        )
        tangent.optimizer = optimizer
        group_of = {id(p): g for g in groups for p in g["params"]}
        offset = 0
        for p in params:  # runs of consecutive parameters of one group share a slice
            g, numel = group_of[id(p)], local_tensor(p).numel()
            if tangent._lr_slices and tangent._lr_slices[-1][1] is g:
                tangent._lr_slices[-1] = (slice(tangent._lr_slices[-1][0].start, offset + numel), g)
            else:
                tangent._lr_slices.append((slice(offset, offset + numel), g))
            offset += numel
        return tangent

    def _step_sizes(self, lr: float | torch.Tensor | None) -> float | torch.Tensor:
        """The step size of this step: ``lr`` for every coordinate, or each group's own LR (``lr=None``)."""
        if lr is not None:
            return check_real("lr", float(lr) if isinstance(lr, torch.Tensor) else lr, 0.0)
        if self.optimizer is None:
            raise ValueError(
                "lr=None reads each param group's LR from the optimiser, which only a tangent built by "
                "TangentDynamics.from_optimizer / tangent_dynamics has; pass lr= (the step's learning rate)."
            )
        lrs = [check_real("lr", _as_float(g["lr"]), 0.0) for _, g in self._lr_slices]
        if len(set(lrs)) == 1:
            return lrs[0]
        sizes = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        for (piece, _), value in zip(self._lr_slices, lrs):
            sizes[piece] = value
        return sizes

    # ------------------------------------------------------------------ dynamics

    def step(self, hvp: Callable[[torch.Tensor], torch.Tensor], lr: float | None = None) -> float:
        """Propagate the tangent state through one linearised optimiser step; return its log growth.

        Args:
            hvp: ``hvp(v) -> H v`` for the Hessian of this step's loss at this step's parameters.
            lr: the learning rate ``α`` of this step for every coordinate; ``None`` (default) = each param
                group's own LR, read from the optimiser now (only for a tangent built by :meth:`from_optimizer`,
                so call it before ``optimizer.step()``, after any scheduler or callback set the LR).

        Returns:
            ``log(‖state'‖ / ‖state‖)`` as a Python float (the state is renormalised to unit norm).

        Raises:
            ValueError: ``lr`` negative or not finite, or ``hvp`` returns a wrong shape; ``lr=None`` on a tangent
                without an optimiser.
        """
        lr = self._step_sizes(lr)
        d_theta = self.delta_theta
        d_g = self._hv(hvp)
        if self.weight_decay:
            d_g = torch.add(d_g, d_theta, alpha=self.weight_decay)
        # Squared norms as dot products and the updates as single fused kernels: no temporaries of size
        # dim beyond the new state (on a 1.8M-parameter MLP the per-step vector work is a few ms).
        old_sq = torch.dot(d_theta, d_theta)
        if self.delta_m is None:
            new_theta = _axpy(d_theta, d_g, lr)
            new_m = None
            new_sq = torch.dot(new_theta, new_theta)
        else:
            old_sq = old_sq + torch.dot(self.delta_m, self.delta_m)
            if self.momentum_initialized:
                new_m = torch.add(self.delta_m.mul(self.momentum), d_g, alpha=1.0 - self.dampening)
            else:
                new_m = d_g.clone()
            d_d = torch.add(d_g, new_m, alpha=self.momentum) if self.nesterov else new_m
            new_theta = _axpy(d_theta, d_d, lr)
            new_sq = torch.dot(new_theta, new_theta) + torch.dot(new_m, new_m)
        old_sq, new_sq = self._total(old_sq), self._total(new_sq)
        new_sq_value = float(new_sq)
        if new_sq_value == 0.0:
            # The step annihilated the perturbation (e.g. α = 1/h on a one-dimensional quadratic): the
            # growth is zero, log growth -inf; keep the old direction, there is no new one to normalise.
            log_growth = -math.inf
            if new_m is not None:
                self.momentum_initialized = True
        else:
            log_growth = 0.5 * (math.log(new_sq_value) - math.log(float(old_sq)))
            norm = torch.sqrt(new_sq)
            # new_theta / new_m are fresh tensors of this step (never the stored state): normalised in place.
            self.delta_theta = new_theta.div_(norm)
            if new_m is not None:
                self.delta_m = new_m.div_(norm)
                self.momentum_initialized = True
        return self._record(log_growth)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Vectors, counters and hyper-parameters (everything :meth:`load_state_dict` restores)."""
        return {
            **self._counters(),
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "delta_theta": self.delta_theta.detach().clone(),
            "delta_m": None if self.delta_m is None else self.delta_m.detach().clone(),
            "momentum_initialized": self.momentum_initialized,
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
        self.delta_theta = self._vector(state["delta_theta"])
        if state["delta_m"] is not None:
            self.delta_m = self._vector(state["delta_m"])
        self.momentum_initialized = bool(state["momentum_initialized"])
        self._load_counters(state)


# ---------------------------------------------------------------------------------------------- Adam / AdamW

_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def ordered_parameters(optimizer: torch.optim.Optimizer, params: Any = None) -> list[torch.Tensor]:
    """The parameters in the order of the flat vector: ``params`` if given, else the optimiser's order.

    Args:
        optimizer: the optimiser that updates them.
        params: the parameters in the flat order of the Hessian operator (e.g.
            ``[p for p in model.parameters() if p.requires_grad]``); ``None`` = the optimiser's own order.

    Raises:
        ValueError: a parameter of ``params`` is not updated by ``optimizer``, or ``params`` repeats one.
    """
    owned = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if params is None:
        return owned
    params = list(params)
    ids = {id(p) for p in owned}
    seen: set[int] = set()
    for i, p in enumerate(params):
        if id(p) not in ids:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a trainable parameter of the optimizer; pass the "
                "parameters the optimizer updates, in the flat order of the Hessian operator."
            )
        if id(p) in seen:
            raise ValueError(f"params[{i}] appears twice; each parameter must appear once.")
        seen.add(id(p))
    return params


def check_adam(optimizer: torch.optim.Optimizer, owner: str) -> None:
    """Raise unless ``optimizer`` is exactly ``torch.optim.Adam`` / ``AdamW`` with settings whose maths is covered.

    ``foreach``, ``fused``, ``capturable`` and ``differentiable`` change how the step is computed, not what it
    computes, and are accepted; ``amsgrad``, ``maximize``, coupled (Adam) and decoupled (AdamW) weight decay
    are part of the maths and handled. A subclass (which may override ``step``) is refused.

    Raises:
        TypeError: ``optimizer`` is not exactly ``torch.optim.Adam`` or ``torch.optim.AdamW``.
        ValueError: a param group holds a ``beta1``/``beta2`` outside ``[0, 1)`` or a negative ``eps``.
    """
    if type(optimizer) not in _ADAM_TYPES:
        raise TypeError(
            f"{owner} supports torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW; got "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}. Use one of those optimisers."
        )
    for i, g in enumerate(optimizer.param_groups):
        b1, b2 = (_as_float(b) for b in g["betas"])
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"param_groups[{i}]['betas']=({b1}, {b2}) must lie in [0, 1) for {owner}.")
        if _as_float(g["eps"]) < 0:
            raise ValueError(f"param_groups[{i}]['eps']={g['eps']} must be >= 0 for {owner}.")


@dataclass
class _AdamParam:
    """One parameter's Adam hyper-parameters (from its group) and state before a step (``None``: no state yet)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    wd_coupled: float
    wd_decoupled: float
    maximize: bool
    amsgrad: bool
    step: float
    m: torch.Tensor | None
    v: torch.Tensor | None
    vmax: torch.Tensor | None


def _adam_parameters(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[_AdamParam]:
    """Per-parameter view of Adam's hyper-parameters and state, in the order of ``params`` (flat views, no copy; this
    rank's shards of a sharded state)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        g = group_of[id(p)]
        state = optimizer.state.get(p, {})
        b1, b2 = (_as_float(b) for b in g["betas"])
        wd = _as_float(g["weight_decay"])
        decoupled = bool(g.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        has = "exp_avg" in state
        vmax = state.get("max_exp_avg_sq")
        out.append(_AdamParam(
            lr=_as_float(g["lr"]), beta1=b1, beta2=b2, eps=_as_float(g["eps"]),
            wd_coupled=0.0 if decoupled else wd, wd_decoupled=wd if decoupled else 0.0,
            maximize=bool(g["maximize"]), amsgrad=bool(g["amsgrad"]),
            step=_as_float(state["step"]) if has else 0.0,
            m=local_tensor(state["exp_avg"]).detach().reshape(-1) if has else None,
            v=local_tensor(state["exp_avg_sq"]).detach().reshape(-1) if has else None,
            vmax=local_tensor(vmax).detach().reshape(-1) if vmax is not None else None,
        ))
    return out


class AdamTangentDynamics(_TangentBase):
    r"""A tangent vector carried along the real ``torch.optim.Adam`` / ``AdamW`` steps; its mean log growth is λ.

    PyTorch's step at count :math:`t` (per parameter, from its ``state["step"] + 1``), with gradient
    :math:`\nabla L(\theta)`, sign :math:`s = -1` under ``maximize`` (else 1), coupled weight decay
    :math:`w_c` (Adam) or decoupled :math:`w_d` (AdamW, ``decoupled_weight_decay=True``):

    .. math::
        g = s\nabla L(\theta) + w_c\theta,\quad m' = \beta_1 m + (1-\beta_1) g,\quad
        v' = \beta_2 v + (1-\beta_2) g^2,\quad \hat v = v' \text{ (or } v'_{\max} = \max(v_{\max}, v')
        \text{ with amsgrad)},\\
        D = \sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon,\quad
        \theta' = (1 - \alpha w_d)\theta - \frac{\alpha}{1-\beta_1^t}\, \frac{m'}{D}.

    Its exact linearisation around the actual trajectory propagates the tangent state
    :math:`(\delta\theta, \delta m, \delta v[, \delta v_{\max}])` with one HVP :math:`H\delta\theta` (the
    Hessian of this step's loss at this step's parameters):

    .. math::
        \delta g = sH\delta\theta + w_c\delta\theta,\quad \delta m' = \beta_1\delta m + (1-\beta_1)\delta g,\quad
        \delta v' = \beta_2\delta v + 2(1-\beta_2)\, g\odot\delta g,\\
        \delta\hat v = \delta v' \text{ (amsgrad: } \delta v' \text{ where } v' > v_{\max}
        \text{, else } \delta v_{\max}),\quad
        \delta D = \frac{\delta\hat v}{2\sqrt{\hat v}\sqrt{1-\beta_2^t}},\\
        \delta\theta' = (1-\alpha w_d)\,\delta\theta - \frac{\alpha}{1-\beta_1^t}
        \Big(\frac{\delta m'}{D} - \frac{m'\odot\delta D}{D^2}\Big).

    Coordinates with :math:`\hat v = 0` (a gradient that has been exactly zero so far, so :math:`m' = 0`) have
    :math:`\delta D = 0` there: the square root is not differentiable at 0, and the product with
    :math:`m' = 0` is taken as 0. An amsgrad tie :math:`v' = v_{\max}` takes :math:`\delta v_{\max}`.

    Hyper-parameters (``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``) are read per
    param group, and ``m``, ``v``, ``v_max``, ``step`` per parameter, from the optimiser at each :meth:`step`
    — so call it after the backward pass and **before** ``optimizer.step()`` (Lightning:
    ``on_before_optimizer_step``). The growth of a step is the Euclidean norm ratio of the joint state
    :math:`(\delta\theta, \delta m, \delta v[, \delta v_{\max}])`; :meth:`step` returns its log and
    renormalises the state to unit norm. The start is a seeded random unit :math:`\delta\theta`, zero
    :math:`\delta m, \delta v`.

    Build it with :func:`tangent_dynamics` (or :meth:`from_optimizer`), which validates the optimiser.

    Args:
        optimizer: a ``torch.optim.Adam`` or ``torch.optim.AdamW`` instance.
        dim: length of the flat parameter vector.
        params: the parameters in the order of the flat vector (that of the Hessian operator, i.e.
            ``[p for p in model.parameters() if p.requires_grad]``); ``None`` = the optimiser's order.
        seed: seed of the random start vector.
        dtype: dtype of the tangent state (default ``torch.float32``).
        device: device of the tangent state (default: that of the first parameter).

    Raises:
        TypeError: ``optimizer`` is not exactly ``torch.optim.Adam`` / ``AdamW``.
        ValueError: ``dim`` different from the number of parameters; ``params`` not the optimiser's;
            invalid ``betas``/``eps``.

    Example::

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        params = [p for p in model.parameters() if p.requires_grad]
        tangent = tangent_dynamics(opt, dim=sum(p.numel() for p in params), params=params)
        for batch in loader:
            with HessianOperator(model, loss_fn, batch) as H:
                opt.zero_grad(); loss_fn(model, batch).backward()
                tangent.step(H.matvec, gradient=H.gradient())   # before opt.step()
            opt.step()
        lam = tangent.flush_window()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        dim: int,
        *,
        params: Any = None,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        space: LocalSpace | None = None,
    ) -> None:
        check_adam(optimizer, type(self).__name__)
        self.optimizer = optimizer
        self.params = ordered_parameters(optimizer, params)
        n = sum(local_tensor(p).numel() for p in self.params)
        if dim != n:
            raise ValueError(f"dim={dim} does not match the {n} trainable parameters updated by the optimizer.")
        if device is None and self.params:
            device = self.params[0].device
        self._init_common(dim, seed, dtype, device, space)
        self.amsgrad = any(bool(g["amsgrad"]) for g in optimizer.param_groups)
        self.delta_m = torch.zeros(dim, dtype=self.dtype, device=self.device)
        self.delta_v = torch.zeros(dim, dtype=self.dtype, device=self.device)
        self.delta_vmax: torch.Tensor | None = (
            torch.zeros(dim, dtype=self.dtype, device=self.device) if self.amsgrad else None
        )

    @classmethod
    def from_optimizer(
        cls,
        optimizer: torch.optim.Optimizer,
        dim: int,
        *,
        params: Any = None,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        space: LocalSpace | None = None,
    ) -> AdamTangentDynamics:
        """Same as the constructor (kept for symmetry with :meth:`TangentDynamics.from_optimizer`)."""
        return cls(optimizer, dim, params=params, seed=seed, dtype=dtype, device=device, space=space)

    def _state_vectors(self) -> list[torch.Tensor]:
        vectors = [self.delta_theta, self.delta_m, self.delta_v]
        return vectors if self.delta_vmax is None else [*vectors, self.delta_vmax]

    def _flat_gradient(self, gradient: torch.Tensor | None) -> tuple[torch.Tensor, list[bool]]:
        """The flat gradient and, per parameter, whether Adam updates it.

        A parameter whose ``.grad`` is ``None`` is skipped by Adam (no update, no state change): its
        coordinates of the gradient are 0 here and its flag is ``False``. With ``gradient`` given, all are updated.
        """
        active = [True] * len(self.params)
        if gradient is None:
            grads = [p.grad for p in self.params]
            if all(g is None for g in grads):
                raise ValueError(
                    "no parameter has a .grad; call step() after backward() and before optimizer.step(), or pass "
                    "gradient= (e.g. HessianOperator.gradient())."
                )
            active = [g is not None for g in grads]
            gradient = torch.cat([
                (torch.zeros_like(local_tensor(p)) if g is None else local_tensor(g)).detach().reshape(-1)
                for p, g in zip(self.params, grads)
            ])
        if not isinstance(gradient, torch.Tensor) or gradient.shape != (self.dim,):
            shape = getattr(gradient, "shape", gradient)
            raise ValueError(f"gradient must be a flat tensor of shape [{self.dim}], got {shape}.")
        return gradient.detach().to(device=self.device, dtype=self.dtype), active

    def step(
        self,
        hvp: Callable[[torch.Tensor], torch.Tensor],
        lr: float | None = None,
        *,
        gradient: torch.Tensor | None = None,
    ) -> float:
        """Propagate the tangent state through one linearised Adam step; return its log growth.

        Args:
            hvp: ``hvp(v) -> H v`` for the Hessian of this step's loss at this step's (pre-step) parameters.
            lr: the learning rate of this step for every group; ``None`` (default) = each group's own ``lr``.
            gradient: ``∇L(θ)`` of this step as a flat vector in the tangent's parameter order (the one the
                optimiser will use); ``None`` = read from the parameters' ``.grad`` (a parameter without
                ``.grad`` is skipped by Adam, and its tangent coordinates are left unchanged, as its state is).

        Returns:
            ``log(‖state'‖ / ‖state‖)`` (the state is renormalised to unit norm); ``-inf`` if the step
            annihilates it (the direction is then kept).

        Raises:
            ValueError: ``lr`` negative or not finite; ``gradient`` / ``hvp`` output of a wrong shape; no
                parameter with a ``.grad`` when ``gradient`` is ``None``.
        """
        if lr is not None:
            lr = check_real("lr", _as_float(lr), 0.0)
        grad, active = self._flat_gradient(gradient)
        hv = self._hv(hvp)
        old_state = self._state_vectors()
        new_state = [torch.empty_like(x) for x in old_state]
        offset = 0
        # One parameter at a time: its hyper-parameters are Python scalars, and no [dim]-sized copy of them
        # (or of m, v) is made.
        for p, r, updated in zip(self.params, _adam_parameters(self.optimizer, self.params), active):
            p = local_tensor(p)
            piece = slice(offset, offset + p.numel())
            offset += p.numel()
            olds = [x[piece] for x in old_state]
            if not updated:  # Adam skips a parameter without .grad: its tangent is unchanged
                for new, old in zip(new_state, olds):
                    new[piece] = old
                continue
            d_theta, d_m, d_v = olds[:3]
            alpha = r.lr if lr is None else lr
            sign = -1.0 if r.maximize else 1.0
            g, d_g = sign * grad[piece], sign * hv[piece]
            if r.wd_coupled:
                theta = p.detach().reshape(-1).to(device=self.device, dtype=self.dtype)
                g, d_g = g + r.wd_coupled * theta, d_g + r.wd_coupled * d_theta
            b1, b2, t = r.beta1, r.beta2, r.step + 1
            bc1, bc2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
            m_old = torch.zeros_like(g) if r.m is None else r.m.to(device=self.device, dtype=self.dtype)
            v_old = torch.zeros_like(g) if r.v is None else r.v.to(device=self.device, dtype=self.dtype)
            m_new = b1 * m_old + (1 - b1) * g
            v_new = b2 * v_old + (1 - b2) * g * g
            d_m_new = b1 * d_m + (1 - b1) * d_g
            d_v_new = b2 * d_v + 2 * (1 - b2) * g * d_g
            new_state[1][piece], new_state[2][piece] = d_m_new, d_v_new
            v_hat, d_v_hat = v_new, d_v_new
            if r.amsgrad:
                vmax_old = torch.zeros_like(g) if r.vmax is None else r.vmax.to(device=self.device, dtype=self.dtype)
                grows = v_new > vmax_old
                v_hat = torch.where(grows, v_new, vmax_old)
                d_v_hat = torch.where(grows, d_v_new, olds[3])
                new_state[3][piece] = d_v_hat
            elif len(new_state) == 4:
                new_state[3][piece] = 0.0  # a group without amsgrad has no v_max
            root = v_hat.sqrt()
            denom = root / bc2_sqrt + r.eps
            positive = root > 0
            d_denom = torch.where(positive, d_v_hat, 0.0) / (2 * torch.where(positive, root, 1.0) * bc2_sqrt)
            new_state[0][piece] = (1 - alpha * r.wd_decoupled) * d_theta - (alpha / bc1) * (
                d_m_new / denom - m_new * d_denom / denom**2
            )

        old_sq = self._total(sum(x.pow(2).sum() for x in old_state))
        new_sq = self._total(sum(x.pow(2).sum() for x in new_state))
        if float(new_sq) == 0.0:
            return self._record(-math.inf)
        log_growth = 0.5 * (math.log(float(new_sq)) - math.log(float(old_sq)))
        norm = torch.sqrt(new_sq)
        for x in new_state:
            x.div_(norm)
        self.delta_theta, self.delta_m, self.delta_v = new_state[:3]
        if len(new_state) == 4:
            self.delta_vmax = new_state[3]
        return self._record(log_growth)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Tangent vectors and counters (the hyper-parameters are read from the optimiser at each step)."""
        return {
            **self._counters(),
            "optimizer": "adam",
            "delta_theta": self.delta_theta.detach().clone(),
            "delta_m": self.delta_m.detach().clone(),
            "delta_v": self.delta_v.detach().clone(),
            "delta_vmax": None if self.delta_vmax is None else self.delta_vmax.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; vectors are moved to this instance's dtype and device.

        Raises:
            ValueError: the state belongs to a different ``dim``, to an SGD tangent, or to a different
                ``amsgrad`` setting.
        """
        if int(state["dim"]) != self.dim:
            raise ValueError(f"state_dict is for dim={state['dim']}, this AdamTangentDynamics has dim={self.dim}.")
        if state.get("optimizer") != "adam":
            raise ValueError("state_dict belongs to an SGD TangentDynamics, not to an Adam/AdamW tangent.")
        if (state["delta_vmax"] is None) != (self.delta_vmax is None):
            raise ValueError("state_dict amsgrad setting does not match this optimiser's amsgrad.")
        self.delta_theta = self._vector(state["delta_theta"])
        self.delta_m = self._vector(state["delta_m"])
        self.delta_v = self._vector(state["delta_v"])
        if state["delta_vmax"] is not None:
            self.delta_vmax = self._vector(state["delta_vmax"])
        self._load_counters(state)


def tangent_dynamics(
    optimizer: torch.optim.Optimizer,
    dim: int,
    *,
    params: Any = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    space: LocalSpace | None = None,
) -> TangentDynamics | AdamTangentDynamics:
    """The tangent of ``optimizer``'s steps: :class:`TangentDynamics` (SGD) or :class:`AdamTangentDynamics` (Adam).

    Both are driven the same way: ``tangent.step(H.matvec)`` once per training step, before
    ``optimizer.step()``, then ``flush_window()`` for λ; with ``lr`` omitted each param group's own LR is read
    from the optimiser at the step (pass ``lr=`` to override it for every group). The Adam tangent also reads
    the gradient (``.grad`` or ``gradient=``) and the optimiser state at each step.

    Args:
        optimizer: ``torch.optim.SGD``, ``torch.optim.Adam`` or ``torch.optim.AdamW``.
        dim: length of the flat parameter vector.
        params: the parameters in the flat order of the Hessian operator (for SGD it matters only when the
            groups' LRs differ); ``None`` = the optimiser's order.
        seed, dtype, device, space: as in :meth:`TangentDynamics.from_optimizer`.

    Raises:
        TypeError: any other optimiser (the message names the supported ones).
        ValueError: as raised by :meth:`TangentDynamics.from_optimizer` / :class:`AdamTangentDynamics`.

    Example::

        tangent = tangent_dynamics(trainer.optimizers[0], dim, params=list(model.parameters()), dtype=torch.float64)
    """
    if type(optimizer) in _ADAM_TYPES:
        return AdamTangentDynamics(optimizer, dim, params=params, seed=seed, dtype=dtype, device=device, space=space)
    if isinstance(optimizer, torch.optim.SGD):
        return TangentDynamics.from_optimizer(
            optimizer, dim, params=params, seed=seed, dtype=dtype, device=device, space=space
        )
    raise TypeError(
        f"tangent_dynamics supports torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW; got "
        f"{type(optimizer).__module__}.{type(optimizer).__name__}."
    )
