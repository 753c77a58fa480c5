"""Running sums of outer products ``Σ x xᵀ`` — the covariance products every factor is made of.

A factor sum is symmetric, so only its upper block triangle is accumulated (``add_gram``) and the lower part is
mirrored once at the end (``symmetrize_``). Rows arrive as ``(…, d)`` tensors and are multiplied feature-major
(``feature_major``).
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
