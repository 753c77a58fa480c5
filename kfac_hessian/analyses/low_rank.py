"""Low-rank structure of top eigenvectors (Wu et al. 2020).

An eigenvector ``x`` of a Kronecker block, reshaped to the augmented weight ``X = [W b]`` (``d_out × width`` per
group), is exactly rank one under the Kronecker approximation (``X = v uᵀ`` in one group). For exact eigenvectors
we measure how close they come: the share of energy in the top singular value over all groups' singular values,
``σ₁² / Σσ²``, and how well the top singular vectors (in the group that holds ``σ₁``) align with the top
eigenvectors of that group's factors, ``max_j (v_j · left)²`` and ``max_i (u_i · right)²``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..blocks import KroneckerEigen


@dataclass
class LowRankStructure:
    """Per eigenvector (rows): energy share of the top singular value, and alignment with the factors."""

    energy_share: Tensor
    g_alignment: Tensor
    a_alignment: Tensor

    def to_dict(self) -> dict:
        return {k: [float(x) for x in v] for k, v in self.__dict__.items()}


def low_rank_structure(vectors: Tensor, eig: KroneckerEigen, n_factor_vectors: int = 5) -> LowRankStructure:
    """Analyse ``(k, P)`` public-order eigenvectors of the layer whose Kronecker spectrum is ``eig``.

    ``g_alignment`` / ``a_alignment``: squared cosine between the top left/right singular vector and the
    closest of the top ``n_factor_vectors`` eigenvectors of ``G`` / ``A``.
    """
    if not isinstance(eig, KroneckerEigen):
        raise TypeError(f"low_rank_structure needs a Kronecker block's eigen-structure, got {type(eig).__name__}")
    dtype = eig.g_values.dtype
    matrices = eig.layout.to_matrices(vectors.to(dtype))  # (k, B, d_out, width)
    left, sigma, right_t = torch.linalg.svd(matrices, full_matrices=False)
    energy = sigma.pow(2)
    share = energy[..., 0].amax(1) / energy.sum((1, 2))
    group = energy[..., 0].argmax(1)
    rows = torch.arange(len(vectors), device=vectors.device)
    top_left, top_right = left[rows, group, :, 0], right_t[rows, group, 0, :]
    g_vecs = eig.factor_vectors("G", n_factor_vectors)[group]  # (k, d_out, n)
    a_vecs = eig.factor_vectors("A", n_factor_vectors)[group].to(dtype)
    g_align = torch.einsum("kd,kdn->kn", top_left, g_vecs).pow(2).amax(1)
    a_align = torch.einsum("kd,kdn->kn", top_right, a_vecs).pow(2).amax(1)
    return LowRankStructure(share, g_align, a_align)
