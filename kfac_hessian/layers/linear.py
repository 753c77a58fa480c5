"""``nn.Linear``: ``z = W a + b`` on ``(N, *, d_in)`` inputs; the middle axes are the locations (``T = 1`` for
``(N, d_in)``), ``ā = [a; 1]`` the input row."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import LayerCall
from ..layout import BlockLayout
from .base import forward_is, outputs_match
from .kronecker import KroneckerKind, block_has_bias


def linear_rows(inputs: Tensor, d_in: int) -> Tensor:
    """``(N, *, d_in)`` as ``(N, T, d_in)`` rows (a view)."""
    if inputs.dim() < 2:
        raise ValueError(f"a linear layer got an unbatched input of shape {tuple(inputs.shape)}")
    return inputs.reshape(inputs.shape[0], -1, d_in)


def linear_output_rows(grads: Tensor) -> Tensor:
    """``(K, N, *, d_out)`` as ``(K, N, T, d_out)`` rows."""
    return grads.reshape(grads.shape[0], grads.shape[1], -1, grads.shape[-1])


class LinearKind(KroneckerKind):
    name = "linear"

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and forward_is(module, nn.Linear)

    def layout(self, module: nn.Module) -> BlockLayout:
        return BlockLayout(module.out_features, module.in_features, block_has_bias(module))

    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        return linear_rows(inputs, module.in_features)

    def output_rows(self, module: nn.Module, grads: Tensor) -> Tensor:
        return linear_output_rows(grads)

    def reproduces(self, module: nn.Module, call: LayerCall) -> bool:
        return outputs_match(F.linear(call.inputs, module.weight, module.bias), call.output_values)
