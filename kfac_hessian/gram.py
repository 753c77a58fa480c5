"""Running sums of outer products ``Σ x xᵀ`` — the covariance products every factor is made of.

A factor sum is symmetric, so only its upper block triangle is accumulated (``add_gram``) and the lower part is
mirrored once at the end (``symmetrize_``). Rows arrive as ``(…, d)`` tensors and are multiplied feature-major
(``feature_major``). While fewer rows than ``d`` have arrived, a sum may keep them instead (``KeptColumns``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def feature_major(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``(..., d)`` rows as a ``(d, R)`` matrix. Convolution rows are transposed views of ``(…, d, T)`` tensors:
    copying them feature-major moves contiguous runs of ``T``, where a row-major copy would gather single
    elements (several times slower)."""
    d = rows.shape[-1]
    matrix = rows.reshape(-1, d).T if rows.stride(-1) == 1 else rows.movedim(-1, 0).reshape(d, -1)
    return matrix.to(dtype)


def add_gram(target: Tensor, columns: Tensor) -> None:
    """``target += X Xᵀ`` for ``columns = X`` ``(groups·d, R)`` feature-major, ``target`` ``(d, d)`` or, for
    ``groups > 1``, ``(groups, d, d)`` (group ``g`` = features ``g·d … (g+1)·d − 1``).

    One group: on the upper block triangle only (``symmetrize_`` completes it once at the end). torch has no
    symmetric rank-k update (``syrk``); strips of rows against the columns from their diagonal on do
    ``(b + 1)/(2b)`` of a full product's work with ``b`` strips (4 strips: 62.5 %), with strips of at least 256
    rows so that each GEMM stays efficient (``benchmarks/symmetric_accumulation.py`` measures it). Several groups
    (grouped convolutions: many small blocks): one batched product.
    """
    if target.dim() == 3:
        grouped = columns.reshape(target.shape[0], target.shape[1], -1)
        target.baddbmm_(grouped, grouped.transpose(1, 2))
        return
    d = columns.shape[0]
    strips = max(1, min(4, d // 256))
    edges = [round(i * d / strips) for i in range(strips + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        target[lo:hi, lo:].addmm_(columns[lo:hi], columns[lo:].T)


def symmetrize_(matrix: Tensor, block: int = 256) -> Tensor:
    """Mirror the upper triangle of ``matrix`` (``(d, d)``; a batch ``(B, d, d)`` is already full) onto its lower
    part, in place, and return it.

    Block by block, so that no temporary is larger than ``block × block``: the factors are the largest tensors
    alive at the end of ``compute_kfac``, and a whole-matrix ``triu() + triu(1).mT`` would triple them.
    """
    if matrix.dim() == 3:
        return matrix
    d = matrix.shape[0]
    for lo in range(0, d, block):
        hi = min(lo + block, d)
        diagonal = matrix[lo:hi, lo:hi]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
        matrix[hi:, lo:hi] = matrix[lo:hi, hi:].mT
    return matrix


class KeptColumns:
    """The columns ``X`` ``(d, R)`` of a sum ``Σ X Xᵀ`` kept as they came while there are fewer than ``d`` of them
    (``full`` once ``R ≥ d``): below that the columns are the smaller form of the sum (``R·d`` entries instead of
    ``d²``), and replaying ``chunks`` through ``add_gram`` in order gives the dense sum exactly as accumulating them
    one by one would have."""

    def __init__(self, d: int):
        self.d = d
        self.chunks: list[Tensor] = []
        self.count = 0
        self._matrix: Tensor | None = None

    @property
    def full(self) -> bool:
        return self.count >= self.d

    def add(self, columns: Tensor) -> None:
        """Keep ``columns`` ``(d, R_batch)`` (copied with their strides: they may be views of the model's tensors,
        and the same layout makes a later replay through ``add_gram`` bit-identical to the direct sum)."""
        self.chunks.append(columns.clone())
        self.count += columns.shape[1]
        self._matrix = None

    def matrix(self) -> Tensor:
        """All kept columns ``(d, R)``."""
        if self._matrix is None:
            self._matrix = self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks, dim=1)
        return self._matrix


class FrequentDirections:
    """A streamed sketch ``B`` ``(< ℓ … 2ℓ, d)`` of rows ``U`` ``(R, d)`` with ``0 ⪯ UᵀU − BᵀB ⪯ shrinkage · I`` and
    ``shrinkage ≤ (‖U‖_F² − ‖B‖_F²)/ℓ ≤ ‖U‖_F²/ℓ`` (Frequent Directions: Liberty, KDD 2013; Ghashami et al., SIAM J.
    Comput. 2016).

    Rows are buffered up to ``2ℓ``; a full buffer ``M`` is shrunk through its Gram matrix ``M Mᵀ = Q diag(σ²) Qᵀ``:
    with ``δ`` its ``ℓ``-th largest ``σ²``, ``M`` becomes the ``ℓ − 1`` rows ``diag(√(σ²−δ)/σ) Qᵀ M``. Each shrink
    removes a PSD matrix of norm ``δ`` from ``BᵀB`` and at least ``ℓ·δ`` from ``‖B‖_F²``, hence both bounds;
    ``shrinkage`` is the tally ``Σ δ``, the certified bound of this sketch. Same interface as ``KeptColumns``."""

    full = False  # a sketch never turns into the dense sum

    def __init__(self, columns: Tensor, ell: int):
        if ell < 2:
            raise ValueError(f"a sketch needs ℓ ≥ 2 rows, got {ell}")
        self.d, self.ell = columns.shape[0], ell
        self._rows = columns.new_zeros(0, self.d)
        self.count, self.shrinkage = 0, 0.0
        self.add(columns)

    def add(self, columns: Tensor) -> None:
        """Rows given as columns ``(d, R)``, ``ℓ`` at a time."""
        for start in range(0, columns.shape[1], self.ell):
            self._rows = torch.cat([self._rows, columns[:, start : start + self.ell].T.to(self._rows.dtype)])
            if self._rows.shape[0] >= 2 * self.ell:
                self._shrink()
        self.count += columns.shape[1]

    def _shrink(self) -> None:
        squares, vectors = torch.linalg.eigh(self._rows @ self._rows.T)  # ascending
        squares, vectors = squares.flip(0), vectors.flip(1)
        delta = squares[self.ell - 1].clamp_min(0)
        keep = squares[: self.ell - 1] > delta
        weights = ((squares[: self.ell - 1] - delta).clamp_min(0) / squares[: self.ell - 1].clamp_min(
            torch.finfo(squares.dtype).tiny)).sqrt()
        self._rows = (weights[keep, None] * vectors[:, : self.ell - 1][:, keep].T) @ self._rows
        self.shrinkage += float(delta)

    def matrix(self) -> Tensor:
        """The sketch's rows as columns ``(d, r)``, ``r < 2ℓ``."""
        return self._rows.T
