"""Linear layers that store their weight transposed, ``z = x W + b`` with ``W`` of shape ``(d_in, d_out)``:
``transformers``' ``Conv1D`` (GPT-2 and its forks), recognised by its class name and its ``nf`` attribute —
transformers is never imported. Public order is ``weight.flatten()`` (input-major), then the bias
(``BlockLayout(transposed=True)``); the rows are those of ``nn.Linear``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..capture import LayerCall
from ..layout import BlockLayout
from .base import outputs_match
from .kronecker import KroneckerKind, block_has_bias
from .linear import linear_output_rows, linear_rows


class TransposedLinearKind(KroneckerKind):
    name = "transposed_linear"

    def claims(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
                and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf)

    def layout(self, module: nn.Module) -> BlockLayout:
        d_in, d_out = module.weight.shape
        return BlockLayout(d_out, d_in, block_has_bias(module), transposed=True)

    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        return linear_rows(inputs, module.weight.shape[0])

    def output_rows(self, module: nn.Module, grads: Tensor) -> Tensor:
        return linear_output_rows(grads)

    def reproduces(self, module: nn.Module, call: LayerCall) -> bool:
        expected = call.inputs @ module.weight
        if getattr(module, "bias", None) is not None:
            expected = expected + module.bias
        return outputs_match(torch.as_tensor(expected), call.output_values)
