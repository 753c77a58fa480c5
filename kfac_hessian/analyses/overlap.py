"""Top-k eigenspace overlap (Gur-Ari et al. 2018; Wu et al. 2020).

``overlap(V₁, V₂) = ‖V₁ V₂ᵀ‖_F² / k ∈ [0, 1]`` for ``(k, P)`` orthonormal *row* bases (the orientation of
``topk``, ``lanczos`` and ``LanczosResult.eigenvectors``); a random k-dimensional subspace of R^P gives about
``k/P``. Every function here takes eigen results (``kfac_hessian.eigen``: a block's ``eig()``, a Kronecker fit's or
EKFAC's, ``lanczos``, ``eigen_pairs``, ``model_spectrum``) as well as bases, in any mix: the leading ``k`` eigenvectors
of a result are its ``topk(k)``.

For Kronecker eigenvectors ``(v ⊗ u)·(v' ⊗ u') = (v·v')(u·u')`` within a group and 0 across groups, so the
``k × k`` Gram matrix comes from factor inner products without forming any ``P``-length vector.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..blocks import EKFACEigen, KroneckerEigen
from ..eigen import EigenResult, check_k, require_eigen_result

RANK_ONE = (KroneckerEigen, EKFACEigen)  # eigenvectors v ⊗ u per group: ``top_pairs``


def eigenspace_overlap(V1: Tensor | EigenResult, V2: Tensor | EigenResult, k: int | None = None) -> float:
    """``‖V₁ V₂ᵀ‖_F² / k`` for orthonormal row bases of equal size ``(k, P)``, ``k ≤ P``, or eigen results (their
    leading ``k`` eigenvectors; ``k`` is then required). With ``k`` given a basis contributes its first ``k`` rows.

    Raises ``ValueError`` for bases that are not orthonormal rows — in particular ``(P, k)`` column bases (the
    ``torch.linalg.eigh``/scipy habit): pass ``V.T`` for those.
    """
    V1, V2 = _leading_rows(V1, k, "V1"), _leading_rows(V2, k, "V2")
    if V1.dim() != 2 or V1.shape != V2.shape:
        raise ValueError(f"expected two (k, P) bases of the same shape, got {tuple(V1.shape)} and {tuple(V2.shape)}")
    k, P = V1.shape
    if k > P:
        raise ValueError(f"a basis of shape {tuple(V1.shape)} has more rows than columns: eigenspace_overlap takes "
                         "(k, P) row bases (k eigenvectors of length P); for (P, k) column bases pass V.T")
    for name, V in (("V1", V1), ("V2", V2)):
        gram = V.double() @ V.double().T
        # only the (k, k) Gram matrix: a (P, P) one is out of reach for a layer of millions of parameters
        if not torch.allclose(gram, torch.eye(k, dtype=torch.float64, device=V.device), atol=1e-4):
            raise ValueError(f"{name}'s rows are not orthonormal (max |V Vᵀ − I| = "
                             f"{float((gram - torch.eye(k, dtype=gram.dtype, device=gram.device)).abs().max()):.2e}); "
                             "eigenspace_overlap takes (k, P) orthonormal row bases (for a (P, k) column basis "
                             "pass V.T)")
    return float((V1 @ V2.T.to(V1.dtype)).pow(2).sum() / k)


def _leading_rows(basis: Tensor | EigenResult, k: int | None, name: str) -> Tensor:
    if isinstance(basis, Tensor):
        return basis if k is None else basis[: check_k(k)]
    result = require_eigen_result(basis, f"{name} (a (k, P) basis or an eigen result)")
    if k is None:
        raise ValueError(f"{name} is an eigen result: pass k= (how many of its leading eigenvectors to compare)")
    return result.topk(check_k(k))[1]


def kronecker_overlap(e1: KroneckerEigen | EKFACEigen, e2: KroneckerEigen | EKFACEigen, k: int) -> float:
    """Overlap of the top-k eigenspaces of two Kronecker (or EKFAC) spectra from the factors' eigenvectors alone."""
    if e1.layout != e2.layout:
        raise ValueError(f"layers differ in shape: {e1.layout} vs {e2.layout}")
    p1, p2 = e1.top_pairs(k), e2.top_pairs(k)
    # the layout permutation is orthogonal, so inner products are those of v ⊗ u in Kronecker order
    gram = (p1.g_vectors @ p2.g_vectors.T) * (p1.a_vectors @ p2.a_vectors.T.to(p1.a_vectors.dtype))
    gram = gram * (p1.groups[:, None] == p2.groups[None, :])
    return float(gram.pow(2).sum() / k)


def block_overlap(e1: EigenResult, e2: EigenResult, k: int) -> float:
    """Top-k eigenspace overlap of two eigen results of the same block: from the factors for Kronecker and EKFAC
    blocks, from the explicit eigenvectors otherwise."""
    if isinstance(e1, RANK_ONE) and isinstance(e2, RANK_ONE):
        return kronecker_overlap(e1, e2, k)
    if e1.num_params != e2.num_params:
        raise ValueError(f"blocks differ in size: {e1.num_params} vs {e2.num_params}")
    return eigenspace_overlap(e1, e2, k)


def overlap_by_layer(eig1: Mapping[str, EigenResult], eig2: Mapping[str, EigenResult], k: int) -> list[dict]:
    """Per common block: top-k eigenspace overlap of two models (any eigen results: ``KFAC.eig()``, Lanczos results of
    ``layer_operator``s, …) and the random baseline ``k/P`` (``k`` clamped to each block's ``P``, and recorded per
    row)."""
    rows = []
    for name in eig1:
        if name not in eig2:
            continue
        e1 = require_eigen_result(eig1[name], f"eig1[{name!r}]")
        e2 = require_eigen_result(eig2[name], f"eig2[{name!r}]")
        k_layer = min(check_k(k), e1.num_params)
        rows.append({"layer": name, "k": k_layer, "overlap": block_overlap(e1, e2, k_layer),
                     "random_baseline": k_layer / e1.num_params})
    if not rows:
        raise ValueError("the two models have no layer name in common")
    return rows
