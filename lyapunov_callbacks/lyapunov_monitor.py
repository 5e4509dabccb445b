"""Callback that measures the largest Lyapunov exponent λ of the real SGD trajectory with a tangent vector."""

from __future__ import annotations

from typing import Any

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lyapunov_callbacks._lightning import (
    check_choice,
    check_int,
    check_supported,
    current_lr,
    finite_or_nan,
    log_measurements,
    resolve_dtype,
    resolve_loss_fn,
)
from lyapunov_callbacks._state import restore_rng, rng_snapshot
from lyapunov_callbacks.hessian import BACKENDS, HessianOperator, num_trainable_parameters
from lyapunov_callbacks.tangent import TangentDynamics
from lyapunov_callbacks.tensorboard_layout import add_paper_layout

__all__ = ["LyapunovExponentMonitor"]

class LyapunovExponentMonitor(Callback):
    r"""Log the largest Lyapunov exponent λ of SGD training, measured along the real trajectory.

    A tangent vector δ (a perturbation of the weights, and of the momentum buffer for momentum SGD) is carried
    through the linearisation of every optimiser step that is actually taken:
    :math:`\delta \leftarrow (I - \alpha_t H_t)\,\delta` for plain SGD, with :math:`H_t` the Hessian of the
    step's mini-batch loss at the pre-step weights and :math:`\alpha_t` the step's learning rate (momentum,
    Nesterov and weight decay follow ``torch.optim.SGD`` exactly, see
    :class:`~lyapunov_callbacks.tangent.TangentDynamics`). Each step costs one Hessian-vector product (HVP),
    computed in ``on_before_optimizer_step`` — after other callbacks set the LR, before the weights move — on
    the step's own batch and with the same dropout masks as the training forward (the RNG state is captured in
    ``on_train_batch_start`` and replayed). λ for a window is the mean log growth
    :math:`\frac1W\sum_t \log(\lVert\delta_{t+1}\rVert / \lVert\delta_t\rVert)` of its ``window`` consecutive
    steps (per step, natural log): λ > 0 means nearby trajectories diverge (the step is too large for the
    curvature, α·h0 > 2 on a quadratic), λ < 0 that they converge.

    Logged at the last step of each window (to ``trainer.callback_metrics`` and every logger):
    ``lyapunov/lambda`` and ``optim/lr`` (the LR of that step).

    Cost:

    - ``every_n_steps=None`` (continuous): every step propagates δ, one HVP per step. An HVP costs about
      1.6-2.2 forward+backward passes besides building the gradient graph, so training runs ~2-3× slower
      (2.2× measured on an MLP); λ is logged every ``window`` steps.
    - ``every_n_steps=N`` (N ≥ ``window``): a window of ``window`` steps starts at every step that is a
      multiple of N (cost ``window/N`` of the continuous cost). δ is kept between windows as a warm start: it is
      already aligned with the expanding direction, so each window measures λ rather than a transient.
    - ``hvp="finite_difference"`` (the paper's perturbed trajectory, Hδ ≈ (∇L(θ+εδ) − ∇L(θ))/ε) reuses the
      training step's own gradient ∇L(θ) from ``.grad`` (full precision only), so each step costs one extra
      forward+backward instead of the graph build plus a double backward. It assumes ``training_loss`` is the
      loss ``training_step`` backpropagates, and it is inexact on ReLU networks (see
      :class:`~lyapunov_callbacks.hessian.HessianOperator`).

    The loss is ``pl_module.training_loss(batch)`` when the module defines it, else ``training_step(batch, 0)``
    with logging silenced. Under DDP the HVP is averaged over ranks (the Hessian of the loss DDP optimises), so
    δ and λ are identical on every rank. Gradient clipping is not part of the linearised map (a warning says so).

    Args:
        window: number of consecutive steps averaged into one λ (default 20). Must be >= 1.
        every_n_steps: ``None`` (default, continuous) or the period N ≥ ``window`` of the measurement windows.
        hvp: HVP backend, ``"autograd"`` (default, exact) or ``"finite_difference"``.
        seed: seed of the random initial tangent vector (default 0).
        dtype: ``None`` (default: the parameters' dtype, float32 under mixed precision), ``"float32"`` or
            ``"float64"``: dtype of the HVP and of the tangent vector.

    Raises:
        ValueError: ``window < 1``, ``every_n_steps < window``, unknown ``hvp`` or ``dtype``.
        TypeError: at fit start, if the optimiser is not ``torch.optim.SGD`` (with or without momentum).
        RuntimeError: at fit start, with manual optimisation, several optimisers or
            ``accumulate_grad_batches > 1``.

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
    ) -> None:
        super().__init__()
        check_int("window", window, "window=20")
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < window
        ):
            raise ValueError(
                f"every_n_steps must be None (continuous) or an integer >= window={window}, got "
                f"{every_n_steps!r}: a window of {window} steps starts every every_n_steps steps. Pass "
                f"every_n_steps=None or every_n_steps >= {window}."
            )
        check_choice("hvp", hvp, BACKENDS)
        tangent_dtype = resolve_dtype(dtype)
        self.window = window
        self.every_n_steps = every_n_steps
        self.hvp = hvp
        self.seed = int(seed)
        self.dtype = tangent_dtype
        self.tangent: TangentDynamics | None = None
        self.last_metrics: dict[str, float] = {}
        self._loss_fn: Any = None
        self._pending_state: dict[str, Any] | None = None
        self._pending: tuple[int, Any, dict] | None = None  # (step, batch, rng) of the step being taken

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_supported(trainer, pl_module, type(self).__name__, allow_accumulation=False)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_supported(trainer, pl_module, type(self).__name__, allow_accumulation=False)
        self._loss_fn = resolve_loss_fn(pl_module)
        tangent = self._new_tangent(trainer, pl_module)  # unsupported optimisers fail here, before any training
        if self.tangent is None or self.tangent.dim != tangent.dim:
            self.tangent = tangent  # a second fit with the same callback keeps δ as a warm start
        if trainer.gradient_clip_val:
            rank_zero_warn(
                f"{type(self).__name__}: gradient clipping (gradient_clip_val={trainer.gradient_clip_val}) is not "
                "part of the linearised step; λ describes the unclipped map."
            )
        add_paper_layout(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Rebuilt now that the optimiser state is restored (momentum buffers present on resume), then the
        # checkpointed δ, counters and partial window are put back.
        if self._pending_state is not None or self.tangent.num_steps == 0:
            self.tangent = self._new_tangent(trainer, pl_module)
        if self._pending_state is not None:
            self.tangent.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._pending = None
        if not self._active(step):
            return
        if self.every_n_steps is not None and step % self.every_n_steps == 0 and self.tangent.window_steps:
            self.tangent.flush_window()  # a partial window left over (e.g. an interrupted run) is discarded
        # The RNG state right before the training forward: replayed so the HVP sees the same dropout masks.
        self._pending = (step, batch, rng_snapshot())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._pending is None:
            return
        step, batch, rng = self._pending
        self._pending = None
        lr = current_lr(trainer)
        self._propagate(trainer, pl_module, batch, rng, lr)
        if self.tangent.window_steps >= self.window:
            lam = self.tangent.flush_window()
            metrics = {"lyapunov/lambda": finite_or_nan(lam), "optim/lr": lr}
            self.last_metrics = metrics
            log_measurements(trainer, pl_module, metrics, step)

    # ---------------------------------------------------------------------------------------------- helpers
    def _active(self, step: int) -> bool:
        return self.every_n_steps is None or step % self.every_n_steps < self.window

    def _tangent_dtype(self, pl_module: pl.LightningModule) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        dtypes = {p.dtype for p in pl_module.parameters() if p.requires_grad}
        only = next(iter(dtypes)) if len(dtypes) == 1 else None
        return only if only in (torch.float32, torch.float64) else torch.float32

    def _new_tangent(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TangentDynamics:
        dim = num_trainable_parameters(pl_module)
        return TangentDynamics.from_optimizer(
            trainer.optimizers[0], dim, seed=self.seed, dtype=self._tangent_dtype(pl_module)
        )

    def _training_gradient(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
        """∇L(θ) of this step as the training backward left it in ``.grad``, when it is exactly that gradient.

        In ``on_before_optimizer_step`` (automatic optimisation, no accumulation: checked at setup) ``.grad``
        holds the gradient of this step's loss at the pre-step weights with this step's dropout masks, already
        averaged over DDP ranks and not yet clipped. Under mixed precision it was computed under autocast, not
        in the operator's precision, so it is not reused there.
        """
        if trainer.precision not in ("32-true", "64-true"):
            return None
        grads = [p.grad for p in pl_module.parameters() if p.requires_grad]
        if any(g is None for g in grads):
            return None
        return torch.cat([g.detach().reshape(-1) for g in grads]).to(self.tangent.dtype)

    def _propagate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, rng: dict, lr: float
    ) -> float:
        """One linearised step of δ at the current (pre-step) weights; returns its log growth."""
        # Finite differences need ∇L(θ) and ∇L(θ+εv): the first is the training step's own gradient.
        gradient = self._training_gradient(trainer, pl_module) if self.hvp == "finite_difference" else None
        current = rng_snapshot()
        try:
            restore_rng(rng)  # the operator captures the RNG at construction: the training forward's state
            with torch.enable_grad():
                op = HessianOperator(
                    pl_module, self._loss_fn, batch, backend=self.hvp, dtype=self.tangent.dtype, gradient=gradient
                )
        finally:
            restore_rng(current)
        with op:
            return self.tangent.step(op.matvec, lr)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.tangent is None:
            return {} if self._pending_state is None else {"tangent": self._pending_state}
        state = self.tangent.state_dict()
        for key in ("delta_theta", "delta_m"):
            if state[key] is not None:
                state[key] = state[key].cpu()
        return {"tangent": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        tangent_state = state_dict.get("tangent")
        if tangent_state is None:
            return
        if self.tangent is not None and self.tangent.dim == int(tangent_state["dim"]):
            self.tangent.load_state_dict(tangent_state)
        # Also kept for on_train_start, which rebuilds the tangent once the optimiser state is restored.
        self._pending_state = tangent_state
