"""Parameter order of a Kronecker block: the public order and the Kronecker (augmented-matrix) order.

A Kronecker layer computes ``z = W ā`` with the weight viewed as ``W`` of shape ``(d_out, d_in)`` per group,
and the factors act on the augmented matrix ``W̄ = [W b]`` of shape ``(d_out, width)``, ``width = d_in + 1``
with a bias (``W̄ = W`` without), flattened row-major: ``vec(W̄)[r·width + c] = W̄[r, c]``. In that order the
block is ``G ⊗ A`` (``torch.kron``; outer index = output row). A grouped convolution has one such matrix per
group (block-diagonal over groups, group-major).

Users never see this order: every public vector and matrix is in the order
``torch.cat([p.flatten() for p in parameters])`` — weight, then bias — where the weight is stored either as
``(groups·d_out, d_in…)`` (``nn.Linear``, convolutions: output row-major) or, ``transposed``, as ``(d_in, d_out)``
(``transformers``' ``Conv1D``, ``z = x W + b``; ``nn.Embedding``, whose ``(vocabulary, dim)`` weight is ``Wᵀ`` of
the one-hot form ``z = W e_token``). This module converts between the two orders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockLayout:
    """Shapes of one Kronecker block: ``groups`` matrices ``(d_out, width)``; ``width = d_in + 1`` with a bias."""

    d_out: int
    d_in: int
    has_bias: bool
    groups: int = 1
    transposed: bool = False

    def __post_init__(self):
        if self.transposed and self.groups != 1:
            raise ValueError("a transposed weight has one group")

    @property
    def width(self) -> int:
        return self.d_in + int(self.has_bias)

    @property
    def num_params(self) -> int:
        return self.groups * self.d_out * self.width

    @property
    def num_weights(self) -> int:
        return self.groups * self.d_out * self.d_in

    def without_bias(self) -> BlockLayout:
        return BlockLayout(self.d_out, self.d_in, False, self.groups, self.transposed)

    def weight_matrices(self, flat: Tensor) -> Tensor:
        """Public-order weights ``(m, num_weights)`` as ``(m, groups, d_out, d_in)`` (a view when not transposed)."""
        m = flat.shape[0]
        if self.transposed:
            return flat.reshape(m, self.d_in, self.d_out).transpose(1, 2).unsqueeze(1)
        return flat.reshape(m, self.groups, self.d_out, self.d_in)

    def to_matrices(self, vectors: Tensor) -> Tensor:
        """Public-order vectors ``(m, P)`` → augmented matrices ``(m, groups, d_out, width)``."""
        if vectors.dim() != 2 or vectors.shape[1] != self.num_params:
            raise ValueError(f"expected vectors of shape (m, {self.num_params}), got {tuple(vectors.shape)}")
        weight = self.weight_matrices(vectors[:, : self.num_weights])
        if not self.has_bias:
            return weight
        bias = vectors[:, self.num_weights :].reshape(vectors.shape[0], self.groups, self.d_out, 1)
        return torch.cat([weight, bias], dim=-1)

    def to_vectors(self, matrices: Tensor) -> Tensor:
        """Augmented matrices ``(m, groups, d_out, width)`` → public-order vectors ``(m, P)``."""
        m = matrices.shape[0]
        weight = matrices[..., : self.d_in]
        weight = weight[:, 0].transpose(1, 2).reshape(m, -1) if self.transposed else weight.reshape(m, -1)
        if not self.has_bias:
            return weight
        return torch.cat([weight, matrices[..., self.d_in].reshape(m, -1)], dim=1)

    def permutation(self, device: torch.device | None = None) -> Tensor:
        """``perm[p]`` = position in ``vec(W̄)`` (groups stacked) of public index ``p``."""
        index = torch.arange(self.num_params, device=device).reshape(1, self.groups, self.d_out, self.width)
        return self.to_vectors(index).squeeze(0)

    def rank_one_vectors(self, g_vectors: Tensor, a_vectors: Tensor, groups: Tensor | None = None) -> Tensor:
        """Public-order vectors of ``v ⊗ u`` placed in group ``groups[n]`` (all 0 when ``None``), for rows ``v`` of
        ``g_vectors`` ``(k, d_out)`` and ``u`` of ``a_vectors`` ``(k, width)``: the rank-one matrices ``v uᵀ``."""
        k = g_vectors.shape[0]
        out = g_vectors.new_zeros(k, self.num_params) if self.groups > 1 else g_vectors.new_empty(k, self.num_params)
        rows = torch.arange(k, device=g_vectors.device)
        slot = torch.zeros(k, dtype=torch.long, device=g_vectors.device) if groups is None else groups
        weights, a_weights = out[:, : self.num_weights], a_vectors[:, : self.d_in]
        if self.transposed:  # written in place: k·P can be large
            torch.mul(a_weights.unsqueeze(2), g_vectors.unsqueeze(1), out=weights.view(k, self.d_in, self.d_out))
        elif self.groups == 1:
            torch.mul(g_vectors.unsqueeze(2), a_weights.unsqueeze(1), out=weights.view(k, self.d_out, self.d_in))
        else:
            weights.view(k, self.groups, self.d_out, self.d_in)[rows, slot] = (g_vectors.unsqueeze(2)
                                                                               * a_weights.unsqueeze(1))
        if self.has_bias:
            bias = out[:, self.num_weights :].view(k, self.groups, self.d_out)
            bias[rows, slot] = g_vectors * a_vectors[:, self.d_in :]
        return out
