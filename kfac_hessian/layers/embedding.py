"""``nn.Embedding``: ``z = weight[i]`` at every position, i.e. ``z = W e_i`` with ``W = weightᵀ`` (``d_out =
embedding_dim``, ``d_in = num_embeddings``) and ``e_i`` the one-hot vector of token ``i``. So

* ``A = mean over rows of e_i e_iᵀ = diag(c) / R`` — ``c_v`` = how often token ``v`` occurs, ``R`` = rows
  (samples × positions); kept as its diagonal, never as a vocabulary² matrix. Tokens equal to ``padding_idx``
  count zero (PyTorch gives that row no gradient);
* ``G`` as for every layer.

Always ``approx="expand"`` (the per-sample average of one-hot vectors is not diagonal). Public order is
``weight.flatten()`` (token-major; ``BlockLayout(transposed=True)``), where the block is ``diag(A) ⊗ G``: row ``v`` of
the weight has the ``dim × dim`` block ``A_vv·G``; eigenvalues ``A_vv·μ_j``, eigenvectors ``v_j`` in the row of
token ``v``.

``nn.EmbeddingBag`` (no kind: its per-sample blocks are exact) runs one fused op without forward-mode AD or double
backward; ``embedding_bag_written_out`` computes the same bags from ``F.embedding`` and sums, so that the exact path
can differentiate it twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import LayerCall
from ..layout import BlockLayout
from .base import forward_is, outputs_match
from .kronecker import KroneckerKind, KroneckerSums
from .linear import linear_output_rows


class EmbeddingKind(KroneckerKind):
    name = "embedding"
    diagonal_a = True
    dense_inputs = False

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and forward_is(module, nn.Embedding)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "Embedding with max_norm renormalizes its weight in the forward pass; not supported"
        return None

    def per_sample_fallback(self, module: nn.Module) -> bool:
        return False  # the renormalization writes to the weight: nothing may re-run it

    def layout(self, module: nn.Module) -> BlockLayout:
        return BlockLayout(module.embedding_dim, module.num_embeddings, False, transposed=True)

    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        raise TypeError("an embedding's inputs are indices: its A is the diagonal of token frequencies")

    def add_inputs(self, sums: KroneckerSums, module: nn.Module, inputs: list[Tensor]) -> None:
        for indices in inputs:
            flat = indices.reshape(-1)
            counts = torch.bincount(flat, minlength=module.num_embeddings)
            if module.padding_idx is not None:  # PyTorch gives the padding row no gradient
                counts[module.padding_idx] = 0
            sums.add_counts(counts, flat.numel())

    def output_rows(self, module: nn.Module, grads: Tensor) -> Tensor:
        return linear_output_rows(grads)

    def reproduces(self, module: nn.Module, call: LayerCall) -> bool:
        return outputs_match(F.embedding(call.inputs, module.weight, module.padding_idx), call.output_values)


def embedding_bag_written_out(module: nn.EmbeddingBag, input: Tensor, offsets: Tensor | None = None,
                              per_sample_weights: Tensor | None = None) -> Tensor:
    """``module(input, offsets, per_sample_weights)`` for ``mode="sum"`` or ``"mean"``, from ``F.embedding`` and a sum
    per bag: the same values as PyTorch's fused ``embedding_bag``, and the derivatives it lacks (forward mode, double
    backward), so that the exact path differentiates it like any other function of the weight. Bags are the rows of
    a 2-D ``input`` ``(B, L)``, or the slices of a 1-D ``input`` that ``offsets`` start; entries equal to
    ``padding_idx`` are left out of their bag (and of its count under ``"mean"``); an empty bag is zero. Being linear
    in the weight, ``J v`` is the same bag of ``v``'s rows."""
    if module.mode == "max":
        raise NotImplementedError("EmbeddingBag(mode='max') has no second derivative in torch and no written-out form "
                                  "here; the exact path supports mode='sum' and 'mean' (compute_kfac's per-sample "
                                  "block of it is exact)")
    if module.max_norm is not None:
        raise NotImplementedError("EmbeddingBag(max_norm=...) renormalizes its weight in place during the forward "
                                  "pass; the exact path does not differentiate it")
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("EmbeddingBag: offsets must be None for a 2-D input (each row is a bag)")
        bags, flat, weights = input.shape[0], input.reshape(-1), per_sample_weights
        bag_of = torch.arange(bags, device=input.device).repeat_interleave(input.shape[1])
    else:
        if offsets is None:
            raise ValueError("EmbeddingBag: a 1-D input needs offsets (where each bag starts)")
        starts = offsets[:-1] if module.include_last_offset else offsets
        bags, flat = len(starts), input
        bag_of = torch.searchsorted(starts, torch.arange(len(input), device=input.device), right=True) - 1
        weights = per_sample_weights
    kept = torch.ones_like(flat, dtype=torch.bool) if module.padding_idx is None else flat != module.padding_idx
    scale = kept.to(module.weight.dtype)
    if weights is not None:
        scale = scale * weights.reshape(-1)
    rows = F.embedding(flat, module.weight) * scale[:, None]
    summed = rows.new_zeros(bags, module.embedding_dim).index_add(0, bag_of, rows)
    if module.mode == "sum":
        return summed
    counts = torch.zeros(bags, dtype=summed.dtype, device=summed.device).index_add(0, bag_of, kept.to(summed.dtype))
    return summed / counts.clamp(min=1)[:, None]
