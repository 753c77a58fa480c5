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
