"""Callback that measures the largest Lyapunov exponent λ of the real SGD / Adam / AdamW trajectory with a tangent vector."""

from __future__ import annotations

import math
from typing import Any

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lyapunov_callbacks.callbacks._lightning import (
    check_choice,
    check_prefix,
    check_optimizer_holds_parameters,
    check_sharding,
    check_supported,
    check_tag_owners,
    compiled_training_step,
    current_lr,
    fast_dev_run_budget,
    finite_or_nan,
    log_measurements,
    measurement_operator,
    resolve_dtype,
    resolve_loss_fn,
    step_loss,
)
from lyapunov_callbacks.callbacks.tensorboard_layout import add_paper_layout
from lyapunov_callbacks.core.distributed import is_distributed
from lyapunov_callbacks.core.hessian import (
    BACKENDS,
    backend_class,
    estimate_dtype,
    graph_hvp,
    num_trainable_parameters,
    trainable_parameters,
)
from lyapunov_callbacks.core.lyapunov_window import LyapunovWindow
from lyapunov_callbacks.core.sharded import shard_group
from lyapunov_callbacks.core.space import ShardedSpace, local_tensor
from lyapunov_callbacks.core.state import rng_snapshot
from lyapunov_callbacks.core.tangent import AdamTangentDynamics, TangentDynamics, tangent_dynamics

__all__ = ["LyapunovExponentMonitor"]

