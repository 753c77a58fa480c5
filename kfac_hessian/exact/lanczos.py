"""Extreme eigenpairs of a symmetric operator: block Lanczos with full reorthogonalization and locking.

One *run* builds a block Krylov basis (every new block orthogonalized twice against the whole basis and
against the locked vectors), with Rayleigh-Ritz on the block-tridiagonal projection. A Ritz pair has
converged when its residual ``‖A x − θ x‖ ≤ tol · max(|θ|, 10⁻⁶‖A‖)`` (``‖A‖`` estimated by the largest
Ritz value in magnitude), so every eigenvalue is accurate relative to itself, not only to ``‖A‖``. Converged
pairs are *locked*: the next run starts from a fresh random block orthogonal to them. Runs repeat until one
finds nothing above the current k-th eigenvalue, so eigenvalues of any multiplicity
come out with all their copies (a Krylov space of one start block holds at most ``block_size`` copies).
Small operators (``P ≤ dense_limit``) are formed densely and decomposed with ``eigh``.

The operator is a ``LinearOperator`` or anything with ``shape``, ``dtype``, ``device`` and ``op @ X`` for ``X`` of
shape ``(P, m)``; the result is itself a ``LinearOperator``: ``V diag(λ) Vᵀ`` of the pairs found.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..distributed import require_seed_for
from ..eigen import EigenPairs
from ..limits import LANCZOS_DENSE_LIMIT
from ..linear_operator import dense_by_products


@dataclass
class LanczosResult(EigenPairs):
    """Eigenvalues ``(k,)``, descending, and orthonormal eigenvectors ``(k, P)``, with how they were obtained.

    Unpacks as ``vals, vecs = lanczos(...)``. ``residuals[i] = ‖A x_i − θ_i x_i‖``. As a ``LinearOperator`` it is
    the part of the operator on the pairs found, ``V diag(λ) Vᵀ``; as an eigen result (``kfac_hessian.eigen``)
    ``topk(k)`` gives the leading ``k ≤`` found pairs of a ``which="largest"`` run.
    """

    residuals: Tensor
    converged: bool
    n_matvecs: int
    n_runs: int
    method: str
    notes: list[str] = field(default_factory=list)
    which: str = "largest"

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        if self.which != "largest":
            raise ValueError(f"this result holds the pairs of a which={self.which!r} run, not the leading ones: "
                             "topk needs lanczos(..., which='largest')")
        return super().topk(k)


def _orthogonalize(block: Tensor, bases: list[Tensor]) -> Tensor:
    for _ in range(2):  # twice is enough (Kahan-Parlett)
        for basis in bases:
            if basis.shape[1]:
                block = block - basis @ (basis.T @ block)
    return block


def _random_block(shape, generator, dtype, device, bases: list[Tensor]) -> Tensor:
    block = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return torch.linalg.qr(_orthogonalize(block, bases)).Q


def _fold(vectors: Tensor, b: int) -> Tensor:
    """``b`` start columns holding every given direction: column ``j`` of ``vectors`` is added into column ``j mod b``
    (a Krylov space of one vector that mixes the wanted eigenvectors holds all of them)."""
    if vectors.shape[1] <= b:
        return vectors
    padded = torch.cat([vectors, vectors.new_zeros(vectors.shape[0], -vectors.shape[1] % b)], dim=1)
    return padded.reshape(vectors.shape[0], -1, b).sum(1)


def _run(apply, n: int, block_size: int, max_dim: int, n_want: int, tol: float, locked: Tensor, generator,
         start: Tensor | None, norm: float = 0.0):
    """One block Lanczos run on the complement of ``locked`` from ``start`` (random when ``None``); ``norm``: the
    largest eigenvalue magnitude found so far (a run on a deflated operator judges its residuals against ``‖A‖``,
    not against what is left).

    Returns Ritz values (descending), Ritz vectors, residual norms, convergence flags and the matvec count.
    """
    dtype, device = locked.dtype, locked.device
    max_dim = min(max_dim, n - locked.shape[1])
    b = min(block_size, max_dim)
    basis = torch.zeros(n, max_dim + b, dtype=dtype, device=device)
    proj = torch.zeros(max_dim + b, max_dim + b, dtype=dtype, device=device)
    if start is None:
        basis[:, :b] = _random_block((n, b), generator, dtype, device, [locked])
    else:
        given = torch.linalg.qr(_orthogonalize(_fold(start, b), [locked])).Q
        basis[:, : given.shape[1]] = given
        if given.shape[1] < b:  # fewer start vectors than the block: random directions complete it
            basis[:, given.shape[1] : b] = _random_block((n, b - given.shape[1]), generator, dtype, device,
                                                         [locked, given])
    j, matvecs = 0, 0
    while True:
        current = basis[:, j : j + b]
        w = apply(current)
        matvecs += b
        # the projection column of this block against the whole basis, not only the three-term entries: fresh
        # vectors that replace a deficient block (below) couple to every earlier block
        coef = basis[:, : j + b].T @ w
        coef[j:] = 0.5 * (coef[j:] + coef[j:].T)
        proj[: j + b, j : j + b] = coef
        proj[j : j + b, : j + b] = coef.T
        w = _orthogonalize(w, [basis[:, : j + b], locked])
        j += b
        theta, y = torch.linalg.eigh(proj[:j, :j])
        theta, y = theta.flip(0), y.flip(1)
        q, r = torch.linalg.qr(w)
        residuals = torch.linalg.vector_norm(r @ y[j - b : j, :], dim=0)
        scale = theta.abs().max().clamp_min(max(norm, torch.finfo(dtype).tiny))
        # relative to each Ritz value (as ARPACK), floored so that eigenvalues near 0 can converge
        converged = residuals <= tol * theta.abs().clamp_min(1e-6 * scale)
        next_b = min(b, max_dim - j)
        if converged[:n_want].all() or next_b <= 0:
            return theta, basis[:, :j] @ y, residuals, converged, matvecs
        # a (nearly) invariant subspace: continue from fresh directions, decoupled from the basis
        deficient = r.diagonal().abs() <= 10 * torch.finfo(dtype).eps * scale
        if deficient.any():
            fresh = _random_block((n, int(deficient.sum())), generator, dtype, device,
                                  [basis[:, :j], locked, q[:, ~deficient]])
            q = q.clone()
            q[:, deficient] = fresh
            r = r.clone()
            r[deficient] = 0
        basis[:, j : j + next_b] = q[:, :next_b]
        b = next_b


def _largest(apply, n: int, k: int, tol: float, max_dim: int, block_size: int, max_runs: int, generator, dtype, device,
             start: Tensor | None = None):
    """Top-k eigenpairs by repeated runs: converged pairs are locked; a run that ran out of Krylov dimension
    is restarted from its unconverged wanted Ritz vectors (explicit restart), a finished one from random. The first
    run starts from ``start`` (columns) when given."""
    values = torch.zeros(0, dtype=dtype, device=device)
    vectors = torch.zeros(n, 0, dtype=dtype, device=device)
    residuals = torch.zeros(0, dtype=dtype, device=device)
    matvecs, runs, notes, finished = 0, 0, [], False
    while runs < max_runs and vectors.shape[1] < n:
        have = len(values)
        n_want = k - have if have < k else 1
        norm = float(values.abs().max()) if len(values) else 0.0
        theta, ritz, res, conv, used = _run(apply, n, block_size, max_dim, n_want, tol, vectors, generator, start, norm)
        matvecs, runs = matvecs + used, runs + 1
        threshold = values.topk(k).values[-1] if have >= k else -torch.inf
        accept = conv & (theta > threshold + res)  # above the k-th value by more than its own uncertainty
        values = torch.cat([values, theta[accept]])
        vectors = torch.cat([vectors, ritz[:, accept]], dim=1)
        residuals = torch.cat([residuals, res[accept]])
        pending = (~conv[:n_want]).nonzero().flatten()
        if len(pending):  # restart from what was not yet converged
            start = ritz[:, pending]
            continue
        start = None
        if not accept.any():  # a complete run found nothing above the k-th value: done
            finished = True
            break
    converged = finished or (len(values) >= k and vectors.shape[1] >= n)
    if not converged:
        notes.append(f"stopped after {runs} runs (max_runs={max_runs}, max_iter={max_dim}) with {len(values)} "
                     f"converged pairs of {k}")
    order = values.argsort(descending=True)[:k]
    return values[order], vectors[:, order], residuals[order], converged and len(values) >= k, matvecs, runs, notes


def lanczos(
    op,
    k: int,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int | None = None,
    block_size: int = 1,
    seed: int | None = None,
    dense_limit: int = LANCZOS_DENSE_LIMIT,
    max_runs: int | None = None,
    start: Tensor | None = None,
) -> LanczosResult:
    """The ``k`` extreme eigenpairs of a symmetric operator.

    Args:
        op: a ``LinearOperator`` (exact operator, block, …) or anything with ``shape``, ``dtype``, ``device``, ``@``.
        k: number of eigenpairs.
        which: ``"largest"``, ``"smallest"``, or ``"both"`` (``k − k//2`` largest and ``k//2`` smallest); the pairs
            come out descending whichever are asked for.
        tol: converged when ``‖A x − θ x‖ ≤ tol·max(|θ|, 10⁻⁶‖A‖)``; the eigenvalue error is at most the
            residual, and about ``residual²/gap`` where eigenvalues are separated.
        max_iter: largest Krylov dimension of one run (default ``max(4k + 40, 60)``, at most ``P``).
        block_size: vectors per block (one pass over the data applies the whole block).
        seed: seeds the random start blocks.
        dense_limit: at or below this ``P`` the operator is formed densely (``op @ I``) and ``eigh`` is used.
        max_runs: bound on the locking restarts (default ``2k + 4``).
        start: ``(m, P)`` vectors (rows, as ``topk`` returns them) for the first run's start block — a warm start,
            e.g. the exact eigenvectors at an earlier checkpoint, or the top Kronecker or EKFAC eigenvectors; with
            ``m > block_size`` vector ``j`` is added into start column ``j mod block_size`` (``which="largest"``
            only).

    A result that did not converge is returned with ``converged=False``, its residuals and notes, and a
    ``RuntimeWarning``.
    """
    n = op.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, {n}]")
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be ≥ 1, got {block_size}")
    require_seed_for(op, seed)
    dtype, device = op.dtype, op.device
    if start is not None:
        if which != "largest":
            raise ValueError("start= warm-starts the search for the largest eigenpairs (which='largest')")
        if start.dim() != 2 or start.shape[1] != n or not 1 <= start.shape[0] <= n:
            raise ValueError(f"start must be (m, {n}) row vectors with 1 ≤ m ≤ {n}, got {tuple(start.shape)}")
        start = start.to(device, dtype).T
    k_hi = {"largest": k, "smallest": 0, "both": k - k // 2}[which]
    k_lo = k - k_hi
    if n <= dense_limit:
        dense = dense_by_products(op)
        theta, vecs = torch.linalg.eigh(0.5 * (dense + dense.T))
        idx = torch.cat([torch.arange(n - 1, n - 1 - k_hi, -1), torch.arange(k_lo).flip(0)]).to(device)
        return LanczosResult(theta[idx], vecs[:, idx].T, torch.zeros(k, dtype=dtype, device=device), True, n, 1,
                             "dense", which=which)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    max_dim = min(n, max_iter if max_iter is not None else max(4 * k + 40, 60))
    max_runs = max_runs if max_runs is not None else 2 * k + 4
    parts = []
    for count, sign in ((k_hi, 1.0), (k_lo, -1.0)):
        if count:
            apply = (lambda x: op @ x) if sign > 0 else (lambda x: -(op @ x))
            parts.append((sign, _largest(apply, n, count, tol, max_dim, block_size, max_runs, generator, dtype, device,
                                         start if sign > 0 else None)))
    values = torch.cat([sign * p[0] for sign, p in parts])
    vectors = torch.cat([p[1] for _, p in parts], dim=1).T
    residuals = torch.cat([p[2] for _, p in parts])
    order = values.argsort(descending=True)
    values, vectors, residuals = values[order], vectors[order], residuals[order]
    converged = all(p[3] for _, p in parts)
    notes = [note for _, p in parts for note in p[6]]
    result = LanczosResult(
        values, vectors, residuals, converged, sum(p[4] for _, p in parts), sum(p[5] for _, p in parts),
        "block-lanczos", notes, which
    )
    if not converged:
        warnings.warn("lanczos did not converge: " + "; ".join(notes), RuntimeWarning, stacklevel=2)
    return result

