"""Forward hooks that record every call of the selected layers, and the guard that keeps the model as it was.

Output gradients are not taken with ``.grad`` or module backward hooks. In grad mode every recorded output
``z`` is returned to the model as ``z + anchor`` — a new tensor, with ``anchor`` a zero scalar leaf — so that

* in-place operations the model applies to a layer's output (``ReLU(inplace=True)``) act on the new tensor
  and never change which tensor ``z`` is: gradients taken at ``z`` are gradients w.r.t. the layer output;
* with ``on_gradient``, the gradient w.r.t. ``z`` is handed over *inside* the backward pass, from a pre-hook
  of the addition's autograd node, while backpropagating to the anchors alone: no layer's output gradient
  outlives its use, and the backward stops at the first recorded layer (nothing is computed for parameters).
  Without ``on_gradient`` the outputs ``z`` are kept for ``torch.autograd.grad`` (vectorized columns).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

GradientCallback = Callable[[str, int, Tensor], None]


@dataclass
class LayerCall:
    """One call of a layer in a forward pass: its (detached) input, its output's shape and, unless the recorder
    streams gradients, the output ``z`` in the graph."""

    inputs: Tensor | None
    output_shape: torch.Size
    output: Tensor | None = None


class LayerRecorder:
    """Context manager recording ``LayerCall``s of ``modules``; hooks are removed on every exit path.

    ``on_gradient(name, call_index, grad)``: called during every backward pass through a recorded output with
    the gradient w.r.t. that output (shaped like it); drive the pass with ``torch.autograd.grad(…, anchors)``.
    """

    def __init__(self, modules: dict[str, nn.Module], on_gradient: GradientCallback | None = None):
        self.modules = modules
        self.on_gradient = on_gradient
        self.calls: dict[str, list[LayerCall]] = {name: [] for name in modules}
        self._anchors: dict[tuple, Tensor] = {}
        self._handles: list = []

    @property
    def anchors(self) -> list[Tensor]:
        """The zero leaves added to the recorded outputs of the current forward pass."""
        return list(self._anchors.values())

    def _anchor(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._anchors:
            self._anchors[key] = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        return self._anchors[key]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            call = LayerCall(args[0].detach(), output.shape)
            self.calls[name].append(call)
            if not torch.is_grad_enabled():
                return output
            if not output.requires_grad:
                # Frozen layer fed by inputs without grad: make its output a leaf we can differentiate at.
                output = output.detach().requires_grad_()
            tapped = output + self._anchor(output)
            if self.on_gradient is None:
                call.output = output
            else:
                index, callback = len(self.calls[name]) - 1, self.on_gradient

                def deliver(grad_outputs: tuple) -> None:
                    if grad_outputs[0] is not None:
                        callback(name, index, grad_outputs[0])

                tapped.grad_fn.register_prehook(deliver)
            return tapped

        return record

    def release_inputs(self, name: str) -> None:
        """Forget the inputs of ``name``'s calls once they are used: the graph keeps what the backward needs and
        frees it as the backward passes, which a reference held here would prevent."""
        for call in self.calls[name]:
            call.inputs = None

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()
        self._anchors.clear()

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
