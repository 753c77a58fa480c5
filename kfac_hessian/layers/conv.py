"""Convolutions ``nn.Conv1d``/``Conv2d``/``Conv3d`` (any stride, dilation, padding incl. ``"same"`` and non-zero
padding modes, and ``groups``): ``z = W ā`` at every output location, ``ā`` the input patch, channel-major
(``c_in/groups · k…``, matching ``weight.flatten()``).

With ``groups = g`` the output channels are split into ``g`` contiguous groups, each reading its own input channels:
the block is **one Kronecker product per group**, ``blockdiag_g(G_g ⊗ A_g)`` (``A_g`` over group ``g``'s patches,
``G_g`` over its output channels) — the curvature between weights of different groups is dropped. Depthwise
convolutions (``groups = c_in``) get one ``(k + 1)²`` ``A`` and a ``(c_out/c_in)²`` ``G`` per channel.

``Σ ā āᵀ`` of stride-1 zero-padded 1-D/2-D convolutions without groups (``approx="expand"``) comes from shifted
products of the input (``patch_moments``: 13 products instead of 81 block products for a 3×3 kernel); the other
convolutions unfold their patches, a few samples at a time (``limits.WORK_BUFFER_ELEMENTS``).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .. import limits
from ..capture import LayerCall
from ..layout import BlockLayout
from .base import forward_is, outputs_match
from .kronecker import KroneckerKind, KroneckerSums, block_has_bias, concat_locations
from .patch_moments import Geometry, patch_moments, patch_moments_elements

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def padding_amounts(module: nn.Module) -> list[int]:
    """A convolution's padding as ``F.pad`` takes it: ``[last axis before, after, previous axis before, after, …]``."""
    kernel, dilation = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pairs = [(0, 0)] * len(kernel)
        else:  # "same": PyTorch puts the extra element of an odd total on the right
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pairs = [(t // 2, t - t // 2) for t in totals]
    else:
        pairs = [(p, p) for p in module.padding]
    return [amount for pair in reversed(pairs) for amount in pair]


def unfold(inputs: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]) -> Tensor:
    """Patches of an already padded ``(N, C, *spatial)`` input as ``(N, T, C·prod(kernel))`` rows (channel-major)."""
    if len(kernel) <= 2:
        if len(kernel) == 1:  # a 1-D convolution is a 2-D one over a height-1 image
            inputs, kernel, dilation, stride = inputs.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
        return F.unfold(inputs, kernel, dilation=dilation, stride=stride).transpose(1, 2)
    patches = inputs
    for axis, (k, d, s) in enumerate(zip(kernel, dilation, stride)):
        patches = patches.unfold(2 + axis, d * (k - 1) + 1, s)
    patches = patches[(..., *(slice(None, None, d) for d in dilation))]  # (N, C, *out, *kernel)
    n, c, n_axes = patches.shape[0], patches.shape[1], len(kernel)
    out_axes = list(range(2, 2 + n_axes))
    patches = patches.permute(0, *out_axes, 1, *range(2 + n_axes, 2 + 2 * n_axes))
    return patches.reshape(n, -1, c * math.prod(kernel))


class ConvKind(KroneckerKind):
    name = "conv"

    def claims(self, module: nn.Module) -> bool:
        return any(isinstance(module, base) and forward_is(module, base) for base in CONVOLUTIONS)

    def layout(self, module: nn.Module) -> BlockLayout:
        groups = module.groups
        d_in = module.in_channels // groups * math.prod(module.kernel_size)
        return BlockLayout(module.out_channels // groups, d_in, block_has_bias(module), groups)

    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        n_spatial = len(module.kernel_size)
        if inputs.dim() != n_spatial + 2:
            raise ValueError(f"{type(module).__name__} got an input of shape {tuple(inputs.shape)}; a batched "
                             f"(N, C, {', '.join('DHW'[3 - n_spatial:])}) input is required")
        pad = padding_amounts(module)
        if any(pad):
            inputs = F.pad(inputs, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
        return unfold(inputs, module.kernel_size, module.dilation, module.stride)

    def output_rows(self, module: nn.Module, grads: Tensor) -> Tensor:
        k, n, channels = grads.shape[:3]
        return grads.reshape(k, n, channels, -1).transpose(2, 3)

    def _shifted(self, module: nn.Module, sums: KroneckerSums) -> Geometry | None:
        """The geometry when ``patch_moments`` applies: expand, one group, stride 1, zero padding, 1-D or 2-D."""
        if (sums.approx != "expand" or module.groups != 1 or any(s != 1 for s in module.stride)
                or module.padding_mode != "zeros" or len(module.kernel_size) > 2):
            return None
        return Geometry(tuple(module.kernel_size), tuple(module.dilation), tuple(padding_amounts(module)))

    def add_inputs(self, sums: KroneckerSums, module: nn.Module, inputs: list[Tensor]) -> None:
        """A few samples at a time, at most about ``limits.WORK_BUFFER_ELEMENTS`` elements of temporaries at once: a 3×3
        convolution's patches are 9× its input, and unfolding a whole batch of a wide layer would dominate the peak
        memory."""
        geometry = self._shifted(module, sums)
        per_sample = sum(patch_moments_elements(geometry, x) if geometry else self.input_rows(module, x[:1]).numel()
                         for x in inputs)
        chunk = max(1, limits.WORK_BUFFER_ELEMENTS // per_sample)
        for start in range(0, inputs[0].shape[0], chunk):
            if geometry:
                for x in inputs:
                    sums.add_moments(*patch_moments(geometry, x[start : start + chunk], sums.dtype))
            else:
                sums.add_rows(concat_locations([self.input_rows(module, x[start : start + chunk]) for x in inputs]))

    def reproduces(self, module: nn.Module, call: LayerCall) -> bool:
        return outputs_match(module._conv_forward(call.inputs, module.weight, module.bias), call.output_values)
