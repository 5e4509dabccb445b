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
    current_lr,
    finite_or_nan,
    log_measurements,
    measurement_operator,
    resolve_dtype,
    resolve_loss_fn,
    step_loss,
    training_gradient,
    training_graph_parameters,
)
from lyapunov_callbacks.callbacks._setup import (
    check_optimizer_holds_parameters,
    check_prefix,
    check_sharding,
    check_supported,
    check_tag_owners,
    fast_dev_run_budget,
)
from lyapunov_callbacks.callbacks.tensorboard_layout import add_paper_layout
from lyapunov_callbacks.core.hessian import BACKENDS, backend_class, estimate_dtype, trainable_parameters
from lyapunov_callbacks.core.lyapunov_window import LyapunovWindow
from lyapunov_callbacks.core.sharded import shard_group
from lyapunov_callbacks.core.space import ShardedSpace, local_tensor
from lyapunov_callbacks.core.state import rng_snapshot
from lyapunov_callbacks.core.tangent import AdamTangentDynamics, TangentDynamics, tangent_dynamics
from lyapunov_callbacks.core.training_graph import TrainingGraphProducts

__all__ = ["LyapunovExponentMonitor"]

class LyapunovExponentMonitor(Callback):
    r"""Log the largest Lyapunov exponent λ of SGD, Adam or AdamW training, measured along the real trajectory.

    A tangent vector δ (a perturbation of the weights, and of the optimiser's state: the momentum buffer for
    momentum SGD, the moments m and v for Adam) is carried through the linearisation of every optimiser step
    that is actually taken: :math:`\delta \leftarrow (I - \alpha_t H_t)\,\delta` for plain SGD, with
    :math:`H_t` the Hessian of the step's mini-batch loss at the pre-step weights and :math:`\alpha_t` the
    step's learning rate (each param group's own; momentum, Nesterov and weight decay exactly as
    ``torch.optim.SGD``: :class:`~lyapunov_callbacks.core.tangent.TangentDynamics`); for ``Adam`` / ``AdamW``
    through the exact linearisation of PyTorch's step
    (:class:`~lyapunov_callbacks.core.tangent.AdamTangentDynamics`). λ of a window is the mean log growth
    :math:`\frac1W\sum_t \log(\lVert\delta_{t+1}\rVert / \lVert\delta_t\rVert)` of its ``window``
    consecutive steps (natural log, per step): λ > 0 means nearby trajectories diverge, λ < 0 that they converge.

    Each step costs one Hessian-vector product (HVP) on the step's own batch with the training forward's dropout
    masks, taken on the training step's graph in ``on_before_backward`` (``reuse_training_graph``: exact
    products, full precision, one process, an eager step; bit for bit the operator's) or else by an operator
    that replays the step's RNG state. δ moves in ``on_before_optimizer_step``, with the LR the step really uses;
    with ``accumulate_grad_batches = k`` once per optimiser step, with the Hessian of the mean of its ``k``
    micro-batch losses. A step whose HVP or growth is not finite is undone, left out of λ and counted in
    ``{prefix}/skipped_steps`` (one warning). Gradient clipping is not part of the map (a warning says so).
    Every ``fit`` starts from a fresh δ (seeded by ``seed``) unless restored from a checkpoint. The user guide's
    *LyapunovExponentMonitor in detail* has each of these, the cost of each setting and the DDP and FSDP2
    semantics.

    Logged at the last step of each window (to ``trainer.callback_metrics`` and every logger):
    ``{prefix}/lambda``, ``{prefix}/skipped_steps`` and ``optim/lr`` (the LR of that step).

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
        if self.reuse_training_graph:
            self._graph = TrainingGraphProducts(
                training_graph_parameters(trainer, pl_module, self.hvp, self.tangent, type(self).__name__)
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._lambda_window.active(step):
            self._pending = []
            return
        if self._pending_step != step or not self._pending:  # the first micro-batch of this optimiser step
            self._pending, self._pending_step = [], step
            self._graph.begin()
            self._lambda_window.begin(step)
        # The RNG state right before the training forward: replayed so the HVP sees the same dropout masks.
        self._pending.append((batch, rng_snapshot()))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # H_t δ on the training step's own graph; with accumulation the micro-batch products (each loss divided
        # by k) add up. One product per micro-batch, in order.
        graph = self._graph
        if (
            not graph.enabled
            or self._pending_step != trainer.global_step
            or len(self._pending) != graph.parts + 1
            or not isinstance(loss, torch.Tensor)
            or not loss.requires_grad
        ):
            return
        err = graph.add(loss, self.tangent.delta_theta)
        if err is not None:  # e.g. no double backward: this and later steps go through the operator
            rank_zero_info(
                f"{type(self).__name__}: the Hessian-vector product on the training step's graph failed ({err}); "
                "the products evaluate the loss again through the operator from now on."
            )

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
        self._graph = TrainingGraphProducts()  # products on the training graph (off until train start)

    def _new_tangent(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TangentDynamics | AdamTangentDynamics:
        # In the operator's flat order (the module's trainable parameters), which per-group LRs and Adam's
        # per-parameter state are matched to; under FSDP2 this rank's entries, norms summed over the ranks.
        params = [p for _, p in trainable_parameters(pl_module)]
        return tangent_dynamics(
            trainer.optimizers[0], sum(local_tensor(p).numel() for p in params), params=params, seed=self.seed,
            dtype=self.dtype or estimate_dtype(params),
            space=ShardedSpace(shard_group(pl_module)) if self._sharded else None,
        )

    def _propagate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, micro: list[tuple[Any, dict]]) -> float:
        """One linearised step of δ at the current (pre-step) weights; returns its log growth (NaN: skipped)."""
        product = self._graph.take(len(micro), self.tangent.delta_theta)
        if product is None:
            options = {}
            gradient = training_gradient(trainer, pl_module) if backend_class(self.hvp).takes_gradient else None
            if gradient is not None:  # the training step's own ∇L(θ) saves a backward
                options["gradient"] = gradient
            with measurement_operator(
                pl_module, *step_loss(self._loss_fn, micro), self.hvp, self.tangent.dtype, **options
            ) as op:
                growth = self.tangent.step_or_undo(op.matvec)
        else:
            growth = self.tangent.step_or_undo(product)
        if math.isnan(growth) and not self._warned_skip:
            self._warned_skip = True
            rank_zero_warn(
                f"{type(self).__name__}: the tangent step at step {trainer.global_step} has a non-finite growth "
                "(a diverged loss or an annihilated perturbation); it is left out of λ and counted "
                f"in {self.prefix}/skipped_steps (no further warning).",
                category=RuntimeWarning,
            )
        return growth

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
