"""Forward hooks that record every call of the selected layers, and the guard that keeps the model as it was.

The output gradients are not taken with backward hooks: the recorded layer *outputs* are differentiated
directly with ``torch.autograd.grad(..., is_grads_batched=True)``, which backpropagates many columns in one
vectorized pass and never touches ``.grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class LayerCall:
    """One call of a layer in a forward pass: its (detached) input and its output in the graph."""

    inputs: Tensor
    output: Tensor


class LayerRecorder:
    """Context manager recording ``LayerCall``s of ``modules``; hooks are removed on every exit path."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.calls: dict[str, list[LayerCall]] = {name: [] for name in modules}
        self._handles: list = []

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if not output.requires_grad:
                # Frozen layer fed by inputs without grad: make its output a leaf we can differentiate at.
                output = output.detach().requires_grad_()
            self.calls[name].append(LayerCall(args[0].detach(), output))
            return output

        return record

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()

    def __enter__(self) -> "LayerRecorder":
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, batch_norm_eval: bool = False) -> Iterator[None]:
    """Restore train/eval flags, ``requires_grad`` and ``.grad`` of every parameter, and the running statistics
    of every BatchNorm (a train-mode forward pass updates them), on exit — even on error.

    ``batch_norm_eval``: put every BatchNorm in eval mode inside (the curvature passes' default).
    """
    modes = [(m, m.training) for m in model.modules()]
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    statistics = [(b, b.detach().clone()) for m in batch_norms for b in m.buffers(recurse=False)]
    if batch_norm_eval:
        for module in batch_norms:
            module.eval()
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        with torch.no_grad():
            for buffer, value in statistics:
                buffer.copy_(value)