class LyapunovExponentMonitor(Callback):
    r"""Log the largest Lyapunov exponent λ of SGD, Adam or AdamW training, measured along the real trajectory.

    A tangent vector δ (a perturbation of the weights, and of the optimiser's state: the momentum buffer for
    momentum SGD, the moments m and v for Adam) is carried through the linearisation of every optimiser step
    that is actually taken: :math:`\delta \leftarrow (I - \alpha_t H_t)\,\delta` for plain SGD, with
    :math:`H_t` the Hessian of the step's mini-batch loss at the pre-step weights and :math:`\alpha_t` the
    step's learning rate (each param group's own; momentum, Nesterov and weight decay follow ``torch.optim.SGD``
    exactly, see :class:`~lyapunov_callbacks.core.tangent.TangentDynamics`). For ``torch.optim.Adam`` / ``AdamW``
    the tangent :math:`(\delta\theta, \delta m, \delta v)` goes through the exact linearisation of PyTorch's
    step (bias corrections, ε, coupled or decoupled weight decay, ``amsgrad``, ``maximize``, per-group
    hyper-parameters; see :class:`~lyapunov_callbacks.core.tangent.AdamTangentDynamics`), which reads the step's
    gradient from ``.grad`` and m, v from the optimiser's state. Each step costs one Hessian-vector product (HVP)
    on the step's own batch and with the same dropout masks as the training forward: taken on the training
    step's graph before its backward (see *Products on the training graph*), or else in
    ``on_before_optimizer_step`` by an operator that replays the RNG state captured in ``on_train_batch_start``.
    δ moves in ``on_before_optimizer_step`` — after other callbacks and schedulers set the LR, before the
    weights move, so α is the LR the step really uses. With
    ``accumulate_grad_batches = k`` one tangent step is taken per optimiser step, with the Hessian of the loss
    that step optimises: the mean of its ``k`` micro-batch losses (each with its own dropout masks). λ for a window is the mean log growth
    :math:`\frac1W\sum_t \log(\lVert\delta_{t+1}\rVert / \lVert\delta_t\rVert)` of its ``window`` consecutive
    steps (per step, natural log): λ > 0 means nearby trajectories diverge (the step is too large for the
    curvature, α·h0 > 2 on a quadratic), λ < 0 that they converge.

    Logged at the last step of each window (to ``trainer.callback_metrics`` and every logger), ``{prefix}``
    being the ``prefix`` argument (default ``"lyapunov"``): ``{prefix}/lambda``, ``{prefix}/skipped_steps`` and
    ``optim/lr`` (the LR of that step, shared by all callbacks).

    **Products on the training graph.** With ``reuse_training_graph=True`` (default) the product is taken in
    ``on_before_backward`` on the training step's own autograd graph (:func:`~lyapunov_callbacks.core.hessian.graph_hvp`):
    the same weights, batch, dropout masks and BatchNorm batch statistics, and no forward of its own; both
    passes retain the graph, so Lightning's backward runs after it unchanged. The Hessian is then that of the
    loss ``training_step`` returns (the loss the optimiser steps on; ``training_loss`` for a module that keeps
    its contract), and the products are bit for bit the operator's (``tests/test_lyapunov_training_graph.py``).
    This needs exact products (``hvp="autograd"``), full precision (``32-true`` / ``64-true``), one process, a
    tangent in the parameters' dtype, no hook on a parameter's gradient and an eager training step (a
    ``torch.compile``'d step's graph has no double backward: an info message says so at train start); otherwise,
    and from the first step
    whose product on the graph fails on (e.g. a kernel without a double backward; an info message says so),
    the products come from a :class:`~lyapunov_callbacks.core.hessian.HessianOperator` that evaluates the loss
    again with the step's RNG state replayed.

    **Non-finite steps.** A step whose HVP is not finite (a diverged loss) or whose log growth is not finite
    (the step annihilated δ exactly) is skipped: δ keeps its direction, the step is left out of λ (of its window
    and of the cumulative mean) and counted in ``{prefix}/skipped_steps``, with one warning. The window still
    ends after ``window`` steps; λ is the mean over its finite steps (NaN if none was).

    **Refits, several instances.** Every ``fit`` starts from a fresh δ (seeded by ``seed``) and empty sums,
    unless the callback state is restored from a checkpoint; each instance has its own :attr:`state_key`
    (give each a distinct ``prefix`` to keep their tags apart).

    **Gradient clipping** (``Trainer(gradient_clip_val=...)``) is not part of the linearised map: the tangent
    step is :math:`I - \alpha H` (with momentum/weight decay), the Jacobian of the unclipped step. While norm
    clipping is inactive (‖g‖ below the threshold) this is the exact map; while it is active the true Jacobian
    is :math:`c\,(I - \hat g\hat g^\top) H` scaled by the clip factor :math:`c`, and λ describes the unclipped
    dynamics instead. A warning says so at fit start.

    **Parameter groups.** Each group's coordinates move with that group's own LR, read at every step (so
    per-group schedules are followed). SGD groups must share momentum, dampening, Nesterov and weight decay
    (refused at fit start with a ``ValueError`` naming the setting otherwise); Adam/AdamW groups may differ in
    every hyper-parameter. ``optim/lr`` logs the first group's LR.

    **fast_dev_run.** Under ``Trainer(fast_dev_run=...)`` the window is one step, so λ is logged at the first
    step (the code path runs; the value is one step's log growth, not an exponent); an info message says so.

    Cost:

    - ``every_n_steps=None`` (continuous): every step propagates δ, one HVP per step: on the training graph a
      ``create_graph`` backward plus one double backward (with the operator, a forward more). Measured ratios
      to a plain fit are in ``benchmarks/results/monitor_overhead.md``; λ is logged every ``window`` steps.
      The Adam tangent adds a few element-wise passes over (δθ, δm, δv) per step, small beside the HVP
      (``benchmarks/adam_overhead.py``).
    - ``every_n_steps=N`` (N ≥ ``window``): a window of ``window`` steps starts at every step that is a
      multiple of N (cost ``window/N`` of the continuous cost). δ is kept between windows as a warm start: it is
      already aligned with the expanding direction, so each window measures λ rather than a transient.
    - ``hvp="finite_difference"`` (the paper's perturbed trajectory, Hδ ≈ (∇L(θ+εδ) − ∇L(θ))/ε) reuses the
      training step's own gradient ∇L(θ) from ``.grad`` (full precision only), so each step costs one extra
      forward+backward instead of the graph build plus a double backward. It assumes ``training_loss`` is the
      loss ``training_step`` backpropagates, and it is inexact on ReLU networks (see
      :class:`~lyapunov_callbacks.core.hessian.HessianOperator`).

    The loss is ``pl_module.training_loss(batch)`` when the module defines it, else ``training_step(batch, 0)``
    with logging silenced. Under DDP the HVP is averaged over ranks (the Hessian of the loss DDP optimises), so
    δ and λ are identical on every rank.

    Args:
        window: number of consecutive steps averaged into one λ (default 20). Must be >= 1.
        every_n_steps: ``None`` (default, continuous) or the period N ≥ ``window`` of the measurement windows.
        hvp: HVP backend, ``"autograd"`` (default, exact) or ``"finite_difference"``.
        seed: seed of the random initial tangent vector (default 0).
        dtype: ``None`` (default: the parameters' dtype, float32 under mixed precision), ``"float32"`` or
            ``"float64"``: dtype of the HVP and of the tangent vector.
        prefix: tag prefix of this monitor's values (default ``"lyapunov"``); ``optim/lr`` is not prefixed.
        prog_bar: also show ``{prefix}/lambda`` in the progress bar (default False).
        reuse_training_graph: take the products on the training step's graph where possible (default True; see
            *Products on the training graph*); False: always evaluate the loss again through the operator.

    Raises:
        ValueError: ``window < 1``, ``every_n_steps < window``, unknown ``hvp`` or ``dtype``, a bad ``prefix``, a
            non-bool ``reuse_training_graph``;
            at fit start, with an optimiser other than ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (a subclass
            included), ``SGD(maximize=True)``, SGD param groups that differ in momentum, dampening, Nesterov or
            weight decay, trainable parameters the optimiser does not update (the message names them), manual
            optimisation, several optimisers, or a torch.compile'd module on PyTorch < 2.6 (from 2.6 on it is
            measured through its eager code); at setup, another curvature callback with the same ``prefix``.

    Example::

        import lightning as L
        from lyapunov_callbacks import LyapunovExponentMonitor

        trainer = L.Trainer(max_epochs=5, callbacks=[LyapunovExponentMonitor(window=20, every_n_steps=100)])
        trainer.fit(model, datamodule)   # logs lyapunov/lambda every 100 steps
    """

    def __init__(
        self,
        window: int = 20,
        every_n_steps: int | None = None,
        hvp: str = "autograd",
        seed: int = 0,
        dtype: str | torch.dtype | None = None,
        prefix: str = "lyapunov",
        prog_bar: bool = False,
        reuse_training_graph: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(reuse_training_graph, bool):
            raise ValueError(f"`reuse_training_graph` must be True or False, got {reuse_training_graph!r}.")
        self.reuse_training_graph = reuse_training_graph
        self.prefix = check_prefix(prefix)
        self.prog_bar = bool(prog_bar)
        LyapunovWindow(window, every_n_steps)  # validates both (each message names the parameter)
        check_choice("hvp", hvp, BACKENDS)
        self.window = window
        self.every_n_steps = every_n_steps
        self.hvp = hvp
        self.seed = int(seed)
        self.dtype = resolve_dtype(dtype)
        self._loss_fn: Any = None
        self._reset()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            prefix=self.prefix, window=self.window, every_n_steps=self.every_n_steps, hvp=self.hvp
        )

    @property
    def skipped_steps(self) -> int:
        """Steps left out of λ so far because their growth was not finite."""
        return self._lambda_window.skipped

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_supported(trainer, pl_module, type(self).__name__)
            check_tag_owners(trainer, self)
            # Lightning restores callback state after setup: a checkpoint overrides this clean start.
            self._reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_supported(trainer, pl_module, type(self).__name__)
        self._sharded = check_sharding(trainer, pl_module, type(self).__name__, hvp=self.hvp, dtype=self.dtype)
        self._loss_fn = resolve_loss_fn(pl_module)
        check_optimizer_holds_parameters(trainer.optimizers[0], pl_module, type(self).__name__)
        try:
            # Unsupported optimisers and settings fail here, before any training: one ValueError.
            self.tangent = self._new_tangent(trainer, pl_module)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{type(self).__name__} cannot follow this optimiser: {err} Use torch.optim.SGD, Adam or AdamW "
                "with supported settings, or remove the monitor."
            ) from err
        if fast_dev_run_budget(trainer, type(self).__name__, "λ is logged after a window of 1 step"):
            self._lambda_window.size = 1
        if trainer.gradient_clip_val:
            rank_zero_warn(
                f"{type(self).__name__}: gradient clipping (gradient_clip_val={trainer.gradient_clip_val}) is not "
                "part of the linearised optimiser step; λ is exact while the clip is inactive and describes the "
                "unclipped map while it is active."
            )
        add_paper_layout(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Rebuilt now that the optimiser state is restored (momentum buffers present on resume), then the
        # checkpointed δ is put back.
        if self._pending_state is not None or self.tangent.num_steps == 0:
            self.tangent = self._new_tangent(trainer, pl_module)
        if self._pending_state is not None:
            self.tangent.load_state_dict(self._pending_state)
            self._pending_state = None
        self._graph_params = self._training_graph_parameters(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._lambda_window.active(step):
            self._pending = []
            return
        if self._pending_step != step or not self._pending:  # the first micro-batch of this optimiser step
            self._pending, self._pending_step = [], step
            self._graph_hv, self._graph_parts = None, 0
            self._lambda_window.begin(step)
        # The RNG state right before the training forward: replayed so the HVP sees the same dropout masks.
        self._pending.append((batch, rng_snapshot()))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # H_t δ on the training step's own graph (same weights, batch and dropout masks, no forward of its
        # own); with accumulation, the products of the micro-batch losses (each divided by k) add up.
        params = self._graph_params
        if (
            params is None
            or self._pending_step != trainer.global_step
            or len(self._pending) != self._graph_parts + 1  # one product per micro-batch, in order
            or not isinstance(loss, torch.Tensor)
            or not loss.requires_grad
        ):
            return
        try:
            hv = graph_hvp(loss, params, self.tangent.delta_theta)
        except (RuntimeError, ValueError) as err:
            # E.g. a kernel without a double backward: the graph is retained (Lightning's backward still runs),
            # this step falls back to the operator (own forward, math attention kernel), and so do later ones.
            self._graph_params, self._graph_hv, self._graph_parts = None, None, 0
            rank_zero_info(
                f"{type(self).__name__}: the Hessian-vector product on the training step's graph failed ({err}); "
                "the products evaluate the loss again through the operator from now on."
            )
            return
        self._graph_hv = hv if self._graph_hv is None else self._graph_hv.add_(hv)
        self._graph_parts += 1

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if not self._pending or self._pending_step != step:
            return
        micro, self._pending = self._pending, []
        lr = current_lr(trainer)  # logged; the tangent reads every group's own LR
        lam = self._lambda_window.add(self._propagate(trainer, pl_module, micro))
        if lam is None:
            return
        p = self.prefix
        metrics = {f"{p}/lambda": finite_or_nan(lam), f"{p}/skipped_steps": float(self.skipped_steps), "optim/lr": lr}
        self.last_metrics = metrics
        log_measurements(trainer, pl_module, metrics, step, prog_bar=(f"{p}/lambda",) if self.prog_bar else ())

    # ---------------------------------------------------------------------------------------------- helpers
    def _reset(self) -> None:
        """A fresh start: no δ (built at fit start), no pending state, an empty window."""
        self.tangent: TangentDynamics | AdamTangentDynamics | None = None
        self._sharded = False  # FSDP2 shards (set at fit start)
        self.last_metrics: dict[str, float] = {}
        self._lambda_window = LyapunovWindow(self.window, self.every_n_steps)
        self._warned_skip = False
        self._pending_state: dict[str, Any] | None = None
        self._pending: list[tuple[Any, dict]] = []  # (batch, rng) of the micro-batches of the step being taken
        self._pending_step: int | None = None
        # Products on the training graph: the parameters (None: off), the summed product, micro-batches done.
        self._graph_params: list[torch.Tensor] | None = None
        self._graph_hv: torch.Tensor | None = None
        self._graph_parts = 0

    def _tangent_dtype(self, pl_module: pl.LightningModule) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return estimate_dtype(p for p in pl_module.parameters() if p.requires_grad)

    def _new_tangent(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TangentDynamics | AdamTangentDynamics:
        # The operator's flat order (the module's trainable parameters), which per-group LRs and Adam's
        # per-parameter state are matched to.
        params = [p for _, p in trainable_parameters(pl_module)]
        if self._sharded:  # FSDP2: the tangent holds this rank's entries, norms summed over ranks
            return tangent_dynamics(
                trainer.optimizers[0], sum(local_tensor(p).numel() for p in params), params=params, seed=self.seed,
                dtype=self._tangent_dtype(pl_module), space=ShardedSpace(shard_group(pl_module)),
            )
        return tangent_dynamics(
            trainer.optimizers[0], num_trainable_parameters(pl_module), params=params, seed=self.seed,
            dtype=self._tangent_dtype(pl_module),
        )

    def _training_graph_parameters(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> list[torch.Tensor] | None:
        """The trainable parameters when products can be taken on the training step's graph, else ``None``.

        That needs a backend whose product is the graph's double backward, full precision, one process (under
        DDP the product must be averaged over ranks and the graph belongs to DDP's reducer), a tangent in the
        parameters' dtype and device, and no hook on a parameter's gradient (it would run during the extra passes).
        """
        if not self.reuse_training_graph or not backend_class(self.hvp).graph_product:
            return None
        if trainer.precision not in ("32-true", "64-true") or trainer.world_size > 1 or is_distributed():
            return None
        if compiled_training_step(pl_module, type(self).__name__):
            return None
        params = [p for _, p in trainable_parameters(pl_module)]
        tangent = self.tangent
        if any(
            p.dtype != tangent.dtype or p.device != tangent.delta_theta.device or getattr(p, "_backward_hooks", None)
            for p in params
        ):
            return None
        return params

    def _training_gradient(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[torch.Tensor] | None:
        """∇L(θ) of this step as the training backward left it in ``.grad``, when it is exactly that gradient.

        In ``on_before_optimizer_step`` ``.grad`` holds the gradient of this step's loss (with accumulation, of the
        mean micro-batch loss) at the pre-step weights with this step's dropout masks, already averaged over DDP
        ranks and not yet clipped. Under mixed precision it was computed under autocast, not in the operator's
        precision, so it is not reused there. Returned as the per-parameter tensors themselves (the operator reads
        them piece by piece and never writes them): no flat copy.
        """
        if trainer.precision not in ("32-true", "64-true"):
            return None
        grads = [p.grad for p in pl_module.parameters() if p.requires_grad]
        if any(g is None for g in grads):
            return None
        return [g.detach() for g in grads]

    def _propagate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, micro: list[tuple[Any, dict]]) -> float:
        """One linearised step of δ at the current (pre-step) weights; returns its log growth (NaN: skipped)."""
        ready, self._graph_hv = self._graph_hv, None
        if ready is not None and self._graph_parts == len(micro):
            self._graph_parts = 0
            delta = self.tangent.delta_theta

            def product(v: torch.Tensor) -> torch.Tensor:
                if v is not delta:  # the tangent asks for H δ, the product taken on the training graph
                    raise RuntimeError("the tangent step asked for a product with a vector other than δ")
                return ready

            return self._tangent_step(trainer, product)
        self._graph_parts = 0
        options = {}
        if backend_class(self.hvp).takes_gradient:  # the training step's own ∇L(θ) saves a backward
            gradient = self._training_gradient(trainer, pl_module)
            if gradient is not None:
                options["gradient"] = gradient
        op = measurement_operator(
            pl_module, *step_loss(self._loss_fn, micro), self.hvp, self.tangent.dtype, **options
        )
        with op:
            return self._tangent_step(trainer, op.matvec)

    def _tangent_step(self, trainer: pl.Trainer, product: Any) -> float:
        """``tangent.step`` with the products of ``product``; returns the log growth (NaN: the step is undone)."""
        tangent = self.tangent
        saved = tangent.snapshot()
        # lr=None: each group's own LR; the Adam tangent reads the step's gradient from .grad.
        growth = tangent.step(product)
        # The growth is finite exactly when the new state's squared norm is finite and non-zero, i.e. when the
        # product and every entry of the new state are finite: no separate pass over them is needed.
        if math.isfinite(growth):
            return growth
        tangent.restore(saved)
        if not self._warned_skip:
            self._warned_skip = True
            rank_zero_warn(
                f"{type(self).__name__}: the tangent step at step {trainer.global_step} has a non-finite growth "
                f"({growth!r}: a diverged loss or an annihilated perturbation); it is left out of λ and counted "
                f"in {self.prefix}/skipped_steps (no further warning).",
                category=RuntimeWarning,
            )
        return float("nan")

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        window = self._lambda_window.state_dict()
        if self.tangent is None:
            return {} if self._pending_state is None else {"tangent": self._pending_state, "window": window}
        state = self.tangent.state_dict()
        for key in ("delta_theta", "delta_m", "delta_v", "delta_vmax"):
            if state.get(key) is not None:
                state[key] = state[key].cpu()
        return {"tangent": state, "window": window}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        tangent_state = state_dict.get("tangent")
        if "window" in state_dict:
            self._lambda_window.load_state_dict(state_dict["window"])
        elif tangent_state is not None:  # a checkpoint of an earlier release kept the window in the tangent
            self._lambda_window.load_state_dict({
                "log_growth_sum": tangent_state["window_log_growth_sum"], "steps": tangent_state["window_steps"],
                "skipped": state_dict.get("skipped_steps", 0),
            })
        if tangent_state is None:
            return
        if self.tangent is not None and self.tangent.dim == int(tangent_state["dim"]):
            self.tangent.load_state_dict(tangent_state)
        # Also kept for on_train_start, which rebuilds the tangent once the optimiser state is restored.
        self._pending_state = tangent_state
