"""A Kronecker factor kept as its rows while they are fewer than its width.

A factor is a scaled sum of outer products, ``F = scale · Σ_n u_n u_nᵀ = scale · UᵀU`` with the rows ``U`` ``(r, w)``
(``G``: ``scale`` the reduction scale of the curvature, ``docs/conventions.md`` §4; ``A``: ``1/rows``, the bias entry 1
appended to every row). While ``r < w`` the rows are smaller than the ``(w, w)`` matrix and everything a block needs
comes from them: products ``F x = scale · Uᵀ(U x)`` in ``O(r·w)``, ``tr F = scale · ‖U‖_F²``, and the spectrum through
the rows' Gram matrix ``K = scale · U Uᵀ`` ``(r, r)``: ``K = Q diag(λ) Qᵀ`` gives ``F``'s nonzero eigenvalues ``λ`` with
eigenvectors ``v = √scale · Uᵀ q / √λ``; the other ``w − r`` eigenvalues are zero (kept as a count: the spectrum is
padded with zeros, never with vectors).

A factor whose rows are too many to keep and too wide to be dense may instead hold a Frequent Directions sketch
``B`` of them (``gram.FrequentDirections``): then it is ``F̃ = scale · BᵀB`` with ``0 ⪯ F − F̃ ⪯ ε·I``, ``ε`` the
certified bound it carries (``sketch``), and everything above holds for ``F̃``.

The zero eigenspace is the orthogonal complement of the kept basis ``span(v)``. Where a consumer asks for more vectors
than ``F`` has nonzero eigenvalues (EKFAC needs a whole eigenbasis), the complement is filled with a fixed orthonormal
basis of it (seeded Gaussian columns projected off the kept basis twice, then QR): any orthonormal basis of the zero
eigenspace is an eigenbasis, and a fixed one makes the result reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..limits import DENSE_LIMIT


class RowFactor:
    """``F = scale · UᵀU`` kept as ``rows`` ``U`` ``(r, w)`` (module docstring). ``shape`` is ``F``'s, ``(w, w)``.
    ``sketch = (rows seen, ε)`` when ``U`` is a Frequent Directions sketch of more rows, with ``0 ⪯ F − F̃ ⪯ ε·I``."""

    def __init__(self, rows: Tensor, scale: float, sketch: tuple[int, float] | None = None):
        if rows.dim() != 2:
            raise ValueError(f"rows must be a matrix (r, w), got shape {tuple(rows.shape)}")
        self.rows, self.scale = rows, float(scale)
        self.sketch = None if sketch is None else (int(sketch[0]), float(sketch[1]))

    def __repr__(self) -> str:
        return f"RowFactor({self.describe()})"

    @property
    def width(self) -> int:
        return self.rows.shape[1]

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.width, self.width)

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def describe(self) -> str:
        if self.sketch is None:
            return f"{self.num_rows} rows of width {self.width}"
        seen, bound = self.sketch
        return (f"{self.num_rows} rows of width {self.width} sketching {seen} (Frequent Directions, "
                f"0 ⪯ F − sketch ⪯ {bound:.3g}·I)")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RowFactor:
        return RowFactor(self.rows.to(device, dtype), self.scale, self.sketch)

    def left(self, x: Tensor) -> Tensor:
        """``F @ x`` over ``x``'s second-to-last axis ``(…, w, m)``: ``scale · Uᵀ(U x)``."""
        return self.rows.T @ (self.rows @ x) * self.scale

    def right(self, x: Tensor) -> Tensor:
        """``x @ F`` over ``x``'s last axis ``(…, m, w)``: ``scale · (x Uᵀ) U``."""
        return (x @ self.rows.T) @ self.rows * self.scale

    def trace(self) -> Tensor:
        return self.rows.square().sum() * self.scale

    def gram(self, dtype: torch.dtype | None = None) -> Tensor:
        """``K = scale · U Uᵀ`` ``(r, r)``: the nonzero spectrum of ``F``."""
        rows = self.rows if dtype is None else self.rows.to(dtype)
        return rows @ rows.T * self.scale

    def dense(self) -> Tensor:
        """``F`` as a ``(w, w)`` matrix (refused above ``limits.DENSE_LIMIT``: use products or the eigenpairs)."""
        if self.width > DENSE_LIMIT:
            raise ValueError(f"{self!r}: a dense {self.width}² factor is refused above {DENSE_LIMIT}; use its "
                             "products, its eigenvalues (eig()) or its leading eigenvectors (topk)")
        return self.rows.T @ self.rows * self.scale

    def padded_values(self, gram_values: Tensor) -> Tensor:
        """``F``'s ``w`` eigenvalues, descending, from the Gram matrix's ``(…, r)``: the ``w − r`` zeros appended."""
        zeros = gram_values.new_zeros(*gram_values.shape[:-1], self.width - gram_values.shape[-1])
        return torch.cat([gram_values, zeros], dim=-1)

    def vectors(self, gram_values: Tensor, gram_vectors: Tensor, m: int) -> Tensor:
        """The ``m`` leading eigenvectors of ``F`` as columns ``(w, m)`` from ``K``'s eigenvalues ``(r,)``, descending,
        and at least its leading ``min(m, r)`` eigenvectors ``(r, ≥ min(m, r))``: lifted where ``λ`` is above
        round-off (``λ > r·ε·λ₁``, below it ``Uᵀ q / √λ`` is round-off itself), from the complement of the lifted basis
        beyond (module docstring). The lifted columns are re-orthonormalized (QR, signs kept): where ``K``'s
        eigenvalues are close, their lifts are orthonormal only to ``ε·λ₁/λ``."""
        if m * self.width > DENSE_LIMIT**2:
            raise ValueError(f"{self!r}: {m} eigenvectors of width {self.width} are refused above {DENSE_LIMIT}² "
                             f"entries (only {self.num_rows} eigenvalues are nonzero; the others span the complement "
                             "of the rows). Ask for fewer (topk), or leave this layer out (layers=) of methods that "
                             "need a whole eigenbasis (EKFAC)")
        top = float(gram_values[0]) if len(gram_values) else 0.0
        tolerance = top * self.num_rows * torch.finfo(gram_values.dtype).eps
        kept = int((gram_values[: min(m, self.num_rows)] > tolerance).sum())
        rows = self.rows.to(gram_vectors.dtype)
        lifted = rows.T @ gram_vectors[:, :kept] * (self.scale / gram_values[:kept]).sqrt()
        orthonormal, triangular = torch.linalg.qr(lifted)
        lifted = orthonormal * triangular.diagonal().sign()
        if kept == m:
            return lifted
        return torch.cat([lifted, self.complement(lifted, m - kept)], dim=1)

    def complement(self, basis: Tensor, n: int) -> Tensor:
        """``n`` orthonormal columns ``(w, n)`` orthogonal to the orthonormal columns of ``basis`` (the lifted
        eigenvectors): a fixed basis (seed 0) of ``F``'s zero eigenspace."""
        if basis.shape[1] + n > self.width:
            raise ValueError(f"{self!r} has {self.width} eigenvectors; {basis.shape[1] + n} were asked for")
        generator = torch.Generator(device=basis.device).manual_seed(0)
        columns = torch.randn(self.width, n, generator=generator, dtype=basis.dtype, device=basis.device)
        for _ in range(2):  # projecting twice keeps the complement orthogonal to working precision
            columns = columns - basis @ (basis.T @ columns)
        return torch.linalg.qr(columns)[0]

    def state(self, key: str) -> dict:
        sketch = {} if self.sketch is None else {f"{key}_sketch": list(self.sketch)}
        return {key: self.rows, f"{key}_row_scale": self.scale, **sketch}

    @classmethod
    def from_state(cls, state: dict, key: str) -> Tensor | RowFactor:
        """The factor saved under ``key`` by ``state`` (or a plain dense/diagonal tensor saved as it is)."""
        scale = state.get(f"{key}_row_scale")
        return state[key] if scale is None else cls(state[key], scale, state.get(f"{key}_sketch"))


Factor = Tensor | RowFactor


def factor_left(factor: Factor, x: Tensor) -> Tensor:
    """``F @ x`` for a dense ``(B, d, d)`` factor or a ``RowFactor``."""
    return factor.left(x) if isinstance(factor, RowFactor) else factor @ x


def factor_right(factor: Factor, x: Tensor) -> Tensor:
    """``x @ F`` for a dense ``(B, d, d)`` factor or a ``RowFactor``."""
    return factor.right(x) if isinstance(factor, RowFactor) else x @ factor
