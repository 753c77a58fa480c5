"""Exact curvature on a partition of the parameters: ``DenseBlocks``.

``blocks`` ``(B, b, b)`` are dense symmetric sub-blocks and ``index`` ``(B, b)`` the public positions each acts on
(every position exactly once): one dense ``(P, P)`` block (``B = 1``), per-feature ``2×2`` blocks of a wide
normalization layer's ``(γ_f, β_f)``, or ``1×1`` blocks (the diagonal). The matrix is ``Σ_B E_Bᵀ blocks_B E_B``
with ``E_B`` selecting ``index_B``; what is dropped (the cross-sub-block terms) is what ``label`` says.
Eigenvalues are those of the sub-blocks, eigenvectors those of a sub-block placed at its positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spectra import ClampReport, symmetric_eig
from .base import CurvatureBlock, ExplicitEigen


class DenseBlocks(CurvatureBlock):
    """Dense sub-blocks on a partition of the public positions (module docstring)."""

    storage_tag = "dense_blocks"

    def __init__(self, blocks: Tensor, index: Tensor, label: str, name: str = ""):
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2] or index.shape != blocks.shape[:2]:
            raise ValueError(f"expected blocks (B, b, b) and index (B, b), got {tuple(blocks.shape)}, "
                             f"{tuple(index.shape)}")
        self.blocks, self.index, self.label, self.name = blocks, index.to(blocks.device), label, name

    @classmethod
    def dense(cls, matrix: Tensor, label: str, name: str = "") -> DenseBlocks:
        """One ``(P, P)`` block."""
        return cls(matrix.unsqueeze(0), torch.arange(matrix.shape[0], device=matrix.device).unsqueeze(0), label, name)

    @classmethod
    def diagonal(cls, values: Tensor, label: str, name: str = "") -> DenseBlocks:
        """``P`` blocks ``1×1``."""
        return cls(values.reshape(-1, 1, 1), torch.arange(values.numel(), device=values.device).unsqueeze(1), label,
                   name)

    @classmethod
    def paired(cls, blocks: Tensor, label: str, name: str = "") -> DenseBlocks:
        """Blocks ``(F, 2, 2)`` on positions ``(f, F + f)`` (a normalization layer's ``γ_f, β_f``)."""
        f = blocks.shape[0]
        features = torch.arange(f, device=blocks.device)
        return cls(blocks, torch.stack([features, features + f], dim=1), label, name)

    def __repr__(self) -> str:
        return (f"DenseBlocks({self.name!r}, {self.blocks.shape[0]} × {tuple(self.blocks.shape[1:])}, "
                f"P={self.num_params})")

    @property
    def num_params(self) -> int:
        return self.index.numel()

    @property
    def reference(self) -> Tensor:
        return self.blocks

    def structure(self) -> str:
        return self.label

    def matmat(self, columns: Tensor) -> Tensor:
        out = torch.empty_like(columns)
        out[self.index] = self.blocks @ columns[self.index]  # (B, b, m)
        return out

    def trace(self) -> Tensor:
        return self.blocks.diagonal(dim1=1, dim2=2).sum()

    def materialize(self) -> Tensor:
        out = self.blocks.new_zeros(self.num_params, self.num_params)
        out[self.index[:, :, None], self.index[:, None, :]] = self.blocks
        return out

    def moved(self, device: torch.device | str | None, dtype: torch.dtype | None) -> DenseBlocks:
        return DenseBlocks(self.blocks.to(device, dtype), self.index.to(device), self.label, self.name)

    def state(self) -> dict:
        return {"blocks": self.blocks, "index": self.index, "label": self.label}

    @classmethod
    def from_state(cls, state: dict, name: str) -> DenseBlocks:
        return cls(state["blocks"], state["index"], state["label"], name)

    def eig_matrices(self, dtype: torch.dtype | None) -> list[Tensor]:
        return [self.blocks if dtype is None else self.blocks.to(dtype)]

    def eigen_from(self, matrices: list[Tensor], decompositions: list[tuple], vectors: bool) -> DenseBlocksEigen:
        values, vecs, reports, forms = decompositions[0]
        return DenseBlocksEigen(matrices[0], self.index, values, vecs, forms, reports)


class DenseBlocksEigen(ExplicitEigen):
    """Eigen-structure of ``DenseBlocks``: sub-block eigenvalues (descending overall) and, on first use of ``topk``,
    eigenvectors — only the leading ones when a ``Tridiagonal`` form was kept (one large block on the CPU)."""

    def __init__(self, blocks: Tensor, index: Tensor, values: Tensor, vectors: Tensor | None, forms: list,
                 reports: list[ClampReport]):
        self._blocks, self._index, self._vectors, self._forms = blocks, index, vectors, forms
        self._block_values = values  # (B, b), each block's descending
        self._set_values(values.flatten())
        self.clamped = {"blocks": ClampReport(sum(r.count for r in reports),
                                              min((r.most_negative for r in reports), default=0.0))}

    def _leading(self, m: int) -> Tensor:
        """Eigenvectors ``(B, b, ≥m)`` of the sub-blocks, leading columns first."""
        if self._vectors is None and self._forms and self._forms[0] is not None and len(self._forms) == 1:
            return self._forms[0].leading_vectors(m).to(self._blocks.device).unsqueeze(0)
        if self._vectors is None:
            _, self._vectors, _ = symmetric_eig(self._blocks, vectors=True)
        return self._vectors

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        k = self._check_k(k)
        b = self._block_values.shape[1]
        block, column = self._order[:k] // b, self._order[:k] % b
        leading = self._leading(int(column.max()) + 1)
        vectors = self.values.new_zeros(k, self.num_params)
        rows = torch.arange(k, device=vectors.device)
        vectors[rows[:, None], self._index[block]] = leading[block, :, column].to(vectors.dtype)
        return self.values[:k], vectors
