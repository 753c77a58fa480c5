"""``nn.MultiheadAttention``: its fused in-projection as Kronecker layers, made visible to hooks for the length of a
curvature pass.

PyTorch's ``MultiheadAttention`` applies its fused projection ``[q; k; v] = in_proj_weight · x + in_proj_bias``
and ``out_proj`` as functional calls, which no forward hook sees. For the pass, the module's forward is replaced with
an equivalent one that calls a ``Linear`` sharing those very parameters (``projection_layer``) and calls ``out_proj``
as a module, so that hooks record both; the original forward is restored on exit. The block is in the module's own
public order ``[in_proj_weight, in_proj_bias]``:

* **self-attention** (``query``, ``key`` and ``value`` the same tensor): the fused projection *is* a linear layer
  ``x ↦ 3E`` over the sequence, so its block is ``G ⊗ A`` like any ``Linear`` (``A`` over the input rows, ``G``
  over the 3E outputs): a ``KroneckerBlock``;
* **cross-attention** (``nn.TransformerDecoderLayer``'s ``multihead_attn``: queries from the target, keys and values
  from the memory, ``T_q ≠ T_kv`` allowed): the rows of the projection see different inputs, so the block is a
  ``BlockDiagonal`` of Kronecker blocks per input — part ``query``, ``[W_q b_q]`` with ``A`` over the query rows and
  ``G`` over ``q``; part ``key/value``, ``[W_k b_k; W_v b_v]`` with ``A`` over the memory rows and one ``G`` over
  ``[k; v]`` (``key`` and ``value`` the same tensor), or parts ``key`` and ``value`` apart (different tensors). The
  terms between the parts are dropped. Each part is exact where a ``Linear`` over its input would be (one sample,
  one location of its input).

A module called both ways (or with ``key is value`` in some calls only) is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import BlockDiagonal, CurvatureBlock
from ..capture import LayerCall
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


# the in-projection rows each role of a helper call computes, in units of E (q, k, v), and the part each role feeds
ROLES = {"qkv": (0, 3), "q": (0, 1), "kv": (1, 3), "k": (1, 2), "v": (2, 3)}
PART_NAMES = {"q": "query", "kv": "key/value", "k": "key", "v": "value"}


class InProjection(nn.Linear):
    """The ``Linear(E, 3E)`` of the in-projection; ``role`` (module docstring, ``ROLES``) computes only the rows of
    ``q``, ``[k; v]``, ``k`` or ``v``, so that a cross-attention call records each input with the rows it feeds."""

    def forward(self, input: Tensor, role: str = "qkv") -> Tensor:
        if role == "qkv":
            return super().forward(input)
        e = self.in_features
        start, stop = ROLES[role]
        bias = self.bias[start * e : stop * e] if self.bias is not None else None
        return F.linear(input, self.weight[start * e : stop * e], bias)


def _forward(self: nn.MultiheadAttention, helper: InProjection, on_cross_attention):
    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        self_attention, shared_key_value = query is key and key is value, key is value
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        n, length, e = query.shape
        heads, head_dim = self.num_heads, e // self.num_heads
        if self_attention:
            q, k, v = helper(query).chunk(3, dim=-1)  # a module call: hooks see it
        else:  # each input with the rows it feeds, module calls as well
            on_cross_attention()
            q = helper(query, role="q")
            if shared_key_value:
                k, v = helper(key, role="kv").chunk(2, dim=-1)
            else:
                k, v = helper(key, role="k"), helper(value, role="v")
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


def projection_layer(mha: nn.MultiheadAttention) -> InProjection:
    """An ``InProjection`` whose ``weight``/``bias`` are the module's ``in_proj_weight``/``in_proj_bias`` (the same
    ``Parameter`` objects: nothing is copied, the model is not changed)."""
    helper = InProjection(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None, device="meta")
    helper.weight = mha.in_proj_weight
    helper.bias = mha.in_proj_bias
    return helper


class _RecordedAtHelper:
    """What the decomposed forward needs of an accumulator: the module, its helper ``InProjection``, and where to say
    that the module was called as cross-attention (the per-sample sums, which serve ``KroneckerBlock``s only, skip
    it)."""

    def _attach(self, module: nn.MultiheadAttention) -> InProjection:
        self.attention, self.helper = module, projection_layer(module)
        return self.helper

    def called_as_cross_attention(self) -> None:
        self.skip_reason = ("called as cross-attention (query, key, value differ): its q/k/v projections have "
                            "different inputs and no single Kronecker block")


class _RowsOfOneInput(LinearKind):
    """The rows of the in-projection that one input of a cross-attention call feeds (``role``): a linear layer
    ``E ↦ rows`` over that input."""

    def __init__(self, role: str):
        self.role = role

    def layout(self, module: nn.Module) -> BlockLayout:
        start, stop = ROLES[self.role]
        return BlockLayout((stop - start) * module.in_features, module.in_features, module.bias is not None)


class AttentionSums(_RecordedAtHelper, KroneckerSums):
    """The in-projection's factor sums, recorded at its helper: self-attention calls as one ``Linear(E, 3E)``,
    cross-attention calls per input (``parts``, by role; module docstring)."""

    def __init__(self, name: str, module: nn.MultiheadAttention, settings: PassSettings):
        super().__init__(LinearKind(), name, self._attach(module), settings)
        self.settings = settings
        self.parts: dict[str, KroneckerSums] = {}
        self._roles: list[str] = []  # the role of every recorded call of the batch, in call order

    def called_as_cross_attention(self) -> None:
        """Cross-attention calls are recorded per input (``add_inputs``)."""

    @property
    def called(self) -> bool:
        return super().called or any(part.called for part in self.parts.values())

    def add_inputs(self, calls: list[LayerCall]) -> None:
        self._roles = [(call.kwargs or {}).get("role", "qkv") for call in calls]
        joint = [call for call, role in zip(calls, self._roles) if role == "qkv"]
        if joint:
            super().add_inputs(joint)
        for role in dict.fromkeys(r for r in self._roles if r != "qkv"):
            if role not in self.parts:
                self.parts[role] = KroneckerSums(_RowsOfOneInput(role), PART_NAMES[role], self.helper, self.settings)
            self.parts[role].add_inputs([call for call, r in zip(calls, self._roles) if r == role])
        roles = set(self.parts)
        if roles and super().called:
            self.skip_reason = "called both as self-attention and as cross-attention: no one block structure"
        elif roles and roles not in ({"q", "kv"}, {"q", "k", "v"}):
            self.skip_reason = "called as cross-attention with key is value in some calls only: no one block structure"

    def add_gradients(self, grads: list[list[Tensor]]) -> None:
        joint = [g for g, role in zip(grads, self._roles) if role == "qkv"]
        if joint:
            super().add_gradients(joint)
        for role, part in self.parts.items():
            part_grads = [g for g, r in zip(grads, self._roles) if r == role]
            if part_grads:
                part.add_gradients(part_grads)

    def input_state(self) -> list[Tensor]:
        return [*super().input_state(), *(t for part in self.parts.values() for t in part.input_state())]

    def state(self) -> list[Tensor]:
        return [*super().state(), *(t for part in self.parts.values() for t in part.state())]

    def set_state(self, tensors: list[Tensor]) -> None:
        start = len(super().state())
        super().set_state(tensors[:start])
        for part in self.parts.values():
            count = len(part.state())
            part.set_state(tensors[start : start + count])
            start += count

    def finalize(self, scale: float, device) -> dict[str, CurvatureBlock]:
        if not self.parts:
            return super().finalize(scale, device)
        e = self.attention.embed_dim
        roles = sorted(self.parts, key=lambda role: ROLES[role])
        blocks, index = {}, {}
        for role in roles:
            name, (start, stop) = PART_NAMES[role], ROLES[role]
            blocks[name] = self.parts[role].finalize(scale, device)[name]
            bias = [3 * e * e + torch.arange(start * e, stop * e)] if self.attention.in_proj_bias is not None else []
            index[name] = torch.cat([torch.arange(start * e * e, stop * e * e), *bias])
        return {self.name: BlockDiagonal(blocks, index, self.name, "each input's rows of the in-projection apart")}


class AttentionPerSampleSums(_RecordedAtHelper, PerSampleSums):
    """The in-projection's per-sample gradient sums, recorded at its helper ``Linear``."""

    def __init__(self, name: str, module: nn.MultiheadAttention, settings: PassSettings, statistic: PerSampleStatistic):
        super().__init__(LinearKind(), name, self._attach(module), settings, statistic)


class AttentionKind(LinearKind):
    """``nn.MultiheadAttention``: the block of ``[in_proj_weight, in_proj_bias]`` (``G ⊗ A`` for self-attention, a
    ``BlockDiagonal`` per input for cross-attention; module docstring)."""

    name = "attention"

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention) and forward_is(module, nn.MultiheadAttention)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not module._qkv_same_embed_dim:
            return "MultiheadAttention with kdim/vdim ≠ embed_dim (separate q/k/v weights) is not supported"
        if module.bias_k is not None or module.add_zero_attn:
            return "MultiheadAttention with add_bias_kv or add_zero_attn is not supported"
        return None

    def functional_children(self, module: nn.Module) -> list[str]:
        return ["out_proj"]  # F.multi_head_attention_forward applies it; only the rerouted forward calls it

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
