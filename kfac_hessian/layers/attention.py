"""``nn.MultiheadAttention``, self-attention: its fused in-projection as a Kronecker layer, made visible to hooks for
the length of a curvature pass.

PyTorch's ``MultiheadAttention`` applies its fused projection ``[q; k; v] = in_proj_weight · x + in_proj_bias``
and ``out_proj`` as functional calls, which no forward hook sees. For self-attention (``query``, ``key`` and
``value`` the same tensor) the fused projection *is* a linear layer ``x ↦ 3E`` over the sequence, so its block
is ``G ⊗ A`` like any ``Linear`` (``A`` over the input rows, ``G`` over the 3E outputs), in the module's own
public order ``[in_proj_weight, in_proj_bias]``. For the pass, the module's forward is replaced with an equivalent
one that calls a ``Linear`` sharing those very parameters and calls ``out_proj`` as a module, so that hooks record
both; the original forward is restored on exit. Cross-attention calls (different ``query``/``key``/``value``) are
computed the same way but not recorded, and the module is skipped: its three projections have different inputs and
no single Kronecker block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import BlockLayout
from .base import PassSettings, forward_is
from .kronecker import KroneckerSums, PerSampleStatistic, PerSampleSums
from .linear import LinearKind, linear_rows


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _forward(self: nn.MultiheadAttention, helper: nn.Linear, on_cross_attention):
    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        self_attention = query is key and key is value
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        n, length, e = query.shape
        heads, head_dim = self.num_heads, e // self.num_heads
        if self_attention:
            q, k, v = helper(query).chunk(3, dim=-1)  # a module call: hooks see it
        else:
            on_cross_attention()
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        q, k, v = (t.reshape(n, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (N, H, L, D)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (N·H, L, S)
            mask = mask.reshape(n, heads, length, -1)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding[:, None, None, :]
            mask = padding if mask is None else mask + padding
        causal = is_causal and mask is None
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        if causal:
            s = k.shape[2]
            scores = scores.masked_fill(torch.ones(length, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(n, length, e))  # a module call
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights

    return forward


def projection_layer(mha: nn.MultiheadAttention) -> nn.Linear:
    """A ``Linear(E, 3E)`` whose ``weight``/``bias`` are the module's ``in_proj_weight``/``in_proj_bias`` (the same
    ``Parameter`` objects: nothing is copied, the model is not changed)."""
    helper = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None, device="meta")
    helper.weight = mha.in_proj_weight
    helper.bias = mha.in_proj_bias
    return helper


class _RecordedAtHelper:
    """What the decomposed forward needs of an accumulator: the module, its helper ``Linear``, and where to say that
    the module was called as cross-attention."""

    def _attach(self, module: nn.MultiheadAttention) -> nn.Linear:
        self.attention, self.helper = module, projection_layer(module)
        return self.helper

    def called_as_cross_attention(self) -> None:
        self.skip_reason = ("called as cross-attention (query, key, value differ): its q/k/v projections have "
                            "different inputs and no single Kronecker block")


class AttentionSums(_RecordedAtHelper, KroneckerSums):
    """The in-projection's factor sums, recorded at its helper ``Linear``."""

    def __init__(self, name: str, module: nn.MultiheadAttention, settings: PassSettings):
        super().__init__(LinearKind(), name, self._attach(module), settings)


class AttentionPerSampleSums(_RecordedAtHelper, PerSampleSums):
    """The in-projection's per-sample gradient sums, recorded at its helper ``Linear``."""

    def __init__(self, name: str, module: nn.MultiheadAttention, settings: PassSettings, statistic: PerSampleStatistic):
        super().__init__(LinearKind(), name, self._attach(module), settings, statistic)


class AttentionKind(LinearKind):
    """``nn.MultiheadAttention`` used as self-attention: the block of ``[in_proj_weight, in_proj_bias]``."""

    name = "attention"

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention) and forward_is(module, nn.MultiheadAttention)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not module._qkv_same_embed_dim:
            return "MultiheadAttention with kdim/vdim ≠ embed_dim (separate q/k/v weights) is not supported"
        if module.bias_k is not None or module.add_zero_attn:
            return "MultiheadAttention with add_bias_kv or add_zero_attn is not supported"
        return None

    def parameter_names(self, module: nn.Module) -> list[str]:
        return ["in_proj_weight"] + (["in_proj_bias"] if module.in_proj_bias is not None else [])

    def layout(self, module: nn.Module) -> BlockLayout:
        return BlockLayout(3 * module.embed_dim, module.embed_dim, module.in_proj_bias is not None)

    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        return linear_rows(inputs, module.embed_dim)

    def reproduces(self, module: nn.Module, call) -> bool:
        return True  # the recorded call is the helper's, which is a Linear by construction

    def accumulator(self, name: str, module: nn.Module, settings: PassSettings) -> AttentionSums:
        return AttentionSums(name, module, settings)

    def per_sample_accumulator(self, name: str, module: nn.Module, settings: PassSettings,
                               statistic: PerSampleStatistic) -> AttentionPerSampleSums:
        return AttentionPerSampleSums(name, module, settings, statistic)

    @contextlib.contextmanager
    def pass_context(self, accumulators: Mapping[str, _RecordedAtHelper]) -> Iterator[None]:
        """Route each module's forward through its helper and ``out_proj`` as module calls; the original forward is
        restored on exit, also on error."""
        try:
            for acc in accumulators.values():
                acc.attention.forward = _forward(acc.attention, acc.helper, acc.called_as_cross_attention)
            yield
        finally:
            for acc in accumulators.values():
                acc.attention.__dict__.pop("forward", None)
