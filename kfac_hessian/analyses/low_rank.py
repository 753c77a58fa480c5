"""Low-rank structure of top eigenvectors (Wu et al. 2020).

An eigenvector ``x`` of a layer block, reshaped to the augmented weight ``X = [W b]`` (``d_out × width``),
is exactly rank one under the Kronecker approximation (``X = v uᵀ``). For exact eigenvectors we measure how
close they come: the share of energy in the top singular value, ``σ₁² / Σσ²``, and how well the top singular
vectors align with the top eigenvectors of the factors, ``max_j (v_j · left)²`` and ``max_i (u_i · right)²``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..spectra import KroneckerEigen


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
    matrices = eig.layout.to_matrices(vectors.to(eig.a_values.dtype))
    left, sigma, right_t = torch.linalg.svd(matrices, full_matrices=False)
    energy = sigma.pow(2)
    share = energy[:, 0] / energy.sum(1)
    top_left, top_right = left[:, :, 0], right_t[:, 0, :]
    g_vecs = eig.g_vectors[:, :n_factor_vectors]
    a_vecs = eig.a_vectors[:, :n_factor_vectors]
    g_align = (top_left @ g_vecs).pow(2).amax(1)
    a_align = (top_right @ a_vecs).pow(2).amax(1)
    return LowRankStructure(share, g_align, a_align)
