"""Low-rank structure of top eigenvectors (Wu et al. 2020).

An eigenvector ``x`` of a Kronecker block, reshaped to the augmented weight ``X = [W b]`` (``d_out × width`` per
group, the block layout of docs/conventions.md), is exactly rank one under the Kronecker approximation (``X = v uᵀ``
in one group). For any other eigenvectors — exact (Lanczos, a dense decomposition), EKFAC's, a Kronecker fit's — we
measure how close they come: the share of energy in the top singular value over all groups' singular values,
``σ₁² / Σσ²``, and, when the Kronecker factors are at hand, how well the top singular vectors (in the group that holds
``σ₁``) align with the top eigenvectors of that group's factors, ``max_j (v_j · left)²`` and ``max_i (u_i · right)²``.

Reshaping needs the layer's layout: the Kronecker eigen-structure of the layer (layout and factors), or any object
with a ``layout`` (EKFAC), or a ``BlockLayout``. Eigenvectors of blocks without one (normalization layers, single
parameters, several layers at once) have no weight matrix to reshape to and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..blocks import EKFACEigen, KroneckerEigen
from ..eigen import EigenResult, check_k, require_eigen_result
from ..layout import BlockLayout


@dataclass
class LowRankStructure:
    """Per eigenvector (rows): energy share of the top singular value, and alignment with the factors (``None``
    without Kronecker factors)."""

    energy_share: Tensor
    g_alignment: Tensor | None
    a_alignment: Tensor | None

    def to_dict(self) -> dict:
        return {k: None if v is None else [float(x) for x in v] for k, v in self.__dict__.items()}


def low_rank_structure(
    vectors: Tensor | EigenResult,
    layout: KroneckerEigen | EKFACEigen | BlockLayout,
    k: int | None = None,
    n_factor_vectors: int = 5,
) -> LowRankStructure:
    """Analyse ``(k, P)`` public-order eigenvectors — or the leading ``k`` of an eigen result — of one layer.

    ``layout``: the layer's ``KroneckerEigen`` (layout and factors: alignments computed), EKFAC's eigen-structure or
    anything else with a ``layout`` attribute, or a ``BlockLayout`` (energy share only). ``g_alignment`` /
    ``a_alignment``: squared cosine between the top left/right singular vector and the closest of the top
    ``n_factor_vectors`` eigenvectors of ``G`` / ``A``.
    """
    block_layout = layout if isinstance(layout, BlockLayout) else getattr(layout, "layout", None)
    if not isinstance(block_layout, BlockLayout):
        raise TypeError("low_rank_structure reshapes eigenvectors to the layer's weight matrices and needs its layout: "
                        f"pass the layer's Kronecker eigen-structure or a BlockLayout, got {type(layout).__name__} "
                        "(blocks without a weight matrix — normalization layers, single parameters — have none)")
    if not isinstance(vectors, Tensor):
        if k is None:
            raise ValueError("vectors is an eigen result: pass k= (how many of its leading eigenvectors to analyse)")
        vectors = require_eigen_result(vectors, "vectors (a (k, P) tensor or an eigen result)").topk(check_k(k))[1]
    elif k is not None:
        vectors = vectors[: check_k(k)]
    if vectors.dim() != 2 or vectors.shape[1] != block_layout.num_params:
        raise ValueError(f"eigenvectors of shape {tuple(vectors.shape)} do not reshape with {block_layout} "
                         f"(P = {block_layout.num_params}): are they of this layer, as (k, P) rows?")
    factors = layout if isinstance(layout, KroneckerEigen) else None
    dtype = factors.g_values.dtype if factors is not None else vectors.dtype
    matrices = block_layout.to_matrices(vectors.to(dtype))  # (k, B, d_out, width)
    left, sigma, right_t = torch.linalg.svd(matrices, full_matrices=False)
    energy = sigma.pow(2)
    share = energy[..., 0].amax(1) / energy.sum((1, 2))
    if factors is None:
        return LowRankStructure(share, None, None)
    group = energy[..., 0].argmax(1)
    rows = torch.arange(len(vectors), device=vectors.device)
    top_left, top_right = left[rows, group, :, 0], right_t[rows, group, 0, :]
    g_vecs = factors.factor_vectors("G", n_factor_vectors)[group]  # (k, d_out, n)
    a_vecs = factors.factor_vectors("A", n_factor_vectors)[group].to(dtype)
    g_align = torch.einsum("kd,kdn->kn", top_left, g_vecs).pow(2).amax(1)
    a_align = torch.einsum("kd,kdn->kn", top_right, a_vecs).pow(2).amax(1)
    return LowRankStructure(share, g_align, a_align)
