"""Supported layers: what a layer's input and output look like as rows of a shared-weight product.

Every supported layer computes ``z = W ā`` at ``T`` locations per sample, with ``W`` the weight viewed as a
``(d_out, d_in)`` matrix (row-major, as ``weight.flatten()``) and ``ā`` the input at one location:

* ``nn.Linear`` on ``(N, *, d_in)``: the locations are the middle axes (``T = 1`` for ``(N, d_in)``);
* ``nn.Conv1d`` / ``nn.Conv2d``: the locations are the output positions and ``ā`` the unfolded input
  patch of width ``c_in·k`` / ``c_in·k_h·k_w`` (channel-major, matching ``weight.flatten()``).

``input_rows`` gives ``(N, T, d_in)`` and ``output_rows`` gives ``(K, N, T, d_out)`` for output gradients
carrying ``K`` backpropagated columns. The constant 1 for the bias is added by the factor code.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def unsupported_reason(module: nn.Module) -> str | None:
    """``None`` when the layer has Kronecker factors here, else why not."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"{type(module).__name__} with groups={module.groups} is not supported (only groups=1)"
        return None
    return (f"{type(module).__name__} is not a supported layer (supported: Linear, Conv1d, Conv2d; affine "
            "BatchNorm/LayerNorm/GroupNorm, Embedding and self-attention MultiheadAttention have their own blocks)")


def weight_matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)``: the weight as the matrix that multiplies ``ā`` (without the bias column)."""
    weight = module.weight
    return weight.shape[0], weight[0].numel()


def padding_amounts(module: nn.Module, n_spatial: int) -> list[int]:
    """A convolution's padding as ``F.pad`` takes it: ``[last axis before, after, previous axis before, after]``."""
    kernel, dilation = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pairs = [(0, 0)] * n_spatial
        else:  # "same": PyTorch puts the extra element of an odd total on the right
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pairs = [(t // 2, t - t // 2) for t in totals]
    else:
        pairs = [(p, p) for p in module.padding]
    return [amount for pair in reversed(pairs) for amount in pair]


def input_rows(module: nn.Module, inputs: Tensor) -> Tensor:
    """The layer input as ``(N, T, d_in)`` rows (unfolded patches for convolutions)."""
    if isinstance(module, nn.Linear):
        if inputs.dim() < 2:
            raise ValueError(f"Linear layer got an unbatched input of shape {tuple(inputs.shape)}")
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    n_spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if inputs.dim() != n_spatial + 2:
        raise ValueError(
            f"{type(module).__name__} got an input of shape {tuple(inputs.shape)}; a batched "
            f"(N, C, {'L' if n_spatial == 1 else 'H, W'}) input is required"
        )
    pad = padding_amounts(module, n_spatial)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        inputs = F.pad(inputs, pad, mode=mode)
    if n_spatial == 1:  # a Conv1d is a Conv2d over a height-1 image
        inputs = inputs.unsqueeze(2)
        kernel, dilation, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    patches = F.unfold(inputs, kernel, dilation=dilation, stride=stride)  # (N, d_in, T)
    return patches.transpose(1, 2)


def output_rows(module: nn.Module, grads: Tensor) -> Tensor:
    """Output gradients ``(K, N, *z.shape[1:])`` as ``(K, N, T, d_out)`` rows."""
    k, n = grads.shape[:2]
    if isinstance(module, nn.Linear):
        return grads.reshape(k, n, -1, grads.shape[-1])
    return grads.reshape(k, n, grads.shape[2], -1).transpose(2, 3)


def select_layers(
    model: nn.Module, layers: list[str] | tuple[str, ...] | None, allow_none: bool = False
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Pick the layers to factor: ``(selected, skipped)`` with a reason for every skipped module.

    ``layers=None`` takes every supported layer with at least one trainable parameter and lists the other
    parameterized modules as skipped. Named layers must exist and be supported (``ValueError`` otherwise).
    """
    modules = dict(model.named_modules())
    if layers is None:
        selected, skipped = {}, {}
        for name, module in modules.items():
            own_params = list(module.parameters(recurse=False))
            if not own_params:
                continue
            reason = unsupported_reason(module)
            if reason is None and not any(p.requires_grad for p in own_params):
                reason = "all its parameters are frozen (requires_grad=False); name it in layers= to include it"
            if reason is None:
                selected[name] = module
            else:
                skipped[name] = reason
        if not selected and not allow_none:
            raise ValueError(f"{type(model).__name__} has no supported layer (Linear, Conv1d, Conv2d); skipped: {skipped}")
        return selected, skipped
    if isinstance(layers, str):
        layers = [layers]
    if len(layers) == 0:
        raise ValueError("layers=[] selects nothing; pass None for every supported layer")
    selected = {}
    for name in layers:
        if name not in modules or name == "":
            candidates = [n for n, m in modules.items() if n and unsupported_reason(m) is None]
            raise ValueError(f"no layer named {name!r} in {type(model).__name__}; supported layers: {candidates}")
        reason = unsupported_reason(modules[name])
        if reason is not None:
            raise ValueError(f"layer {name!r}: {reason}")
        selected[name] = modules[name]
    return selected, {}
