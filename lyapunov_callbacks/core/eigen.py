"""Top Hessian eigenvalues from matrix-free solvers: the paper's Lyapunov iteration, power iteration and Lanczos."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lyapunov_callbacks.core import distributed as _dist
from lyapunov_callbacks.core.checks import (
    BadShapeError,
    NotAnIntegerError,
    UnknownChoiceError,
    check_choice,
    check_gap_safety,
    check_int,
    check_operator,
    check_positive,
    check_shape,
)
from lyapunov_callbacks.core.hessian import BACKENDS, HessianOperator, num_trainable_parameters
from lyapunov_callbacks.core.sharded import ShardedHessian, is_sharded
from lyapunov_callbacks.core.space import LOCAL, LocalSpace, local_tensor, space_of

__all__ = [
    "EigenResult",
    "LinearOperator",
    "MatrixOperator",
    "lanczos",
    "power_iteration",
    "lyapunov_iteration",
    "solve",
    "top_hessian_eigenvalues",
    "METHODS",
    "STARTS",
    "STOPPING",
]

METHODS = ("lanczos", "power", "lyapunov")
#: Stopping rules of :func:`lanczos`: the rigorous residual bound alone, or also the gap estimate.
STOPPING = ("residual", "gap")
#: Start vector of ``lanczos`` from a multi-column ``init``: its first column, or the top Ritz vector of its span.
STARTS = ("first", "rayleigh_ritz")
#: Safety factor of the ``stop="gap"`` rule: the estimated error ``residual²/gap`` must be below
#: ``tol·|θ|`` divided by this, so the rule still meets ``tol`` when the gap it sees is up to this many
#: times the true one (an eigenvalue the Krylov space has not resolved yet lies closer to θ).
_GAP_SAFETY = 10.0

# Lanczos breakdown: a residual norm below this fraction of the largest |Ritz value| means the
# Krylov space is (numerically) invariant, so its Ritz pairs are exact.
_BREAKDOWN_RTOL = 1e-10
# DGKS re-orthogonalisation: a second Gram-Schmidt pass is made only when the first one removed more
# than 30 % of the vector's norm (cancellation, so its rounding errors may not be negligible).
_DGKS_ETA = 0.7


class LinearOperator(Protocol):
    """What a solver sees: a symmetric ``[dim, dim]`` operator (e.g. :class:`HessianOperator`).

    Optionally an operator declares ``nonsmooth``, the submodules whose kinks make its products unreliable
    (:class:`~lyapunov_callbacks.core.hessian.FiniteDifferenceHessian` on a ReLU network): :func:`solve` then marks
    its results ``converged=False`` and warns. ``distributed`` / ``process_group`` say that its products are
    averaged over ranks, so that random starts are broadcast from rank 0.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    num_hvps: int

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` as a new tensor (the solvers update it in place; never return a cached buffer)."""
        ...

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V`` ``[dim, b]``, as a new tensor."""
        ...


@dataclass
class EigenResult:
    """Top-``k`` eigenpairs found by a solver.

    Attributes:
        eigenvalues: ``[k]``, in descending order.
        eigenvectors: ``[dim, k]`` with orthonormal columns, column ``i`` for ``eigenvalues[i]``.
        num_hvps: operator products (Hessian-vector products) this solve used.
        converged: whether the returned values meet the solver's stopping rule (each within ``tol``
            relative of an eigenvalue, by its residual) before the ``max_iter`` budget ran out, and
            nothing known makes them untrustworthy: never set on a value that may be a dominant
            negative eigenvalue standing in for the top one, nor for finite differences on a
            non-smooth model (see :class:`~lyapunov_callbacks.core.hessian.FiniteDifferenceHessian`).
        lyapunov_exponents: ``[k]`` growth rates ``log|1 + αh|`` per step of the tangent vectors
            (:func:`lyapunov_iteration` only, descending; ``None`` otherwise).
        ritz_values: ``[b]`` the top ``b`` Ritz values, descending, when :func:`lanczos` was asked for
            ``ritz_vectors=b > k`` (``None`` otherwise).
        ritz_vectors: ``[dim, b]`` their orthonormal Ritz vectors (``None`` otherwise).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    num_hvps: int
    converged: bool
    lyapunov_exponents: torch.Tensor | None = None
    ritz_values: torch.Tensor | None = None
    ritz_vectors: torch.Tensor | None = None


class MatrixOperator:
    """A dense symmetric matrix behind the solvers' operator interface (tests, small problems).

    Args:
        A: a square ``[dim, dim]`` tensor (assumed symmetric).

    Raises:
        ValueError: ``A`` is not a square 2-D floating-point tensor.

    Example::

        op = MatrixOperator(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)))
        lanczos(op, k=2).eigenvalues   # tensor([3., 2.])
    """

    def __init__(self, A: torch.Tensor) -> None:
        square = isinstance(A, torch.Tensor) and A.ndim == 2 and A.shape[0] == A.shape[1]
        if not square or not A.is_floating_point():
            raise ValueError("A must be a square 2-D floating-point tensor.")
        self.A = A
        self.dim = A.shape[0]
        self.dtype = A.dtype
        self.device = A.device
        self.num_hvps = 0
        self.distributed = False
        self.process_group = None

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.num_hvps += 1
        return self.A @ v.to(self.dtype)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_hvps += V.shape[1]
        return self.A @ V.to(self.dtype)


# ---------------------------------------------------------------------------- helpers


def _local_dim(model: nn.Module) -> int:
    """This rank's number of trainable entries (all of them on an unsharded model)."""
    return sum(local_tensor(p).numel() for p in model.parameters() if p.requires_grad)


def _global_dim(op: Any) -> int:
    """The dimension of the space (``op.dim`` is this rank's share of it when the space is sharded)."""
    return int(getattr(op, "global_dim", op.dim))


def _check_common(op: Any, k: int, tol: float, max_iter: int) -> None:
    check_operator(op)
    check_int("k", k, "k=1")
    dim = _global_dim(op)
    if k > dim:
        raise NotAnIntegerError(f"k={k} exceeds the operator dimension dim={dim}; use k <= {dim}.")
    check_positive("tol", tol, "tol=1e-4")
    check_int("max_iter", max_iter, f"max_iter=100 (it caps the number of HVPs, >= k={k})", minimum=k)


def _start_block(op: Any, cols: int, init: torch.Tensor | None, seed: int) -> torch.Tensor:
    """``[dim, cols]`` start block: ``init`` columns completed by seeded random ones, orthonormalised.

    Random columns come from a CPU ``torch.Generator`` seeded with ``seed`` (never the global RNG),
    so every rank draws the same vectors; under DDP the block is also broadcast from rank 0. Only the
    columns ``init`` does not provide are drawn, in the operator's dtype (a warm start of one vector
    draws nothing); further random columns are drawn only if ``init`` turns out rank-deficient.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    j = 0
    if init is not None:
        init, _ = _check_init(op, init)
        j = min(init.shape[1], cols)
    parts = [init[:, :j]] if j else []
    if j < cols:
        parts.append(_randn(op, cols - j, gen))
    block = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    block = _orthonormalize(block, lambda: _randn(op, cols, gen), space_of(op))
    if getattr(op, "distributed", False):
        _dist.broadcast_(block, getattr(op, "process_group", None))
    return block


def _combine(vectors: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """``Σ_i c_i v_i`` as a new contiguous vector, one fused pass per term (no ``[j, dim]`` stack)."""
    out = vectors[0] * coefficients[0]
    for v, c in zip(vectors[1:], coefficients[1:]):
        out.add_(v, alpha=c)
    return out


def _rayleigh_ritz_start(
    op: Any, init: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    """``(z, Hz, rest)``: the top Ritz vector of the span of ``init``'s columns (unit norm), its product, and
    ``rest(b)``, the span's next ``b`` Ritz pairs (values descending, vectors as ``[b, dim]`` rows), built only
    when asked for.

    The columns are orthonormalised by Gram–Schmidt (a rank-deficient one is replaced by a seeded random vector;
    columns orthonormal to 1e-3 are taken as they are), each multiplied by one ``matvec``, and the projected
    matrix ``BᵀHB`` (symmetric by construction from its upper triangle) solved in float64. Every vector stays a
    separate contiguous one: at dim 1.8M a ``[dim, j]`` layout or a stacked copy costs several ms per pass.
    """
    init, norms = _check_init(op, init)
    space = space_of(op)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    basis: list[torch.Tensor] = []
    for column, norm_in in zip(init.unbind(1)[: _global_dim(op)], norms):  # at most dim orthonormal vectors exist
        # Columns orthonormal to 1e-3 already (a warm start's Ritz vectors: ~1e-5 in float32 at dim 1.8M) are used
        # as they are, no copy: they only choose the start z, which is normalised exactly below. The norms are
        # the ones _check_init measured (no second pass over the columns).
        if abs(norm_in - 1.0) <= 1e-3 and all(abs(c) <= 1e-3 for c in space.dots(basis, column)):
            basis.append(column)
            continue
        v = column / norm_in  # a new vector; init is never written
        norm = _reorthogonalize_(v, basis, space=space) if basis else 1.0
        if not norm > 1e-8:  # rank-deficient: a seeded random direction instead (left out if that is too)
            v = _randn(op, 1, gen)[:, 0]
            v.div_(space.norm(v))
            norm = _reorthogonalize_(v, basis, passes=2, space=space) if basis else 1.0
            if not norm > 1e-8:
                continue
        basis.append(v.div_(norm) if norm != 1.0 else v)
    if getattr(op, "distributed", False):
        # Every rank starts from rank 0's vectors; copies, so that the caller's init is never written.
        basis = [v.clone() for v in basis]
        for v in basis:
            _dist.broadcast_(v, getattr(op, "process_group", None))
    products = [op.matvec(b) for b in basis]
    j = len(basis)
    projected = torch.zeros(j, j, dtype=torch.float64)
    for a in range(j):
        for b in range(a, j):
            projected[a, b] = projected[b, a] = space.dot(basis[a], products[b])
    values, vectors = torch.linalg.eigh(projected)
    values, coefficients = values.flip(0), vectors.flip(1).T.tolist()  # rows: Ritz coefficients, descending
    z = _combine(basis, coefficients[0])
    norm = space.norm(z)  # 1 up to the basis' orthonormality

    def rest(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [_combine(basis, c) for c in coefficients[1 : 1 + count]]
        vecs = torch.stack(rows) if rows else z.new_zeros(0, z.numel())
        return values[1 : 1 + count].to(device=op.device, dtype=op.dtype), vecs

    return z.div_(norm), _combine(products, coefficients[0]).div_(norm), rest


def _randn(op: Any, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``[dim, cols]`` standard normal numbers from the CPU generator ``gen``, on the operator's device (this rank's
    entries of them in a sharded space)."""
    dtype = op.dtype if op.dtype in (torch.float32, torch.float64) else torch.float32
    out = space_of(op).randn(op.dim, cols, gen, dtype)
    return out.to(device=op.device, dtype=op.dtype)


def _check_init(op: Any, init: Any) -> tuple[torch.Tensor, list[float]]:
    """``init`` as ``[dim, j]`` in the operator's dtype and device, and the norms of its columns (checked finite
    and non-zero)."""
    check_shape("init", init, op.dim, matrix=True)
    init = init.detach().to(device=op.device, dtype=op.dtype)
    if init.ndim == 1:
        init = init.unsqueeze(1)
    # One pass: a NaN/inf entry makes its column's norm non-finite. Only when a norm is non-finite
    # (which a huge finite column can also cause, by overflow) is the element-wise check needed.
    norms = space_of(op).column_norms(init)
    if bool((norms == 0).any()) or (not bool(torch.isfinite(norms).all()) and not bool(torch.isfinite(init).all())):
        raise BadShapeError("`init` must have finite, non-zero columns (e.g. the previous eigenvectors).")
    return init, norms.tolist()


def _orthonormalize(
    block: torch.Tensor, fallback: Callable[[], torch.Tensor], space: LocalSpace | None = None
) -> torch.Tensor:
    """Orthonormal columns spanning ``block``; rank-deficient columns are replaced from ``fallback()``.

    ``fallback`` (called only when a column is rank-deficient) returns a block of the same shape. ``space``: where the
    columns live (default: whole local vectors).
    """
    space = space or LOCAL
    if block.shape[1] == 1:  # a single column: QR is a normalisation (saves a Householder pass)
        norm = space.norm(block[:, 0])
        if norm > 0 and math.isfinite(norm):
            return block / norm
    q, r = space.qr(block)
    diag = r.diagonal().abs()
    scale = diag.max() if diag.numel() else torch.tensor(1.0)
    bad = diag <= 1e-8 * scale
    if bool(bad.any()):
        block = block.clone()
        block[:, bad] = fallback()[:, bad].to(block)
        q, r = space.qr(block)
    # Fix signs so the first column is the (normalised) first input column.
    signs = torch.sign(r.diagonal())
    signs[signs == 0] = 1
    return q * signs


def _result(op: Any, values: torch.Tensor, vectors: torch.Tensor, start_hvps: int, converged: bool) -> EigenResult:
    spent = op.num_hvps - start_hvps
    if values.numel() == 1:  # nothing to sort: no copy of the eigenvector
        return EigenResult(values.clone(), vectors, spent, bool(converged))
    order = torch.argsort(values, descending=True)
    return EigenResult(values[order].clone(), vectors[:, order].contiguous(), spent, bool(converged))


# ---------------------------------------------------------------------------- Lanczos


def _reorthogonalize_(
    w: torch.Tensor, basis: list[torch.Tensor], passes: int | None = None, space: LocalSpace | None = None
) -> float:
    r"""Remove from ``w`` (in place) its components along the orthonormal ``basis``; return ``‖w‖``.

    Classical Gram–Schmidt, ``w ← w − Σ_i (q_iᵀw) q_i`` (all coefficients from the same ``w``),
    repeated by the DGKS criterion (Daniel, Gragg, Kaufman & Stewart 1976): a pass that keeps at
    least ``_DGKS_ETA`` of ``w``'s norm leaves ``w`` orthogonal to working precision (its rounding
    errors are ``O(ε‖w‖)``), while one that cancels most of ``w`` is repeated once ("twice is
    enough", Kahan–Parlett). ``passes`` forces a number of passes instead.

    The norm before a pass is not measured: ``w`` splits into its part along the basis, of length
    ``sqrt(Σ c_i²)``, and the part left, so ``‖w_before‖² = ‖w_after‖² + Σ c_i²`` (one pass over ``w``
    fewer per call; it only decides whether a second pass runs). The coefficients are read in one
    transfer, not one per basis vector. ``space``: where the vectors live (default: whole local vectors).
    """
    space = space or LOCAL
    norm = 0.0
    for i in range(passes if passes is not None else 2):
        coefficients = space.dots(basis, w)
        for q, c in zip(basis, coefficients):
            w.sub_(q, alpha=c)
        norm = space.norm(w)
        if passes is None and (i == 1 or norm * norm >= _DGKS_ETA**2 * (norm * norm + math.fsum(
                c * c for c in coefficients))):
            break
    return norm


def lanczos(
    op: LinearOperator,
    k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 100,
    init: torch.Tensor | None = None,
    seed: int = 0,
    stop: str = "residual",
    gap_safety: float = _GAP_SAFETY,
    ritz_vectors: int = 0,
    start: str = "first",
    trace: list | None = None,
) -> EigenResult:
    r"""Top-``k`` (algebraically largest) eigenpairs by Lanczos with full re-orthogonalisation.

    Builds the Krylov basis :math:`Q_m` one HVP per iteration, re-orthogonalising each new vector
    against all previous ones (full re-orthogonalisation by classical Gram–Schmidt, with a second
    pass only when the first cancels more than 30 % of the vector's norm — the DGKS criterion —
    so the basis stays orthonormal to working precision; memory ``m·dim``), and takes Ritz pairs
    from ``torch.linalg.eigh`` of the tridiagonal :math:`T_m`. Besides the HVPs an iteration
    costs ``O(j·dim)`` (the Gram–Schmidt pass against the ``j`` basis vectors).

    Stopping rule: the free Ritz residual bound :math:`\lVert H y_i - \theta_i y_i\rVert =
    |\beta_m s_{m,i}|` (no extra HVP) is at most ``tol·|θ_i|`` for each of the top ``k`` Ritz
    values. It is checked after every HVP, the first included: from a good warm start ``v`` one HVP
    gives ``θ = vᵀHv`` and the residual ``‖Hv − θv‖``, and the solve stops there if it is small
    enough. For a symmetric ``H`` a Ritz pair with residual ``r`` has an eigenvalue within ``r`` of
    ``θ`` (so ``|θ − h| ≤ tol·|θ|``), and the error is usually of order ``(tol·θ)²/gap``. A breakdown
    (:math:`\beta_m \approx 0`, e.g. ``dim < max_iter``) means the Krylov space is invariant: its
    Ritz pairs are exact, but one Krylov space holds only one copy of each distinct eigenvalue, so
    when ``dim <= max_iter`` (or fewer than ``k`` Ritz values exist yet) the iteration continues
    from a seeded random vector orthogonal to the basis (finding repeated eigenvalues) until the
    whole space is spanned or the top ``k`` converge; otherwise it stops. Without a breakdown a
    repeated top eigenvalue is found once (a limitation of single-vector Lanczos; the block
    ``lyapunov`` and deflated ``power`` solvers resolve multiplicities).

    Gap rule (``stop="gap"``): a pair also stops when the error estimate ``r²/gap`` is at most
    ``tol·|θ_i| / gap_safety`` (default safety factor 10), ``r`` its residual bound and ``gap`` the
    distance from ``θ_i`` to the nearest other Ritz value's interval ``θ_l ± r_l`` (Kato–Temple: when no
    eigenvalue other than the one θ approximates lies within ``gap`` of θ, ``|θ − h| ≤ r²/gap``). Ritz
    values only approach the spectrum from inside, so an eigenvalue the Krylov space has not resolved
    yet can lie closer than the gap seen; a factor 10 covers a gap overestimated up to 10×. It is a
    rule for a moving mini-batch Hessian from a warm start, where it saves products (the residual falls
    only linearly while the error falls as its square); the rigorous residual rule is always checked
    too, and ``converged`` means either rule held. It needs two Ritz values (a second HVP).

    Warm start: ``init`` (``[dim]`` or ``[dim, j]``, e.g. the previous eigenvectors). For
    ``k == 1`` the first column is the start vector; for ``k > 1`` a seeded random combination of
    the first ``min(j, k)`` columns (plus a random vector when ``j < k``) so every wanted direction
    is present. From the previous top eigenvector after a small move of the problem, a few HVPs
    suffice.

    Rayleigh–Ritz start (``start="rayleigh_ritz"``, ``k == 1``, ``init`` of ``j >= 2`` columns, e.g. the last
    estimate's top two Ritz vectors): the start vector is the top Ritz vector ``z`` of the span of ``init``
    (``j`` HVPs and a ``j × j`` eigenproblem), and the first Lanczos product ``Hz`` is the
    same combination of those products, so the solve costs ``j − 1`` HVPs more than from one vector. When the
    top two eigenvalues swapped since ``init`` was computed, the new top eigenvector lies near the old second
    one: ``z`` holds every component of it that the span does, whereas a fixed combination of the columns can
    cancel it (their signs are arbitrary). ``max_iter`` counts Lanczos steps; ``num_hvps`` includes the ``j``.

    Args:
        op: the operator (``matvec``, ``dim``, ``dtype``, ``device``, ``num_hvps``).
        k: number of eigenpairs, ``1 <= k <= dim``.
        tol: relative Ritz residual tolerance (default ``1e-4``).
        max_iter: maximum number of HVPs (Lanczos steps), ``>= k``.
        init: optional warm start.
        seed: seed of the random start (CPU generator; the global RNG is never used).
        stop: ``"residual"`` (default: the rigorous residual bound) or ``"gap"`` (also the gap estimate
            above, fewer HVPs on a moving mini-batch Hessian).
        gap_safety: safety factor of the gap rule (default 10, ``>= 1``): the estimate ``r²/gap`` must be at
            most ``tol·|θ| / gap_safety``.
        ritz_vectors: also return the top ``ritz_vectors`` Ritz pairs of the final Krylov space (when more
            than ``k``) in :attr:`EigenResult.ritz_values` / :attr:`EigenResult.ritz_vectors`, descending,
            at no HVP cost: the subspace a warm start of the next solve can be built from (default 0:
            none). Fewer are returned when the Krylov space has fewer dimensions.
        start: ``"first"`` (default: see *Warm start*) or ``"rayleigh_ritz"`` (see *Rayleigh–Ritz start*).
        trace: a list to which every Lanczos step appends ``(num_hvps, ritz_values, residual_bounds)`` before its
            stopping test: the products so far, the Ritz values of ``T_m`` (ascending) and their residual bounds,
            as Python floats (what any stopping rule could read at that step; ``benchmarks/stopping_rules.py``).

    Returns:
        :class:`EigenResult`.

    Raises:
        ValueError: ``k``, ``tol``, ``max_iter``, ``stop``, ``gap_safety``, ``ritz_vectors``, ``start``, ``trace`` or
            ``init`` invalid (``start="rayleigh_ritz"`` needs ``k == 1``).

    Example::

        res = lanczos(HessianOperator(model, loss_fn, batch), k=3)
        h0 = res.eigenvalues[0]
    """
    _check_common(op, k, tol, max_iter)
    check_choice("stop", stop, STOPPING)
    _check_lanczos_extras(gap_safety, ritz_vectors)
    check_choice("start", start, STARTS)
    if trace is not None and not callable(getattr(trace, "append", None)):
        raise ValueError(f"trace must be a list (each step appends to it) or None; got {type(trace).__name__}.")
    if start == "rayleigh_ritz" and k != 1:
        raise ValueError(f"start='rayleigh_ritz' picks one start vector, for k=1; got k={k}. Use start='first'.")
    use_gap = stop == "gap"
    start_hvps = op.num_hvps
    space = space_of(op)
    n = op.dim  # the length of the vectors (this rank's entries in a sharded space)
    dim = _global_dim(op)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    first_product = None  # H q_0 when the start already computed it
    span_rest = None  # the Rayleigh-Ritz start's other Ritz pairs
    if start == "rayleigh_ritz" and isinstance(init, torch.Tensor) and init.ndim == 2 and init.shape[1] >= 2:
        q, first_product, span_rest = _rayleigh_ritz_start(op, init, seed)
    elif init is not None and k > 1:
        # Orthonormalised [first min(j, k) init columns | random columns], mixed with seeded
        # weights of one sign and comparable size so no wanted direction cancels out.
        block = _start_block(op, k, init, seed)
        weights = torch.rand(k, generator=gen, dtype=torch.float64).add_(0.5).to(op.device, op.dtype)
        q = block @ weights
        q = q / space.norm(q)
    else:
        q = _start_block(op, 1, init, seed)[:, 0]  # already unit-norm

    m_max = min(max_iter, dim)
    # The Krylov basis is a list of vectors: each new one is the operator's result turned, in place,
    # into q_{j+1}. No basis buffer is allocated (a large fresh buffer costs a page fault per 4 KiB on
    # first touch, more than a Gram-Schmidt pass) and nothing is ever copied.
    Q: list[torch.Tensor] = [q]
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}; 0 at a restart
    beta_prev = 0.0
    theta = torch.zeros(0, dtype=torch.float64)
    S = torch.zeros(0, 0, dtype=torch.float64)
    T_buffer = torch.zeros(min(m_max, 32), min(m_max, 32), dtype=torch.float64)  # grows by doubling
    converged = False
    for j in range(m_max):
        q = Q[j]
        if first_product is not None:  # the Rayleigh-Ritz start's combination: a fresh tensor, like matvec's
            w, first_product = first_product, None
        else:
            w = op.matvec(q)  # a new tensor (LinearOperator contract), updated in place below
        alpha = space.dot(q, w)
        w.sub_(q, alpha=alpha)
        if j > 0 and beta_prev != 0.0:
            w.sub_(Q[j - 1], alpha=beta_prev)
        beta = _reorthogonalize_(w, Q, space=space)
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            # A non-finite Hessian (e.g. a diverged loss) has no eigenvalues to report: return NaN,
            # not converged, rather than let the tridiagonal eigensolver raise mid-training.
            nan_values = torch.full((k,), math.nan, dtype=op.dtype, device=op.device)
            nan_vectors = torch.full((n, k), math.nan, dtype=op.dtype, device=op.device)
            return _result(op, nan_values, nan_vectors, start_hvps, False)
        alphas.append(alpha)
        if j == T_buffer.shape[0]:
            grown = torch.zeros(min(2 * j, m_max), min(2 * j, m_max), dtype=torch.float64)
            grown[:j, :j] = T_buffer
            T_buffer = grown
        # T_m is written into a float64 buffer one entry per coefficient; its leading block is eigh's input.
        T_buffer[j, j] = alpha
        if j > 0:
            T_buffer[j - 1, j] = T_buffer[j, j - 1] = betas[-1]
        theta, S = torch.linalg.eigh(T_buffer[: j + 1, : j + 1])  # ascending
        # The stopping tests on Python floats (the same float64 arithmetic, without a tensor op per scalar):
        # residual bounds of the Ritz pairs, |beta_j * last component of each Ritz vector|.
        ritz = theta.tolist()
        bounds = [abs(beta * s) for s in S[-1, :].tolist()]
        scale = max(abs(t) for t in ritz)
        if trace is not None:
            trace.append((op.num_hvps - start_hvps, ritz, bounds))
        breakdown = beta <= _BREAKDOWN_RTOL * max(scale, 1e-300)
        # Breakdown = invariant Krylov space, its Ritz pairs are exact. Stop if it is the whole
        # space, or if the problem is too large to explore the complement within the budget
        # (there a repeated top eigenvalue is missed anyway, see the docstring).
        if breakdown and (j + 1 == dim or (j + 1 >= k and m_max < dim)):
            converged = True
            break
        if j + 1 >= k and not breakdown:
            top = range(len(alphas) - k, len(alphas))
            ok = [bounds[i] <= tol * abs(ritz[i]) for i in top]
            if use_gap and not all(ok) and j >= 1:
                estimates = _gap_estimate(ritz, bounds, top)
                ok = [o or e <= (tol / gap_safety) * abs(ritz[i]) for o, e, i in zip(ok, estimates, top)]
            if all(ok):
                converged = True
                break
        if j + 1 == m_max:
            break
        if breakdown:
            # Invariant subspace: its Ritz pairs are exact, but a single Krylov space holds one copy
            # of each distinct eigenvalue, so further copies (multiplicities) can only be found in
            # the complement: restart there (T becomes block diagonal).
            r = space.randn(n, 1, gen, torch.float64)[:, 0].to(op.device, op.dtype)
            Q.append(r.div_(_reorthogonalize_(r, Q, passes=2, space=space)))
            betas.append(0.0)
            beta_prev = 0.0
        else:
            Q.append(w.div_(beta))
            betas.append(beta)
            beta_prev = beta
    S = S.to(device=op.device, dtype=op.dtype)
    m = len(alphas)
    top = slice(m - k, m)
    values = theta[top].to(device=op.device, dtype=op.dtype)
    if ritz_vectors <= k:
        vectors = torch.zeros(n, k, dtype=op.dtype, device=op.device)
        for i, q in enumerate(Q[:m]):  # Ritz vectors: Q_m S, one pass over the basis
            vectors.addr_(q, S[i, top])
        return _result(op, values, vectors, start_hvps, converged)
    # More Ritz pairs: accumulated as rows (contiguous writes; an outer product into [dim, b] columns is
    # strided and cost ~7 ms per basis vector at dim 1.8M), the top k of them being the eigenvectors.
    # Written in descending order of the Ritz values (theta ascends: its columns reversed), so no reordering
    # copy of the rows is needed after.
    wide = slice(m - max(k, min(ritz_vectors, m)), m)
    coefficients = S[:, wide].flip(1)
    rows = torch.zeros(wide.stop - wide.start, n, dtype=op.dtype, device=op.device)
    for i, q in enumerate(Q[:m]):
        rows.addr_(coefficients[i], q)
    ritz_values = theta[wide].flip(0).to(device=op.device, dtype=op.dtype)
    if m == 1 and span_rest is not None:
        # Stopped at the Rayleigh-Ritz start itself: the span's other Ritz pairs (orthogonal to z) are the
        # further pairs of the space explored, so a warm start built from these rows keeps its two directions.
        more_values, more_rows = span_rest(ritz_vectors - 1)
        ritz_values = torch.cat([ritz_values, more_values])
        rows = torch.cat([rows, more_rows])
    result = _result(op, values.flip(0), rows[:k].T, start_hvps, converged)  # values descending, like rows
    result.ritz_values = ritz_values
    result.ritz_vectors = rows.T
    return result


def _check_lanczos_extras(gap_safety: Any, ritz_vectors: Any) -> None:
    check_gap_safety(gap_safety)
    check_int("ritz_vectors", ritz_vectors, "ritz_vectors=0 (none beyond the top k)", minimum=0)


def _gap_estimate(theta: list[float], bounds: list[float], top: range) -> list[float]:
    """``r_i² / gap_i`` for the Ritz values ``theta[i]``, ``i`` in ``top`` (ascending ``theta``; ``inf`` where no
    gap is seen).

    ``gap_i``: the distance from ``θ_i`` to the nearest interval ``θ_l ± r_l`` of another Ritz value
    (each such interval holds an eigenvalue); ``inf`` when ``r_i`` is not below it (no separation).
    """
    out = []
    for i in top:
        gap = min((abs(theta[i] - theta[l]) - bounds[l] for l in range(len(theta)) if l != i), default=math.inf)
        r = bounds[i]
        out.append(r * r / gap if gap > r and math.isfinite(gap) else math.inf)
    return out


# ---------------------------------------------------------------------------- power iteration


#: A Ritz pair whose residual is below this fraction of |θ| has an eigenvalue of θ's sign within reach
#: (|λ - θ| <= residual), which is all power iteration needs to know to switch to a shifted operator.
_SIGN_RTOL = 1e-2


def power_iteration(
    op: LinearOperator,
    k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 100,
    init: torch.Tensor | None = None,
    seed: int = 0,
) -> EigenResult:
    r"""Top-``k`` eigenpairs by power iteration with deflation (PyHessian's baseline).

    ``v ← Hv/‖Hv‖``; the eigenvalue is the Rayleigh quotient :math:`\theta = v^\top H v`. For
    ``k > 1`` the ``i``-th pair iterates :math:`H - \sum_{j<i} \theta_j v_j v_j^\top` with ``v``
    kept orthogonal to the pairs already found. Plain power iteration converges to the eigenvalue
    of largest *magnitude*, at rate ``|h1/h0|`` per HVP; when that turns out to be negative (its
    residual below ``1e-2·|θ|`` fixes the sign), the pair is restarted on :math:`H + sI` with :math:`s = -\theta_{min}`, whose
    eigenvalues are all :math:`\ge 0`, so the returned values are the algebraically largest
    (PyHessian would return the negative one), at the slower rate :math:`(h_1+s)/(h_0+s)`.

    Stopping rule: the free residual :math:`\lVert Hv - \theta v\rVert \le tol\cdot\max(|\theta|, m)`
    (``Hv`` is computed anyway), ``m`` the largest ``|θ|`` seen in the solve (so a zero eigenvalue among
    the top ``k`` can converge); a negative ``θ`` found before the shift is never reported converged.
    ``max_iter`` caps the HVPs of the whole solve; each further pair keeps at least one HVP in reserve.

    Args:
        op: the operator.
        k: number of eigenpairs, ``1 <= k <= dim``.
        tol: relative residual tolerance (default ``1e-4``).
        max_iter: total HVP budget, ``>= k``.
        init: optional warm start ``[dim]`` or ``[dim, j]`` (column ``i`` starts pair ``i``).
        seed: seed of the random start (CPU generator).

    Returns:
        :class:`EigenResult`.

    Raises:
        ValueError: ``k``, ``tol``, ``max_iter`` or ``init`` invalid.

    Example::

        power_iteration(op, k=1, tol=1e-3).eigenvalues[0]
    """
    _check_common(op, k, tol, max_iter)
    start_hvps = op.num_hvps
    block = _start_block(op, k, init, seed)
    values: list[torch.Tensor] = []
    vectors: list[torch.Tensor] = []
    converged_all = True
    # Power iteration finds the eigenvalue of largest magnitude. When that is a negative one (a
    # Hessian away from a minimum), iterate H + shift·I with shift = -θ_min >= 0 instead: every
    # eigenvalue is then >= 0, so the dominant one is the algebraically largest, as wanted.
    shift = 0.0
    # Residuals are compared with tol times the largest |θ| seen (an estimate of ‖H‖), so that zero
    # eigenvalues among the top k can converge too.
    magnitude = 0.0
    for i in range(k):
        budget = max_iter - (op.num_hvps - start_hvps) - (k - i - 1)
        prev = torch.stack(vectors, dim=1) if vectors else None
        prev_vals = torch.stack(values) if values else None

        def deflate(x: torch.Tensor) -> torch.Tensor:
            return x if prev is None else x - prev @ (prev.T @ x)

        start = deflate(block[:, i])
        v = start / torch.linalg.vector_norm(start)
        theta = v.new_zeros(())
        vec = v
        converged = False
        for remaining in range(budget - 1, -1, -1):
            w = op.matvec(v)
            if prev is not None:
                w = w - prev @ (prev_vals * (prev.T @ v))
                w = deflate(w)
            theta = v @ w
            vec = v  # the vector θ is the Rayleigh quotient of (v moves on below)
            magnitude = max(magnitude, abs(float(theta)))
            residual = float(torch.linalg.vector_norm(torch.add(w, v, alpha=-float(theta))))
            # An eigenvalue lies within `residual` of θ, so below _SIGN_RTOL·|θ| its sign is certain.
            if float(theta) < 0 and shift == 0.0 and remaining > 0 and residual <= _SIGN_RTOL * abs(float(theta)):
                # v approximates the most negative eigenvector: restart this pair on H + shift·I
                # (shift >= -λ_min) from the start vector with v projected out.
                shift = -float(theta) + residual
                restart = deflate(start - v * (v @ start))
                v = restart / torch.linalg.vector_norm(restart)
                continue
            if float(torch.linalg.vector_norm(w)) == 0 or (
                # A negative θ before the shift may be a dominant negative eigenvalue, not the top one.
                residual <= tol * max(abs(float(theta)), magnitude) and (float(theta) >= 0 or shift != 0.0)
            ):
                converged = True
                break
            # Deflate after the shift too: in the shifted operator the found directions have eigenvalue
            # `shift`, so their rounding-level components in v would otherwise grow back.
            x = deflate(torch.add(w, v, alpha=shift)) if shift else w
            v = x / torch.linalg.vector_norm(x)
        converged_all &= converged
        values.append(theta.detach().clone())
        vectors.append(vec)
    return _result(op, torch.stack(values), torch.stack(vectors, dim=1), start_hvps, converged_all)


# ---------------------------------------------------------------------------- Lyapunov iteration


def lyapunov_iteration(
    op: LinearOperator,
    k: int = 1,
    alpha: float | None = None,
    tol: float = 1e-4,
    max_iter: int = 100,
    init: torch.Tensor | None = None,
    seed: int = 0,
) -> EigenResult:
    r"""Top-``k`` eigenvalues from tangent vectors under the gradient-ascent map (the paper's method).

    A tangent vector carried by the ascent map :math:`\theta \mapsto \theta + \alpha\nabla L` evolves as
    :math:`\delta \leftarrow (I + \alpha H)\delta`; its per-step growth
    :math:`\lambda = \log(\lVert\delta_{t+1}\rVert/\lVert\delta_t\rVert)` converges to the largest
    Lyapunov exponent :math:`\log|1+\alpha h|` over the eigenvalues ``h`` of ``H``. For ``k > 1`` a block
    of ``k`` tangent vectors is propagated and re-orthonormalised by QR every step (Benettin's
    algorithm for the Lyapunov spectrum), :math:`\lambda_i = \log|R_{ii}|`; these are returned in
    :attr:`EigenResult.lyapunov_exponents`. The error shrinks by
    :math:`(1+\alpha h_1)/(1+\alpha h_0)` per step.

    **Eigenvalues.** The returned ``eigenvalues`` are the Rayleigh–Ritz values of the tangent block
    (eigenvalues of :math:`\delta^\top H \delta`, from the products the map computes anyway) and
    ``eigenvectors`` the matching Ritz vectors, in descending order. At convergence
    :math:`h_i = (e^{\lambda_i}-1)/\alpha`, but the growth rate alone loses the sign of
    :math:`1+\alpha h`: when a negative eigenvalue dominates the map (:math:`h < -h_0 - 2/\alpha`)
    the growth formula returns a positive value that is no eigenvalue (2.65 for ``diag(1, −3, 0, …)``).
    So when a Ritz value ``θ < 0`` is pinned down (residual below ``1e-2·|θ|``), ``α`` is lowered to
    ``1/(|θ| + residual)``, which makes every factor :math:`1+\alpha h \ge 0` so the algebraically
    largest eigenvalues dominate, and the tangent vectors along the negative directions are
    restarted (``k = 1``: from the start vector with the negative direction projected out).

    Default ``alpha``: ``1/max_i|δ_iᵀHδ_i|`` from the first step's HVPs (reused, no extra cost),
    i.e. the inverse curvature the start vectors see, so the map is well scaled: from a random start
    this is about ``1/mean eigenvalue`` (large ``α``: near power-iteration speed) and from a warm
    start ``≈ 1/h0``.

    Stopping rule: every Ritz residual :math:`\lVert H y_i - \theta_i y_i\rVert \le tol\cdot\max(|\theta_i|, m)`
    (``Hδ`` is computed anyway; ``m`` the largest ``|θ|`` seen, so zero eigenvalues can converge), and no negative Ritz value is left that could be a dominant negative
    eigenvalue (``converged`` is never claimed on one). ``max_iter`` caps the HVPs (``k`` per step).

    Args:
        op: the operator.
        k: number of exponents / eigenvalues, ``1 <= k <= dim``.
        alpha: step of the ascent map (``> 0``); ``None`` = the default above.
        tol: relative residual tolerance (default ``1e-4``).
        max_iter: total HVP budget, ``>= k``.
        init: optional warm start ``[dim]`` or ``[dim, j]``.
        seed: seed of the random start (CPU generator).

    Returns:
        :class:`EigenResult` (Rayleigh–Ritz eigenvalues, growth rates in ``lyapunov_exponents``).

    Raises:
        ValueError: ``alpha`` not positive, or ``k``, ``tol``, ``max_iter``, ``init`` invalid.

    Example::

        lyapunov_iteration(op, k=1).eigenvalues[0]   # h0
    """
    _check_common(op, k, tol, max_iter)
    if alpha is not None:
        check_positive("alpha", alpha, "alpha=None (automatic)")
    start_hvps = op.num_hvps
    delta = _start_block(op, k, init, seed)
    if k == 1:  # one tangent vector: QR is a normalisation, done on flat vectors
        return _lyapunov_single(op, delta[:, 0], alpha, tol, steps=max_iter, start_hvps=start_hvps)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 2)
    steps = max_iter // k
    values = delta.new_full((k,), math.nan)
    vectors = delta
    lyap = delta.new_full((k,), math.nan)
    converged = False
    shifted = False
    magnitude = 0.0  # the largest |θ| seen: residuals are compared with tol times it (zero eigenvalues converge)
    for step in range(steps):
        W = op.matmat(delta)
        T = delta.T @ W
        if not bool(torch.isfinite(T).all()):
            return _nan_result(op, k, start_hvps)
        theta, Y = torch.linalg.eigh((T + T.T) / 2)  # Rayleigh-Ritz on the tangent block, ascending
        vectors = delta @ Y
        residual = torch.linalg.vector_norm(W @ Y - vectors * theta, dim=0)
        values = theta
        if alpha is None:
            scale = float(torch.diagonal(T).abs().max())
            alpha = 1.0 / scale if scale > 0 else 1.0
        negative = (theta < 0) & (residual <= _SIGN_RTOL * theta.abs())
        if not shifted and bool(negative.any()) and step + 1 < steps:
            # A negative eigenvalue is pinned down: make 1 + αh >= 0 for it, restart its directions.
            shifted = True
            i_min = int(torch.argmin(theta))
            alpha = min(alpha, 1.0 / (abs(float(theta[i_min])) + float(residual[i_min])))
            fresh = vectors.clone()
            fresh[:, negative] = _randn(op, int(negative.sum()), gen)
            delta = _orthonormalize(fresh, lambda: _randn(op, k, gen))
            continue
        magnitude = max(magnitude, float(theta.abs().max()))
        if bool((residual <= tol * theta.abs().clamp(min=magnitude)).all()) and (
            shifted or not bool((theta < 0).any())
        ):
            converged = True
            break
        M = delta + alpha * W
        Q, R = torch.linalg.qr(M)
        diag = R.diagonal()
        lyap = torch.log(diag.abs())  # log(||delta_{t+1}|| / ||delta_t||) per direction, ||delta_t|| = 1
        signs = torch.sign(diag)
        signs[signs == 0] = 1
        delta = Q * signs
    res = _result(op, values, vectors, start_hvps, converged)
    res.lyapunov_exponents = torch.sort(lyap, descending=True).values
    return res


def _nan_result(op: Any, k: int, start_hvps: int) -> EigenResult:
    """A non-finite Hessian (e.g. a diverged loss) has no eigenvalues: NaN, not converged."""
    nan_values = torch.full((k,), math.nan, dtype=op.dtype, device=op.device)
    nan_vectors = torch.full((op.dim, k), math.nan, dtype=op.dtype, device=op.device)
    return _result(op, nan_values, nan_vectors, start_hvps, False)


def _lyapunov_single(
    op: Any, delta: torch.Tensor, alpha: float | None, tol: float, steps: int, start_hvps: int
) -> EigenResult:
    """:func:`lyapunov_iteration` for ``k == 1`` (the same arithmetic, the QR of one column as a norm)."""
    value = delta.new_full((1,), math.nan)
    vector = delta
    lyap = math.nan
    start = delta
    converged = False
    shifted = False
    magnitude = 0.0
    for step in range(steps):
        w = op.matvec(delta)
        rayleigh = float(delta @ w)
        if not math.isfinite(rayleigh):
            return _nan_result(op, 1, start_hvps)
        residual = float(torch.linalg.vector_norm(torch.add(w, delta, alpha=-rayleigh)))
        value = delta.new_full((1,), rayleigh)
        vector = delta
        if alpha is None:
            alpha = 1.0 / abs(rayleigh) if rayleigh != 0 else 1.0
        if rayleigh < 0 and not shifted and step + 1 < steps and residual <= _SIGN_RTOL * abs(rayleigh):
            # δ approximates the eigenvector of a dominant negative eigenvalue: lower α so that
            # 1 + αh >= 0 for it and restart from the start vector with that direction projected out.
            shifted = True
            alpha = min(alpha, 1.0 / (abs(rayleigh) + residual))
            restart = start - delta * (delta @ start)
            norm = torch.linalg.vector_norm(restart)
            if float(norm) > 0:
                delta = restart / norm
            continue
        magnitude = max(magnitude, abs(rayleigh))
        if residual <= tol * magnitude and (shifted or rayleigh >= 0):
            converged = True
            break
        m = torch.add(delta, w, alpha=alpha)
        growth = torch.linalg.vector_norm(m)
        lyap = float(torch.log(growth))  # log(||delta_{t+1}|| / ||delta_t||) with ||delta_t|| = 1
        delta = m.div_(growth) if float(growth) > 0 else m
    res = _result(op, value, vector.unsqueeze(1), start_hvps, converged)
    res.lyapunov_exponents = delta.new_full((1,), lyap)
    return res


# ---------------------------------------------------------------------------- model-level entry point


def top_hessian_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    k: int = 1,
    method: str = "lanczos",
    hvp: str = "autograd",
    tol: float = 1e-4,
    max_iter: int = 100,
    init: torch.Tensor | None = None,
    *,
    alpha: float | None = None,
    seed: int = 0,
    process_group: Any = None,
    dtype: torch.dtype | None = None,
    stop: str = "residual",
    gap_safety: float = _GAP_SAFETY,
    ritz_vectors: int = 0,
    start: str = "first",
) -> EigenResult:
    """Top-``k`` eigenpairs of the Hessian of ``loss_fn(model, batch)``, leaving the model untouched.

    Builds a :class:`~lyapunov_callbacks.core.hessian.HessianOperator` (see it for the side-effect
    guarantees, dropout / BatchNorm handling and the DDP average), runs the chosen solver and
    releases the autograd graph. A model sharded with FSDP2 (``fully_shard``) gets a
    :class:`~lyapunov_callbacks.core.sharded.ShardedHessian` instead (central differences of the strategy's
    gradients; ``init`` and the eigenvectors are then this rank's entries; Lanczos only); call it on every rank.

    Args:
        model: the module; its trainable parameters define the Hessian.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batch: the batch given to ``loss_fn``.
        k: number of eigenpairs (``1 <= k <= number of trainable parameters``), default ``1``.
        method: ``"lanczos"`` (default), ``"power"`` or ``"lyapunov"`` (the paper's growth-rate method).
        hvp: ``"autograd"`` (exact, default) or ``"finite_difference"``.
        tol: relative Ritz residual tolerance, default ``1e-4``.
        max_iter: HVP budget, ``>= k``, default ``100``.
        init: warm start ``[dim]`` or ``[dim, j]`` (e.g. the last result's ``eigenvectors``).
        alpha: ascent-map step for ``method="lyapunov"`` (``None`` = automatic).
        seed: seed of the random start vector (the global RNG is not used).
        process_group: DDP group to average the Hessian over (used when ``torch.distributed`` is
            initialised); ``None`` = the default group.
        dtype: computation dtype (``None``: the parameters' dtype, float32 for half-precision
            parameters); ``init`` is cast to it.
        stop: stopping rule of ``method="lanczos"``: ``"residual"`` (default) or ``"gap"`` (see
            :func:`lanczos`); the other methods take only ``"residual"``.
        gap_safety: safety factor of ``stop="gap"`` (default 10; see :func:`lanczos`).
        ritz_vectors: ``method="lanczos"``: also return the top ``ritz_vectors`` Ritz pairs (see
            :func:`lanczos`); ignored by the other methods (their ``eigenvectors`` are all they have).
        start: ``method="lanczos"``: ``"first"`` (default) or ``"rayleigh_ritz"`` (``k=1``: start from the top
            Ritz vector of the span of ``init``'s columns; see :func:`lanczos`).

    Returns:
        :class:`EigenResult`: ``eigenvalues`` ``[k]`` descending (``eigenvalues[0]`` is ``h0``),
        ``eigenvectors`` ``[dim, k]``, ``num_hvps``, ``converged``.

    Raises:
        ValueError: unknown ``method`` / ``hvp``; ``k``, ``tol``, ``max_iter``, ``init`` or
            ``alpha`` invalid (the message names the parameter).

    Example::

        res = top_hessian_eigenvalues(model, lambda m, b: m.training_loss(b), batch, k=3)
        h0 = float(res.eigenvalues[0])
        res = top_hessian_eigenvalues(model, loss_fn, next_batch, init=res.eigenvectors[:, 0])
    """
    check_choice("method", method, METHODS)
    check_choice("hvp", hvp, BACKENDS)
    check_choice("stop", stop, STOPPING)
    if stop != "residual" and method != "lanczos":
        raise UnknownChoiceError(
            f"stop={stop!r} is a rule of method='lanczos' (got method={method!r}); use stop='residual'."
        )
    _check_lanczos_extras(gap_safety, ritz_vectors)
    check_choice("start", start, STARTS)
    if start != "first" and method != "lanczos":
        raise UnknownChoiceError(
            f"start={start!r} is a start of method='lanczos' (got method={method!r}); use start='first'."
        )
    check_int("k", k, "k=1")
    dim = num_trainable_parameters(model)
    if k > dim:
        raise NotAnIntegerError(f"k={k} exceeds the number of trainable parameters ({dim}); use k <= {dim}.")
    check_positive("tol", tol, "tol=1e-4")
    check_int("max_iter", max_iter, f"max_iter=100 (it caps the number of HVPs, >= k={k})", minimum=k)
    if alpha is not None:
        if method != "lyapunov":
            raise UnknownChoiceError(
                f"`alpha`={alpha!r} is only used by method='lyapunov' (got method={method!r}); leave it None."
            )
        check_positive("alpha", alpha, "alpha=None (automatic)")
    sharded = is_sharded(model)
    if init is not None:  # sharded: this rank's entries of the vectors
        check_shape("init", init, _local_dim(model) if sharded else dim, matrix=True)
    if sharded:  # FSDP2 shards: central differences of the strategy's gradients, whatever `hvp` says
        if dtype is not None:
            raise UnknownChoiceError(
                f"dtype={dtype} on sharded parameters: products are taken in the parameters' dtype; use dtype=None."
            )
        operator: Any = ShardedHessian(model, loss_fn, batch)
    else:
        # snapshot=False: the operator lives only inside this call, where nothing else can write the parameters.
        operator = HessianOperator(
            model, loss_fn, batch, backend=hvp, process_group=process_group, dtype=dtype, snapshot=False
        )
    with operator as op:
        return solve(op, method, k=k, tol=tol, max_iter=max_iter, init=init, seed=seed, alpha=alpha, stop=stop,
                     gap_safety=gap_safety, ritz_vectors=ritz_vectors, start=start)


def solve(
    op: LinearOperator,
    method: str = "lanczos",
    *,
    k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 100,
    init: torch.Tensor | None = None,
    seed: int = 0,
    alpha: float | None = None,
    stop: str = "residual",
    gap_safety: float = _GAP_SAFETY,
    ritz_vectors: int = 0,
    start: str = "first",
) -> EigenResult:
    """Top-``k`` eigenpairs of ``op`` by ``method``: the one place a method name becomes a solver call.

    ``init`` is cast to the operator's dtype and device. An operator that declares ``nonsmooth`` modules
    (:class:`~lyapunov_callbacks.core.hessian.FiniteDifferenceHessian` on a model with kinks) gets its result
    marked ``converged=False`` with a warning: forward differences across kinks measure jumps, not curvature, so
    the residual cannot vouch for the eigenvalue. Arguments as :func:`top_hessian_eigenvalues`; ``stop``,
    ``gap_safety``, ``ritz_vectors`` and ``start`` are Lanczos's, ``alpha`` the Lyapunov iteration's.
    """
    check_choice("method", method, METHODS)
    if method != "lanczos" and space_of(op).sharded:
        raise UnknownChoiceError(
            f"method={method!r} on sharded parameters: only method='lanczos' takes its inner products over the "
            "shards. Use method='lanczos' (the default)."
        )
    if init is not None:
        init = init.to(device=op.device, dtype=op.dtype)
    if method == "lanczos":
        res = lanczos(op, k=k, tol=tol, max_iter=max_iter, init=init, seed=seed, stop=stop,
                      gap_safety=gap_safety, ritz_vectors=ritz_vectors, start=start)
    elif method == "power":
        res = power_iteration(op, k=k, tol=tol, max_iter=max_iter, init=init, seed=seed)
    else:
        res = lyapunov_iteration(op, k=k, alpha=alpha, tol=tol, max_iter=max_iter, init=init, seed=seed)
    nonsmooth = getattr(op, "nonsmooth", ())  # optional: the operators that declare it (see LinearOperator)
    if nonsmooth:
        res.converged = False
        warnings.warn(
            f"hvp='finite_difference' on a non-smooth model ({', '.join(nonsmooth[:3])}"
            f"{', ...' if len(nonsmooth) > 3 else ''}): finite-difference steps cross the kinks, so the "
            "eigenvalues can be far from the Hessian's and are reported "
            "converged=False. Use hvp='autograd', or a smooth activation (GELU, SiLU).",
            stacklevel=3,
        )
    return res
