"""Parameter order of a layer block: the public order and the Kronecker (augmented-matrix) order.

For a layer with weight ``W`` viewed as ``(d_out, d_in)`` and bias ``b``, the Kronecker factors act on the
augmented matrix ``W̄ = [W b]`` of shape ``(d_out, d_in + 1)`` (no bias: ``W̄ = W``), flattened row-major:
``vec(W̄)[r·width + c] = W̄[r, c]``. In that order the block is ``G ⊗ A`` (``torch.kron``; outer index = output
row). Users never see this order: every public vector and matrix is in the order
``torch.cat([p.flatten() for p in module.parameters()])`` — weight, then bias. This module converts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockLayout:
    """Shapes of one layer block. ``width = d_in + 1`` with a bias, ``d_in`` without."""

    d_out: int
    d_in: int
    has_bias: bool

    @property
    def width(self) -> int:
        return self.d_in + int(self.has_bias)

    @property
    def num_params(self) -> int:
        return self.d_out * self.width

    def to_matrices(self, vectors: Tensor) -> Tensor:
        """Public-order vectors ``(m, P)`` → augmented matrices ``(m, d_out, width)``."""
        if vectors.dim() != 2 or vectors.shape[1] != self.num_params:
            raise ValueError(f"expected vectors of shape (m, {self.num_params}), got {tuple(vectors.shape)}")
        m, n_weight = vectors.shape[0], self.d_out * self.d_in
        weight = vectors[:, :n_weight].reshape(m, self.d_out, self.d_in)
        if not self.has_bias:
            return weight
        return torch.cat([weight, vectors[:, n_weight:].unsqueeze(-1)], dim=-1)

    def to_vectors(self, matrices: Tensor) -> Tensor:
        """Augmented matrices ``(m, d_out, width)`` → public-order vectors ``(m, P)``."""
        m = matrices.shape[0]
        weight = matrices[..., : self.d_in].reshape(m, -1)
        if not self.has_bias:
            return weight
        return torch.cat([weight, matrices[..., self.d_in]], dim=1)

    def permutation(self, device: torch.device | None = None) -> Tensor:
        """``perm[p]`` = position in ``vec(W̄)`` of public index ``p``."""
        index = torch.arange(self.num_params, device=device).reshape(self.d_out, self.width)
        return self.to_vectors(index.unsqueeze(0)).squeeze(0)

    def rank_one_vectors(self, g_vectors: Tensor, a_vectors: Tensor) -> Tensor:
        """Public-order vectors of ``v ⊗ u`` for rows ``v`` of ``g_vectors`` (k, d_out), ``u`` of ``a_vectors`` (k, width)."""
        k, n_weight = g_vectors.shape[0], self.d_out * self.d_in
        out = g_vectors.new_empty(k, self.num_params)  # written once, in place: k·P can be large
        torch.mul(g_vectors.unsqueeze(2), a_vectors[:, None, : self.d_in], out=out[:, :n_weight].view(k, self.d_out, self.d_in))
        if self.has_bias:
            torch.mul(g_vectors, a_vectors[:, self.d_in :], out=out[:, n_weight:])
        return out
