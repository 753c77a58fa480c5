"""Symmetric eigendecompositions of the small matrices every block reduces to, and spectral densities.

The matrices are PSD (sums of outer products): eigenvalues come out descending, negatives (round-off) clamped to
zero and reported (``ClampReport``); a failed float32 decomposition is retried in float64. Eigenvalues alone go,
on the CPU, through one tridiagonalization per matrix whose form is kept (``Tridiagonal``), so that the leading
eigenvectors can be had later for ``O(d²·m)`` instead of a full ``eigh``; independent matrices are tridiagonalized
concurrently, one LAPACK thread each (``_lapack``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from threadpoolctl import ThreadpoolController
from torch import Tensor

from . import _lapack


@dataclass
class ClampReport:
    """Negative eigenvalues of a PSD matrix set to zero (round-off): how many, and the most negative one."""

    count: int = 0
    most_negative: float = 0.0


def symmetric_eig(matrices: Tensor, vectors: bool) -> tuple[Tensor, Tensor | None, list[ClampReport]]:
    """Eigen-decompose a batch ``(B, d, d)`` of PSD matrices; eigenvalues descending, clamped at 0.

    A failed float32 decomposition is retried in float64 (result cast back). Negative eigenvalues are
    round-off here (the factors are sums of outer products), so they are clamped to 0 and reported.
    """
    if matrices.shape[-1] == 1:  # 1×1 blocks (diagonals): nothing to decompose
        values = matrices[..., 0]
        vecs = torch.ones_like(matrices) if vectors else None
        values, reports = _descending_clamped(values)
        return values, vecs, reports
    try:
        values, vecs = torch.linalg.eigh(matrices) if vectors else (torch.linalg.eigvalsh(matrices), None)
    except torch.linalg.LinAlgError:
        if matrices.dtype == torch.float64:
            raise
        values, vecs = (torch.linalg.eigh(matrices.double()) if vectors
                        else (torch.linalg.eigvalsh(matrices.double()), None))
        values = values.to(matrices.dtype)
        vecs = vecs.to(matrices.dtype) if vecs is not None else None
    values, reports = _descending_clamped(values)
    return values, vecs.flip(-1) if vecs is not None else None, reports


@dataclass
class Tridiagonal:
    """``Qᵀ M Q = T`` of a symmetric matrix ``M`` (LAPACK ``sytrd``, lower storage): ``T``'s diagonal and
    off-diagonal, and ``Q`` as Householder reflectors below the subdiagonal of ``reflectors`` with ``tau``.

    Kept by ``symmetric_eigvals`` so that the leading eigenvectors can be had later for ``O(d²·m)`` more
    (``leading_vectors``) instead of a full ``eigh``.
    """

    reflectors: Tensor
    tau: Tensor
    diagonal: np.ndarray
    off_diagonal: np.ndarray

    def leading_vectors(self, m: int) -> Tensor:
        """Eigenvectors of the ``m`` largest eigenvalues as columns ``(d, m)``, descending order."""
        n = len(self.diagonal)
        with _single_threaded_scipy_lapack():
            _, vectors = eigh_tridiagonal(self.diagonal, self.off_diagonal, select="i", select_range=(n - m, n - 1))
        leading = torch.from_numpy(vectors).flip(1).to(self.reflectors.dtype)
        # Q = diag(1, Q'), Q' the product of the reflectors stored as by a QR factorization of reflectors[1:, :-1]
        leading[1:] = torch.ormqr(self.reflectors[1:, :-1], self.tau, leading[1:])
        return leading


TRIDIAGONAL_MIN_SIZE = 32  # smaller matrices: torch's batched eigvalsh (a LAPACK call per tiny matrix costs more)
EIG_THREADS: int | None = None  # concurrent tridiagonalizations; None: torch.get_num_threads()


def symmetric_eigvals(batches: list[Tensor]) -> list[tuple[Tensor, list[ClampReport], list[Tridiagonal | None]]]:
    """Eigenvalues (descending, clamped at 0 as in ``symmetric_eig``) of batches ``(B, d, d)`` of PSD matrices of
    any sizes; per batch ``(values (B, d), reports, forms)``.

    On the CPU (float32/float64, one matrix of ``d ≥ TRIDIAGONAL_MIN_SIZE``) through one blocked tridiagonalization
    and ``sterf``, keeping the ``Tridiagonal`` form for later leading eigenvectors; these matrices run concurrently
    on ``EIG_THREADS`` threads (default ``torch.get_num_threads()``) with one LAPACK thread each (largest first).
    Everything else goes through torch's ``eigvalsh``, one batched call per size, and keeps no form. A float32 failure
    is retried in float64 (no form kept then).
    """
    results: list = [None] * len(batches)
    tridiagonal = [i for i, batch in enumerate(batches) if _tridiagonal_applies(batch)]
    others = [i for i in range(len(batches)) if i not in set(tridiagonal)]
    for i, (values, _, reports) in _batched_by_size(batches, others, vectors=False).items():
        results[i] = (values, reports, [None] * len(values))
    order = sorted(tridiagonal, key=lambda i: -batches[i].shape[-1])  # longest first: balanced threads
    with _single_threaded_scipy_lapack():
        decomposed = _map_concurrently(lambda i: _eigvals_with_form(batches[i][0]), order)
    for i, (values, form) in zip(order, decomposed):
        values, reports = _descending_clamped(values.unsqueeze(0))
        results[i] = (values, reports, [form])
    return results


def symmetric_eigs(batches: list[Tensor]) -> list[tuple[Tensor, Tensor, list[ClampReport]]]:
    """Eigenvalues and eigenvectors (``symmetric_eig(…, vectors=True)``) of batches ``(B, d, d)`` of PSD matrices of
    any sizes; per batch ``(values (B, d), vectors (B, d, d), reports)``.

    On the CPU (float32/float64, ``d ≥ TRIDIAGONAL_MIN_SIZE``) every matrix through LAPACK's ``syevd`` without the
    GIL, concurrently on ``EIG_THREADS`` threads with one LAPACK thread each (largest first), as the eigenvalues
    alone in ``symmetric_eigvals``; everything else through torch's ``eigh``, one batched call per size.
    """
    results: list = [None] * len(batches)
    on_lapack = [i for i, batch in enumerate(batches) if batch.device.type == "cpu"
                 and batch.dtype in (torch.float32, torch.float64) and batch.shape[-1] >= TRIDIAGONAL_MIN_SIZE]
    concurrent = [(i, b) for i in on_lapack for b in range(len(batches[i]))]
    others = [i for i in range(len(batches)) if i not in set(on_lapack)]
    for i, result in _batched_by_size(batches, others, vectors=True).items():
        results[i] = result
    order = sorted(concurrent, key=lambda item: -batches[item[0]].shape[-1])
    with _single_threaded_scipy_lapack():
        decomposed = dict(zip(order, _map_concurrently(lambda item: _syevd(batches[item[0]][item[1]]), order)))
    for i in sorted({i for i, _ in concurrent}):
        pairs = [decomposed[(i, b)] for b in range(len(batches[i]))]
        values, reports = _descending_clamped(torch.stack([values for values, _ in pairs]))
        results[i] = (values, torch.stack([vectors for _, vectors in pairs]).flip(-1), reports)
    return results


def _batched_by_size(batches: list[Tensor], indices: list[int], vectors: bool) -> dict[int, tuple]:
    """``symmetric_eig`` of ``batches[i]`` for each of ``indices``, equal sizes in one batched call (one kernel launch
    on a GPU); per index ``(values, vectors or None, reports)``."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault((batches[i].shape[-1], batches[i].device, batches[i].dtype), []).append(i)
    results = {}
    for members in groups.values():
        values, vecs, reports = symmetric_eig(torch.cat([batches[i] for i in members]), vectors=vectors)
        start = 0
        for i in members:
            part = slice(start, start + len(batches[i]))
            results[i] = (values[part], None if vecs is None else vecs[part], reports[part])
            start = part.stop
    return results


