"""Top-k eigenspace overlap (Gur-Ari et al. 2018; Wu et al. 2020).

``overlap(V₁, V₂) = ‖V₁ V₂ᵀ‖_F² / k ∈ [0, 1]`` for ``(k, P)`` orthonormal row bases; a random k-dimensional
subspace of R^P gives about ``k/P``. For Kronecker eigenvectors ``(v ⊗ u)·(v' ⊗ u') = (v·v')(u·u')``, so the
``k × k`` Gram matrix comes from factor inner products without forming any ``P``-length vector.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..spectra import KroneckerEigen


def eigenspace_overlap(V1: Tensor, V2: Tensor) -> float:
    """``‖V₁ V₂ᵀ‖_F² / k`` for orthonormal row bases of equal size ``(k, P)``."""
    if V1.dim() != 2 or V1.shape != V2.shape:
        raise ValueError(f"expected two (k, P) bases of the same shape, got {tuple(V1.shape)} and {tuple(V2.shape)}")
    return float((V1 @ V2.T.to(V1.dtype)).pow(2).sum() / V1.shape[0])


def kronecker_overlap(e1: KroneckerEigen, e2: KroneckerEigen, k: int) -> float:
    """Overlap of the top-k eigenspaces of two Kronecker spectra from the factors' eigenvectors alone."""
    if e1.layout != e2.layout:
        raise ValueError(f"layers differ in shape: {e1.layout} vs {e2.layout}")
    _, g1, a1 = e1.top_pairs(k)
    _, g2, a2 = e2.top_pairs(k)
    # layout permutation is orthogonal, so inner products are those of v ⊗ u in augmented order
    gram = (g1 @ g2.T) * (a1 @ a2.T)
    return float(gram.pow(2).sum() / k)


def overlap_by_layer(eig1: Mapping[str, KroneckerEigen], eig2: Mapping[str, KroneckerEigen], k: int) -> list[dict]:
    """Per common layer: top-k Kronecker eigenspace overlap of two models and the random baseline ``k/P``."""
    rows = []
    for name in eig1:
        if name not in eig2:
            continue
        e1, e2 = eig1[name], eig2[name]
        k_layer = min(k, e1.num_params)
        rows.append(
            {"layer": name, "k": k_layer, "overlap": kronecker_overlap(e1, e2, k_layer), "random_baseline": k_layer / e1.num_params}
        )
    if not rows:
        raise ValueError("the two models have no layer name in common")
    return rows
