"""Eigenvalue-corrected Kronecker blocks (EKFAC; George et al., NeurIPS 2018).

An ``EKFACBlock`` keeps the eigenbasis of a ``KroneckerBlock`` — per group ``V_g ⊗ U_g``, ``V`` the eigenvectors of
``G``, ``U`` those of ``A`` (or unit vectors for a diagonal ``A``) — and replaces its eigenvalues ``μ_j λ_i`` by the
exact second moments of the per-sample (per-column) gradients in that basis,

    Λ_{g,j,i} = scale · Σ_{n,k} (V_gᵀ ∇W̄_{g,nk} U_g)²_{j,i},        ∇W̄_{nk} = Σ_t g_{nkt} ā_{nt}ᵀ,

``scale`` that of ``G`` (``compute_kfac``'s table). So the block is ``Q diag(Λ) Qᵀ`` with ``Q = V ⊗ U``, which is the
best approximation of the exact curvature block that is diagonal in that basis: ``Λ = diag(Qᵀ H Q)`` for the block
``H = scale · Σ_{n,k} vec(∇W̄) vec(∇W̄)ᵀ`` of the per-sample gradients. For ``curvature="ggn"`` that ``H`` is the exact
GGN block (with one output position per sample, or ``per_position=True``), so ``tr(EKFAC) = tr(GGN)`` exactly. For
weight sharing the per-sample gradient sums over the locations first, so ``Λ`` captures the coherence across
locations that KFAC-expand misses on convolutions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import BlockLayout
from .base import CurvatureBlock, ExplicitEigen
from .kronecker import KroneckerPairs


class EKFACBlock(CurvatureBlock):
    """``Q diag(Λ) Qᵀ``, ``Q = V ⊗ U`` per group (module docstring): ``g_vectors`` ``(groups, d_out, d_out)``,
    ``a_vectors`` ``(groups, width, width)`` — or ``None`` for a diagonal ``A`` (``U = I``) — and ``values`` ``Λ``
    ``(groups, d_out, width)``, all in the Kronecker order of ``layout``."""

    storage_tag = "ekfac"

    def __init__(self, g_vectors: Tensor, a_vectors: Tensor | None, values: Tensor, layout: BlockLayout,
                 name: str = ""):
        groups, d_out, width = layout.groups, layout.d_out, layout.width
        if g_vectors.shape != (groups, d_out, d_out) or values.shape != (groups, d_out, width) or (
                a_vectors is not None and a_vectors.shape != (groups, width, width)):
            raise ValueError(f"shapes {tuple(g_vectors.shape)}, "
                             f"{None if a_vectors is None else tuple(a_vectors.shape)}, "
                             f"{tuple(values.shape)} do not fit {layout}")
        self.g_vectors, self.a_vectors, self.values, self.layout, self.name = g_vectors, a_vectors, values, layout, name

    def __repr__(self) -> str:
        return f"EKFACBlock({self.name!r}, groups={self.layout.groups}, P={self.num_params})"

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def reference(self) -> Tensor:
        return self.values

    def structure(self) -> str:
        basis = "V ⊗ I (diagonal A)" if self.a_vectors is None else "V ⊗ U"
        groups = f" per group ({self.layout.groups} groups)" if self.layout.groups > 1 else ""
        return f"EKFAC: the Kronecker eigenbasis {basis}{groups} with exact second moments as eigenvalues"

    def _rotate(self, matrices: Tensor, transpose: bool) -> Tensor:
        """``Vᵀ X U`` (``transpose``) or ``V X Uᵀ`` for ``X`` ``(m, groups, d_out, width)``."""
        v = self.g_vectors.transpose(1, 2) if transpose else self.g_vectors
        out = v @ matrices
        if self.a_vectors is not None:
            out = out @ (self.a_vectors if transpose else self.a_vectors.transpose(1, 2))
        return out

    def matmat(self, columns: Tensor) -> Tensor:
        coordinates = self._rotate(self.layout.to_matrices(columns.T), transpose=True)
        return self.layout.to_vectors(self._rotate(coordinates * self.values, transpose=False)).T

    def trace(self) -> Tensor:
        return self.values.sum()

    def materialize(self) -> Tensor:
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def moved(self, device: torch.device | str | None, dtype: torch.dtype | None) -> EKFACBlock:
        a = None if self.a_vectors is None else self.a_vectors.to(device, dtype)
        return EKFACBlock(self.g_vectors.to(device, dtype), a, self.values.to(device, dtype), self.layout, self.name)

    def state(self) -> dict:
        layout = self.layout
        state = {"g_vectors": self.g_vectors, "values": self.values,
                 "layout": [layout.d_out, layout.d_in, int(layout.has_bias), layout.groups, int(layout.transposed)]}
        if self.a_vectors is not None:
            state["a_vectors"] = self.a_vectors
        return state

    @classmethod
    def from_state(cls, state: dict, name: str) -> EKFACBlock:
        d_out, d_in, has_bias, groups, transposed = state["layout"]
        layout = BlockLayout(d_out, d_in, bool(has_bias), groups, bool(transposed))
        return cls(state["g_vectors"], state.get("a_vectors"), state["values"], layout, name)

    def eig_matrices(self, dtype: torch.dtype | None) -> list[Tensor]:
        return []  # diagonal in its basis already

    def eigen_from(self, matrices: list[Tensor], decompositions: list[tuple], vectors: bool) -> EKFACEigen:
        return EKFACEigen(self)


class EKFACEigen(ExplicitEigen):
    """Eigenvalues ``Λ`` and rank-one eigenvectors ``v_j ⊗ u_i`` of an ``EKFACBlock``; ``top_pairs`` as for Kronecker
    blocks (so ``kronecker_overlap`` applies)."""

    def __init__(self, block: EKFACBlock):
        self.block, self.layout = block, block.layout
        self._set_values(block.values.flatten())  # sums of squares: never negative
        self.clamped = {}

    def top_pairs(self, k: int) -> KroneckerPairs:
        k = self._check_k(k)
        d_out, width = self.layout.d_out, self.layout.width
        index = self._order[:k]
        group, j, i = index // (d_out * width), (index // width) % d_out, index % width
        g_vectors = self.block.g_vectors[group, :, j]
        if self.block.a_vectors is None:
            a_vectors = self.values.new_zeros(k, width)
            a_vectors[torch.arange(k, device=a_vectors.device), i] = 1
        else:
            a_vectors = self.block.a_vectors[group, :, i]
        return KroneckerPairs(self.values[:k], g_vectors, a_vectors, group)

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        pairs = self.top_pairs(k)
        return pairs.values, self.layout.rank_one_vectors(pairs.g_vectors, pairs.a_vectors, pairs.groups)