def _syevd(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Ascending eigenvalues and eigenvectors (columns) of one symmetric matrix; a float32 failure is retried in
    float64 (results cast back)."""
    values, vectors, info = _lapack.syevd(matrix.detach().contiguous().numpy())
    if info != 0:
        if matrix.dtype == torch.float64:
            raise torch.linalg.LinAlgError(f"syevd failed to converge (info={info})")
        values, vectors = _syevd(matrix.double())
        return values.to(matrix.dtype), vectors.to(matrix.dtype)
    return torch.from_numpy(values), torch.from_numpy(vectors)


def _tridiagonal_applies(batch: Tensor) -> bool:
    return (batch.device.type == "cpu" and batch.shape[0] == 1 and batch.dtype in (torch.float32, torch.float64)
            and batch.shape[-1] >= TRIDIAGONAL_MIN_SIZE)


def _map_concurrently(function: Callable, items: list) -> list:
    threads = min(EIG_THREADS or torch.get_num_threads(), len(items))
    if threads <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items))


def _eigvals_with_form(matrix: Tensor) -> tuple[Tensor, Tridiagonal | None]:
    try:
        return _tridiagonal_eigvals(matrix)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        return _tridiagonal_eigvals(matrix.double())[0].to(matrix.dtype), None


_THREADPOOLS = None


def _single_threaded_scipy_lapack():
    """scipy's OpenBLAS keeps its worker threads spinning after a call, and they then compete with torch's threads
    for the cores: on a 2-core machine a gradient pass right after a multithreaded ``sytrd`` measured markedly
    slower (a one-off check, not a repo benchmark). One OpenBLAS thread per LAPACK call avoids that, and
    concurrent calls share the cores instead (torch's MKL is not affected)."""
    global _THREADPOOLS
    if _THREADPOOLS is None:  # scanning the loaded libraries takes milliseconds: once per process
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS.limit(limits=1, user_api="blas")


def _tridiagonal_eigvals(matrix: Tensor) -> tuple[Tensor, Tridiagonal]:
    reflectors, diagonal, off_diagonal, tau, info = _lapack.sytrd(matrix.detach().contiguous().numpy())
    if info != 0:
        raise torch.linalg.LinAlgError(f"sytrd failed (info={info})")
    values, info = _lapack.sterf(diagonal, off_diagonal)
    if info != 0:
        raise torch.linalg.LinAlgError(f"sterf did not converge (info={info})")
    form = Tridiagonal(torch.from_numpy(reflectors), torch.from_numpy(tau), diagonal, off_diagonal)
    return torch.from_numpy(values), form


def _descending_clamped(values: Tensor) -> tuple[Tensor, list[ClampReport]]:
    """Ascending eigenvalues ``(B, d)`` → descending, negatives (round-off of PSD matrices) set to 0 and reported."""
    values = values.flip(-1)
    negative = values < 0
    reports = [
        ClampReport(int(n), float(v.min()) if n else 0.0) for n, v in zip(negative.sum(-1).tolist(), values)
    ]
    return values.clamp_min(0), reports


def eig_descending(matrix: Tensor) -> tuple[Tensor, Tensor, ClampReport]:
    """``symmetric_eig`` of one PSD matrix: eigenvalues descending (clamped at 0), eigenvectors as columns."""
    values, vectors, (report,) = symmetric_eig(matrix.unsqueeze(0), vectors=True)
    return values[0], vectors[0], report


@dataclass
class SpectralDensity:
    """Histogram of a spectrum: ``counts[b]`` eigenvalues in ``[edges[b], edges[b+1])``.

    With ``log=True`` the edges are in ``log10(eigenvalue)`` and the ``n_zero`` eigenvalues that are exactly
    zero (no logarithm) are counted apart, so ``counts.sum() + n_zero`` is the number of eigenvalues.
    """

    edges: Tensor
    counts: Tensor
    n_zero: int
    log: bool

    @property
    def centers(self) -> Tensor:
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    @property
    def density(self) -> Tensor:
        """Counts per unit of the (log-)eigenvalue axis: integrates to ``counts.sum()``."""
        return self.counts / (self.edges[1:] - self.edges[:-1])


def histogram(chunks: Callable[[], Iterator[Tensor]], extent: tuple[float, float] | None, n_zero: int, bins: int,
              log: bool, range: tuple[float, float] | None, device) -> SpectralDensity:
    """``SpectralDensity`` of the values that ``chunks()`` yields (already ``log10``-ed when ``log``; zeros left
    out and counted in ``n_zero``). ``range`` defaults to ``extent``, the values' exact extent (``None``: empty)."""
    if range is None:
        range = extent if extent is not None else (0.0, 1.0)
    lo, hi = range
    if hi <= lo:  # a single distinct eigenvalue: give it a bin of its own
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.zeros(bins, dtype=torch.float64, device=device)
    for values in chunks():
        counts += torch.histc(values.double(), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64, device=device)
    return SpectralDensity(edges, counts, n_zero, log)


def values_density(values: Tensor, bins: int, log: bool, range: tuple[float, float] | None,
                   chunk: int) -> SpectralDensity:
    """``SpectralDensity`` of explicitly given (non-negative) eigenvalues, in chunks of ``chunk``."""
    n_zero = 0
    if log:
        positive = values[values > 0]
        n_zero, values = values.numel() - positive.numel(), positive.log10()
    extent = (float(values.min()), float(values.max())) if values.numel() else None
    return histogram(lambda: iter(values.split(chunk)), extent, n_zero, bins, log, range, values.device)


def entropy(values: Tensor) -> float:
    """``−Σ p log p`` of ``p = values / Σ values`` over the positive values (0 for an all-zero spectrum)."""
    p = values[values > 0].double()
    if len(p) == 0:
        return 0.0
    p = p / p.sum()
    return float(-(p * p.log()).sum())

