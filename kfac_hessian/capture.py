"""Forward hooks that record every call of the selected modules during a curvature pass.

Output gradients are not taken with ``.grad`` or module backward hooks. In grad mode every floating-point
tensor output ``z`` of a recorded call (the leaves of its output structure) is returned to the model as
``z + anchor`` — a new tensor, with ``anchor`` a zero scalar leaf — so that

* in-place operations the model applies to a module's output (``ReLU(inplace=True)``) act on the new tensor
  and never change which tensor ``z`` is: gradients taken at ``z`` are gradients w.r.t. the module output;
* with ``on_gradient``, the gradient w.r.t. ``z`` is handed over *inside* the backward pass, from a pre-hook
  of the addition's autograd node, while backpropagating to the anchors alone: no output gradient outlives its
  use, and the backward stops at the first recorded module (nothing is computed for parameters).
  Without ``on_gradient`` the outputs ``z`` are kept for ``torch.autograd.grad`` (vectorized columns).

Output leaves named in ``LayerRecorder.expand`` (a module called on an unbatched input, its output of leading size 1
broadcast over the samples — or over ``R`` rows of every sample, as Swin's relative-position bias over its windows —
as the sample-axis probe found and verified) are expanded to the batch (``N·R`` rows) before they are handed on, in
every mode, so that their per-sample gradients are observable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .sample_layout import SampleLayout

GradientCallback = Callable[[str, int, int, Tensor], None]  # (name, call index, output leaf index, gradient)


def _detach(obj):
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, obj)


@dataclass
class LayerCall:
    """One call of a recorded module in a forward pass.

    ``args``/``kwargs``: its inputs, detached (released by the accumulator once used). ``output_shapes``: the shape
    of each anchored output leaf. ``outputs``: those leaves in the graph, kept unless the recorder streams
    gradients. ``output_values``: the detached outputs, kept only when the recorder verifies calls.
    ``input_layouts``/``output_layouts``: where the samples are in each input leaf (``tree_flatten((args, kwargs))``)
    and each anchored output leaf, set by the pass from the sample-axis probe (``sample_layout``).
    """

    args: tuple | None
    kwargs: dict | None
    output_shapes: list[torch.Size] = field(default_factory=list)
    outputs: list[Tensor] | None = None
    output_values: object = None
    input_layouts: list[SampleLayout] | None = None
    output_layouts: list[SampleLayout] | None = None

    @property
    def inputs(self) -> Tensor:
        """The first positional input (the layer input of every Kronecker and normalization kind)."""
        return self.args[0]


@dataclass
class RecordedRun:
    """One forward pass as the recorder saw it, kept to be handed back (``LayerRecorder.snapshot``/``restore``): the
    model's output in the graph, the recorded calls and the anchors of their outputs."""

    output: object
    calls: dict[str, list[LayerCall]]
    anchors: dict[tuple, Tensor]


class LayerRecorder:
    """Context manager recording ``LayerCall``s of ``modules``; hooks are removed on every exit path.

    ``on_gradient(name, call, leaf, grad)``: called during every backward pass through a recorded output with the
    gradient w.r.t. that output leaf (shaped like it); drive the pass with ``torch.autograd.grad(…, anchors)``.
    ``keep_values``: keep each call's detached outputs (``LayerCall.output_values``) for verification.
    ``expand``: ``(name, call index, output leaf index)`` of the leaves of leading size 1 to expand to ``batch_size``
    times the given rows per sample (module docstring); ``perturb``: a generator to add a random perturbation to the
    first sample's rows of every expanded leaf with (the probe's check that sample 0's copies reach sample 0 alone).
    """

    def __init__(self, modules: dict[str, nn.Module], on_gradient: GradientCallback | None = None):
        self.modules = modules
        self.on_gradient = on_gradient
        self.keep_values = False
        self.batch_size: int | None = None
        self.expand: dict[tuple[str, int, int], int] = {}
        self.perturb: torch.Generator | None = None
        self.calls: dict[str, list[LayerCall]] = {name: [] for name in modules}
        self._anchors: dict[tuple, Tensor] = {}
        self._handles: list = []
        self._paused = False

    @property
    def anchors(self) -> list[Tensor]:
        """The zero leaves added to the recorded outputs of the current forward pass."""
        return list(self._anchors.values())

    def _anchor(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._anchors:
            self._anchors[key] = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        return self._anchors[key]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Calls inside are not recorded (a module re-run for per-sample gradients)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output):
            if self._paused:
                return output
            call = LayerCall(_detach(args), _detach(kwargs),
                             output_values=_detach(output) if self.keep_values else None)
            self.calls[name].append(call)
            index, grad_mode = len(self.calls[name]) - 1, torch.is_grad_enabled()
            leaves, spec = tree_flatten(output)
            handed, position = [], 0
            for leaf in leaves:
                if differentiable(leaf):
                    if (name, index, position) in self.expand:
                        leaf = self._expanded(leaf, self.expand[name, index, position])
                    if grad_mode:
                        leaf = self._tap(name, call, leaf)
                    position += 1
                handed.append(leaf)
            return tree_unflatten(handed, spec) if grad_mode or self.expand else output

        return record

    def _expanded(self, leaf: Tensor, rows: int) -> Tensor:
        if leaf.shape[0] != 1 or self.batch_size is None:
            return leaf
        leaf = leaf.expand(self.batch_size * rows, *leaf.shape[1:])
        if self.perturb is not None:
            scale = float(leaf.detach().abs().max()) or 1.0
            noise = torch.randn(leaf.shape[1:], generator=self.perturb, dtype=leaf.dtype).to(leaf.device)
            leaf = torch.cat([leaf[:rows] + scale * noise, leaf[rows:]])
        return leaf

    def _tap(self, name: str, call: LayerCall, output: Tensor) -> Tensor:
        if not output.requires_grad:
            # Frozen module fed by inputs without grad: make its output a leaf we can differentiate at.
            output = output.detach().requires_grad_()
        tapped = output + self._anchor(output)
        leaf = len(call.output_shapes)
        call.output_shapes.append(output.shape)
        if self.on_gradient is None:
            call.outputs = [*(call.outputs or []), output]
        else:
            index, callback = len(self.calls[name]) - 1, self.on_gradient

            def deliver(grad_outputs: tuple) -> None:
                if grad_outputs[0] is not None:
                    callback(name, index, leaf, grad_outputs[0])

            tapped.grad_fn.register_prehook(deliver)
        return tapped

    def snapshot(self, output) -> RecordedRun:
        """The forward pass just recorded, with its ``output``, kept apart from the recorder's later passes."""
        return RecordedRun(output, {name: list(calls) for name, calls in self.calls.items()}, dict(self._anchors))

    def restore(self, run: RecordedRun) -> None:
        """Make ``run`` the current forward pass (its calls and anchors), as if it had just been recorded."""
        for name, calls in self.calls.items():
            calls[:] = run.calls.get(name, [])
        self._anchors = dict(run.anchors)

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()
        self._anchors.clear()

    def __enter__(self) -> LayerRecorder:
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


def differentiable(leaf) -> bool:
    return isinstance(leaf, Tensor) and leaf.is_floating_point() and leaf.dim() > 0
