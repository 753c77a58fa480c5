"""Spectra of ``G ⊗ A`` from the eigendecompositions of the two small factors, never forming the product.

With ``A = U diag(λ) Uᵀ`` and ``G = V diag(μ) Vᵀ`` (both PSD), ``G ⊗ A`` has the ``P = d_out·width``
eigenvalues ``μ_j λ_i`` with eigenvectors ``v_j ⊗ u_i`` (the rank-one matrix ``v_j u_iᵀ`` in weight shape).
The top-k products need only the pairs with ``i·j ≤ k`` (1-based ranks in the two descending lists).
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .layout import BlockLayout


@dataclass
class ClampReport:
    """Negative eigenvalues of a PSD factor set to zero (round-off): how many, and the most negative one."""

    count: int = 0
    most_negative: float = 0.0


def symmetric_eig(matrices: Tensor, vectors: bool) -> tuple[Tensor, Tensor | None, list[ClampReport]]:
    """Eigen-decompose a batch ``(B, d, d)`` of PSD matrices; eigenvalues descending, clamped at 0.

    A failed float32 decomposition is retried in float64 (result cast back). Negative eigenvalues are
    round-off here (the factors are sums of outer products), so they are clamped to 0 and reported.
    """
    try:
        values, vecs = torch.linalg.eigh(matrices) if vectors else (torch.linalg.eigvalsh(matrices), None)
    except torch.linalg.LinAlgError:
        if matrices.dtype == torch.float64:
            raise
        values, vecs = torch.linalg.eigh(matrices.double()) if vectors else (torch.linalg.eigvalsh(matrices.double()), None)
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
        from scipy.linalg import eigh_tridiagonal

        n = len(self.diagonal)
        with _single_threaded_scipy_lapack():
            _, vectors = eigh_tridiagonal(self.diagonal, self.off_diagonal, select="i", select_range=(n - m, n - 1))
        leading = torch.from_numpy(vectors).flip(1).to(self.reflectors.dtype)
        # Q = diag(1, Q'), Q' the product of the reflectors stored as by a QR factorization of reflectors[1:, :-1]
        leading[1:] = torch.ormqr(self.reflectors[1:, :-1], self.tau, leading[1:])
        return leading


def symmetric_eigvals(matrices: Tensor) -> tuple[Tensor, list[ClampReport], list[Tridiagonal | None]]:
    """Eigenvalues (descending, clamped at 0 as in ``symmetric_eig``) of a batch ``(B, d, d)`` of PSD matrices.

    On the CPU (float32/float64, ``d ≥ 3``) through one blocked tridiagonalization and ``sterf`` per matrix
    (LAPACK via scipy, one thread: about as fast as torch's ``eigvalsh`` on this project's machine, ``docs/performance.md``),
    keeping the ``Tridiagonal`` form for later leading eigenvectors; elsewhere ``eigvalsh`` and no form. A float32 failure
    is retried in float64 (no form kept then).
    """
    if matrices.device.type != "cpu" or matrices.dtype not in (torch.float32, torch.float64) or matrices.shape[-1] < 3:
        values, _, reports = symmetric_eig(matrices, vectors=False)
        return values, reports, [None] * len(matrices)
    values, forms = [], []
    with _single_threaded_scipy_lapack():
        for matrix in matrices:
            try:
                value, form = _tridiagonal_eigvals(matrix)
            except torch.linalg.LinAlgError:
                if matrix.dtype == torch.float64:
                    raise
                value, form = _tridiagonal_eigvals(matrix.double())[0].to(matrix.dtype), None
            values.append(value)
            forms.append(form)
    values, reports = _descending_clamped(torch.stack(values))
    return values, reports, forms


_THREADPOOLS = None


def _single_threaded_scipy_lapack():
    """scipy's OpenBLAS keeps its worker threads spinning after a call, and they then compete with torch's threads
    for the cores: on this project's 2-core machine a gradient pass right after a multithreaded ``sytrd`` ran
    markedly slower (a one-off check, not a repo benchmark). One OpenBLAS thread for our LAPACK calls avoids that (torch's MKL is not affected)."""
    global _THREADPOOLS
    if _THREADPOOLS is None:  # scanning the loaded libraries takes milliseconds: once per process
        from threadpoolctl import ThreadpoolController

        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS.limit(limits=1, user_api="blas")


def _tridiagonal_eigvals(matrix: Tensor) -> tuple[Tensor, Tridiagonal]:
    from scipy.linalg import lapack

    prefix = "s" if matrix.dtype == torch.float32 else "d"
    n = matrix.shape[-1]
    lwork = int(getattr(lapack, f"{prefix}sytrd_lwork")(n, lower=1)[0])
    # a symmetric matrix is its own transpose: the C-ordered array read as Fortran-ordered is the same matrix
    reduced, diagonal, off_diagonal, tau, info = getattr(lapack, f"{prefix}sytrd")(
        matrix.detach().contiguous().numpy().T, lower=1, lwork=lwork)
    if info != 0:
        raise torch.linalg.LinAlgError(f"{prefix}sytrd failed (info={info})")
    values, info = getattr(lapack, f"{prefix}sterf")(diagonal, off_diagonal)
    if info != 0:
        raise torch.linalg.LinAlgError(f"{prefix}sterf did not converge (info={info})")
    form = Tridiagonal(torch.from_numpy(reduced), torch.from_numpy(tau), diagonal, off_diagonal)
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


class KroneckerEigen:
    """Eigen-structure of one layer's ``G ⊗ A``.

    Eigenvalues of both factors are always present; eigenvectors are computed on first use (``eigvalsh``
    is several times cheaper than ``eigh``) from ``A`` and ``G``, unless they were given (``A``/``G`` may then
    be ``None``).
    """

    def __init__(
        self,
        layout: BlockLayout,
        A: Tensor | None,
        G: Tensor | None,
        a_values: Tensor,
        g_values: Tensor,
        a_vectors: Tensor | None = None,
        g_vectors: Tensor | None = None,
        clamped: dict[str, ClampReport] | None = None,
        forms: dict[str, Tridiagonal | None] | None = None,
    ):
        self.layout = layout
        self._A, self._G = A, G
        self.a_values, self.g_values = a_values, g_values
        self._a_vectors, self._g_vectors = a_vectors, g_vectors
        self.clamped = clamped or {}
        self._forms = forms or {}
        self._leading: dict[str, Tensor] = {}

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def a_vectors(self) -> Tensor:
        """Eigenvectors of ``A`` as columns, matching ``a_values`` (descending)."""
        if self._a_vectors is None:
            self.a_values, self._a_vectors, self.clamped["A"] = eig_descending(self._A)
        return self._a_vectors

    @property
    def g_vectors(self) -> Tensor:
        """Eigenvectors of ``G`` as columns, matching ``g_values`` (descending)."""
        if self._g_vectors is None:
            self.g_values, self._g_vectors, self.clamped["G"] = eig_descending(self._G)
        return self._g_vectors

    def eigenvalues(self) -> Tensor:
        """All ``P`` eigenvalues ``μ_j λ_i``, descending (``P`` numbers: for huge layers use ``density``)."""
        return torch.outer(self.g_values, self.a_values).flatten().sort(descending=True).values

    def trace(self) -> Tensor:
        """``tr(G ⊗ A) = tr(A)·tr(G)``."""
        return self.a_values.sum() * self.g_values.sum()

    def _top_index_pairs(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        n_a, n_g = len(self.a_values), len(self.g_values)
        if not 1 <= k <= n_a * n_g:
            raise ValueError(f"k={k} must lie in [1, {n_a * n_g}] (the number of eigenvalues)")
        # a product of 1-based ranks (i, j) in the top k satisfies i·j ≤ k
        ii, jj = [], []
        for i in range(1, min(k, n_a) + 1):
            j_max = min(k // i, n_g)
            ii.append(np.full(j_max, i - 1))
            jj.append(np.arange(j_max))
        device = self.a_values.device
        i_idx = torch.as_tensor(np.concatenate(ii), device=device)
        j_idx = torch.as_tensor(np.concatenate(jj), device=device)
        products = self.g_values[j_idx] * self.a_values[i_idx]
        top = products.topk(k).indices
        order = products[top].argsort(descending=True, stable=True)
        top = top[order]
        return products[top], j_idx[top], i_idx[top]

    def top_eigenvalues(self, k: int) -> Tensor:
        """The ``k`` largest eigenvalues, descending, from the ``i·j ≤ k`` candidate products (no eigenvectors)."""
        return self._top_index_pairs(k)[0]

    def top_pairs(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k eigenpairs as rank-one factors: ``(values (k,), g_vecs (k, d_out), a_vecs (k, width))``.

        Eigenvector ``n`` reshaped to the augmented weight ``[W b]`` is ``outer(g_vecs[n], a_vecs[n])``.
        """
        values, j_idx, i_idx = self._top_index_pairs(k)
        g_vectors = self._leading_vectors("G", int(j_idx.max()) + 1)
        a_vectors = self._leading_vectors("A", int(i_idx.max()) + 1)
        return values, g_vectors[:, j_idx].T, a_vectors[:, i_idx].T

    def _leading_vectors(self, which: str, m: int) -> Tensor:
        """At least the ``m`` leading eigenvectors of ``A`` or ``G`` (columns, descending): all of them when they
        are known; else, when the eigenvalues came with a ``Tridiagonal`` form, only the leading ones."""
        known = self._a_vectors if which == "A" else self._g_vectors
        form = self._forms.get(which)
        if known is not None or form is None:
            return self.a_vectors if which == "A" else self.g_vectors
        if which not in self._leading or self._leading[which].shape[1] < m:
            self._leading[which] = form.leading_vectors(m).to(self.a_values.device)
        return self._leading[which]

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues (descending) and orthonormal eigenvectors ``(k, P)`` in public parameter order."""
        values, g_vecs, a_vecs = self.top_pairs(k)
        return values, self.layout.rank_one_vectors(g_vecs, a_vecs)

    def density(self, bins: int = 100, log: bool = True, range: tuple[float, float] | None = None, chunk: int = 2**22) -> SpectralDensity:
        """Histogram of all ``P`` eigenvalues, streamed in chunks of about ``chunk`` products (bounded memory).

        ``log=True`` bins ``log10`` of the positive eigenvalues and counts zeros apart; ``range`` is in the
        binned variable (defaults to the exact extent of the spectrum).
        """
        a, g = self.a_values, self.g_values.to(self.a_values.dtype)
        if log:
            a_pos, g_pos = a[a > 0], g[g > 0]
            n_zero = self.num_params - len(a_pos) * len(g_pos)
            a_t, g_t = a_pos.log10(), g_pos.log10()
            combine = torch.add
        else:
            n_zero, a_t, g_t, combine = 0, a, g, torch.mul
        if range is None:
            if len(a_t) == 0:
                range = (0.0, 1.0)
            else:
                corners = combine(torch.stack([g_t.min(), g_t.max()])[:, None], torch.stack([a_t.min(), a_t.max()])[None, :])
                range = (float(corners.min()), float(corners.max()))
        lo, hi = range
        if hi <= lo:  # a single distinct eigenvalue: give it a bin of its own
            lo, hi = lo - 0.5, hi + 0.5
        counts = torch.zeros(bins, dtype=torch.float64, device=a.device)
        rows = max(1, chunk // max(1, len(a_t)))
        # the argument ``range`` shadows the builtin
        for start in builtins.range(0, len(g_t), rows):
            values = combine(g_t[start : start + rows, None], a_t[None, :]).flatten()
            counts += torch.histc(values.double(), bins=bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64, device=a.device)
        return SpectralDensity(edges, counts, n_zero, log)

