"""Warm-started eigen estimates of a moving operator: the top eigenpairs of the Hessian at successive weights."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from lyapunov_callbacks.core import distributed as _dist
from lyapunov_callbacks.core.checks import check_choice, check_gap_safety
from lyapunov_callbacks.core.eigen import METHODS, EigenResult, LinearOperator, solve
from lyapunov_callbacks.core.space import space_of

__all__ = ["EigenTracker"]


class EigenTracker:
    """Top-``k`` eigenpairs of one operator after another, each estimate started from the last eigenvectors.

    Each :meth:`estimate` solves the operator it is given (a
    :class:`~lyapunov_callbacks.core.hessian.HessianOperator`, a
    :class:`~lyapunov_callbacks.core.preconditioned.PreconditionedOperator`, any operator with ``matvec``) by
    ``method`` through :func:`~lyapunov_callbacks.core.eigen.solve`, with ``init`` set to the eigenvectors of the
    last good estimate: the top eigenvector turns slowly during training, so a few products suffice where a cold
    start needs tens. The tracker owns the three decisions every caller would otherwise repeat: which solver and
    stopping rule, which start, and what a bad estimate does — an estimate with a non-finite eigenvalue or
    eigenvector is returned (the caller logs it, and a learning-rate rule rejects it) but never becomes the warm
    start, with one warning.

    Args:
        method: eigen-solver: ``"lanczos"``, ``"power"`` or ``"lyapunov"``.
        k: number of top eigenpairs.
        tol: relative convergence tolerance of each estimate (``estimate(tol=...)`` overrides it once).
        max_iter: HVP cap of each estimate (``estimate(max_iter=...)`` overrides it once).
        seed: seed of the solver's random start vector (used while there is no warm start).
        warm_start: reuse the last eigenvectors as ``init``.
        stop: stopping rule of ``method="lanczos"`` once warm-started: ``"gap"`` (default: the rigorous residual
            bound or the error estimate ``residual²/gap`` with a ``gap_safety`` factor, see
            :func:`~lyapunov_callbacks.core.eigen.lanczos`; fewer HVPs on a moving mini-batch Hessian) or
            ``"residual"``. The first (cold) estimate always uses the residual rule: from a random start the
            second Ritz value is far from h1, so the gap it shows means little.
        gap_safety: safety factor of the gap rule (default 10, see :func:`~lyapunov_callbacks.core.eigen.lanczos`).
        two_vector_start: ``k = 1`` with ``method="lanczos"``: keep the last estimate's top two Ritz vectors
            ``y0, y1`` and start the next solve from the top Ritz vector of their span (``start="rayleigh_ritz"``:
            one HVP more than a start from ``y0``; default False: ``y0`` alone). When h0 and h1 swap between two
            estimates, the new top eigenvector lies near ``y1``; from ``y0`` alone the Krylov space can miss it
            for many products and the solve stops on h1. A fixed combination ``y0 + 0.3·y1`` put the direction
            in the start but could cancel it, the signs of ``y0`` and ``y1`` being arbitrary: at one step of the
            README MLP in ``benchmarks/monitor_overhead.py`` the solve from it stopped on h1, 7.1e-2 low
            (``tests/core/test_gap_stopping.py`` builds an exactly cancelling case).

    Example::

        tracker = EigenTracker(k=1, tol=1e-2)
        for batch in batches:
            with HessianOperator(model, loss_fn, batch) as H:
                h0 = float(tracker.estimate(H).eigenvalues[0])
            ...  # an optimiser step
    """

    def __init__(
        self,
        method: str = "lanczos",
        k: int = 1,
        tol: float = 1e-3,
        max_iter: int = 100,
        seed: int = 0,
        warm_start: bool = True,
        stop: str = "gap",
        gap_safety: float = 10.0,
        two_vector_start: bool = False,
    ) -> None:
        check_choice("method", method, METHODS)
        check_choice("stop", stop, ("residual", "gap"))
        if not isinstance(two_vector_start, bool):
            raise ValueError(f"`two_vector_start` must be True or False, got {two_vector_start!r}.")
        check_gap_safety(gap_safety)
        self.method = method
        self.k = k
        self.tol = tol
        self.max_iter = max_iter
        self.seed = seed
        self.warm_start = warm_start
        self.stop = stop
        self.gap_safety = float(gap_safety)
        self.two_vector_start = two_vector_start
        self._warned = False
        self.reset()

    def reset(self) -> None:
        """Forget every estimate: the next one starts cold."""
        self.eigenvectors: torch.Tensor | None = None
        self.eigenvalues: torch.Tensor | None = None
        # The last estimate's top two Ritz vectors [dim, 2] (``two_vector_start``): the next warm start.
        self.start_basis: torch.Tensor | None = None
        self.num_estimates = 0
        self.total_hvps = 0

    def estimate(
        self,
        op: LinearOperator,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
        alpha: float | None = None,
    ) -> EigenResult:
        """One (warm-started) estimate of the top-``k`` eigenpairs of ``op``.

        Args:
            op: the operator at the current weights (nothing of the model is changed).
            tol: this estimate's tolerance (``None``: :attr:`tol`).
            max_iter: this estimate's HVP cap, at least 1 (``None``: :attr:`max_iter`).
            alpha: step of the ascent map of ``method="lyapunov"`` (``None``: the solver's automatic choice ≈ 1/h0
                from a warm start); ignored by the other methods.
        """
        init = self.start_vectors()
        if init is not None and init.shape[0] != op.dim:
            # Vectors of another length: a checkpoint's warm start restored on another rank of a sharded run
            # (each rank holds its own shards' entries). Start cold rather than fail.
            init = None
        stop = self.stop if (self.method == "lanczos" and init is not None) else "residual"
        with torch.enable_grad():  # a finite-difference product differentiates the loss again
            result = solve(
                op, self.method, k=self.k, tol=self.tol if tol is None else tol,
                max_iter=self.max_iter if max_iter is None else max(1, max_iter), init=init, seed=self.seed,
                alpha=alpha if self.method == "lyapunov" else None, stop=stop, gap_safety=self.gap_safety,
                ritz_vectors=2 if self._mixed_start else 0,
                start="rayleigh_ritz" if self._mixed_start else "first",
            )
        self.num_estimates += 1
        self.total_hvps += int(result.num_hvps)
        # The eigenvectors have unit columns, so their sum (|sum| <= k·sqrt(dim), no overflow) is finite
        # exactly when every entry is: one reduction instead of an element-wise mask of dim·k entries.
        if bool(torch.isfinite(result.eigenvalues).all()) and math.isfinite(float(result.eigenvectors.sum())):
            self._keep(result)
        elif not self._warned and _dist.rank() == 0:
            self._warned = True
            warnings.warn(
                "Non-finite Hessian eigenvalue estimate; keeping the previous eigenvectors as warm start "
                "(further ones are not warned about).",
                RuntimeWarning,
                stacklevel=2,
            )
        return result

    def _keep(self, result: EigenResult) -> None:
        self.eigenvalues = result.eigenvalues.detach().clone()
        if self._mixed_start:
            # The solver's fresh Ritz rows are kept as they are (a copy would be one more pass and a fresh
            # allocation of 2·dim): the returned result's vectors are then views of the next warm start,
            # which callers read but never write.
            if result.ritz_vectors is not None:
                self.start_basis = result.ritz_vectors.detach()
            else:
                self.start_basis = result.eigenvectors.detach().clone()
            # The top Ritz vectors lead the basis: a view of it, not a second (strided) copy.
            self.eigenvectors = self.start_basis[:, : self.k]
        else:
            self.eigenvectors = result.eigenvectors.detach().clone()

    @property
    def _mixed_start(self) -> bool:
        """Whether warm starts use the last two Ritz vectors (``k = 1``, Lanczos, ``two_vector_start``)."""
        return self.method == "lanczos" and self.k == 1 and self.two_vector_start

    def start_vectors(self) -> torch.Tensor | None:
        """The ``init`` of the next estimate: ``None`` (cold), the last eigenvectors, or ``[y0, y1]`` (the
        last top two Ritz vectors, ``two_vector_start``; the solve starts from the top Ritz vector of their span)."""
        if not self.warm_start or self.eigenvectors is None:
            return None
        basis = self.start_basis
        if self._mixed_start and basis is not None and basis.shape[1] > 1:
            return basis
        return self.eigenvectors

    def rayleigh_quotient(self, op: LinearOperator) -> float | None:
        """:math:`v^\\top A v / v^\\top v` of the last top eigenvector ``v`` (one product of ``op``), or ``None``
        before the first good estimate: how far the top eigenvalue moved since, for one HVP."""
        if self.eigenvectors is None:
            return None
        v = self.eigenvectors[:, 0].to(device=op.device, dtype=op.dtype)
        if v.shape[0] != op.dim:  # a warm start of another rank's shards (see estimate)
            return None
        space = space_of(op)
        value = space.dot(v, op.matvec(v)) / space.dot(v, v)
        self.total_hvps += 1
        return value

    def state_dict(self) -> dict[str, Any]:
        """Warm-start vectors/values (on CPU) and counters."""
        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {
            "eigenvectors": cpu(self.eigenvectors),
            "eigenvalues": cpu(self.eigenvalues),
            "start_basis": cpu(self.start_basis),
            "num_estimates": self.num_estimates,
            "total_hvps": self.total_hvps,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restore :meth:`state_dict`; tensors go to ``device`` (the module's device) when given."""
        def put(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device) if device is not None else t.clone()

        self.eigenvectors = put(state.get("eigenvectors"))
        self.eigenvalues = put(state.get("eigenvalues"))
        self.start_basis = put(state.get("start_basis"))
        self.num_estimates = int(state.get("num_estimates", 0))
        self.total_hvps = int(state.get("total_hvps", 0))
