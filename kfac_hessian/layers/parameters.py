"""Parameters no layer kind covers: free ``nn.Parameter``s (a ViT's class token and position embedding, ConvNeXt's
layer scale γ), the parameters of modules no registered kind claims (``transformers``' ``LlamaRMSNorm``), and those of
modules whose forward differs from their kind's formula (a subclass that overrides ``forward``, such as timm's
``LayerNorm2d``; a forward hook that changes the output). Their blocks are **exact**, not approximated.

For a parameter ``θ`` owned by module ``M``, the per-sample, per-column gradient is the vector–Jacobian product of
``M``'s own forward at sample ``n`` with the gradient ``g_{nk}`` at ``M``'s output,
``u_{nk} = (∂M(x_n)/∂θ)ᵀ g_{nk}``, computed by ``torch.func`` (``vjp`` under ``vmap`` over the samples, ``M`` re-run
functionally on its recorded inputs). The block is ``scale · Σ_{n,k} u uᵀ`` — for ``curvature="ggn"`` the exact GGN
block of ``θ`` (with one output position per sample, or ``per_position=True``) — kept dense while
``P ≤ limits.DENSE_BLOCK_LIMIT`` (4096) and as its exact diagonal above, each parameter a block of its own.

The samples of every input and output leaf are where the sample-axis probe found them (``factors/sample_axis.py``:
axis 0, a sequence-first axis 1, rows flattened as ``(N·T, d)``, …): ``vmap`` runs over that axis, each sample
presented to ``M`` as a batch of one in the same layout; leaves every sample shares are passed whole. A call whose
samples the probe did not find is skipped with the probe's reason. ``M`` must compute each sample from that sample
alone; this is checked on the first batch (the per-sample outputs must reproduce the recorded output) and a module
that fails (batch statistics, dropout in train mode, operations ``vmap`` cannot run) is skipped with the reason.
Cost: one more forward and backward of ``M`` per backpropagated column.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import limits
from ..blocks import DenseBlocks
from ..capture import LayerCall, differentiable
from ..model_state import quiet_vmap_fallbacks
from ..sample_layout import SampleLayout
from .base import Accumulator, PassSettings, outputs_match

VERIFY_SAMPLES = 2  # samples of the first batch re-run to check that the module computes each sample alone


def full_name(module_name: str, local: str) -> str:
    return f"{module_name}.{local}" if module_name else local


def own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable tensors ``module`` owns, by local name: its own parameters and, when a tensor of it is computed
    by a parametrization (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``, ``orthogonal``, …),
    the parametrization's originals (``parametrizations.weight.original0``, …), which are what training changes."""
    own = list(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        own += [(f"parametrizations.{tensor}.{local}", p) for tensor, originals in module.parametrizations.items()
                for local, p in originals.named_parameters(recurse=False)]
    return own


def is_parametrization(module: nn.Module) -> bool:
    """Whether ``module`` holds the originals of a parametrized tensor (they belong to the module it parametrizes)."""
    return isinstance(module, parametrize.ParametrizationList)


class ParameterSums(Accumulator):
    """``Σ u uᵀ`` (or ``Σ u²``) of each of ``module``'s parameters ``local_names`` (module docstring); ``origin`` says
    why they are here (it starts every block's ``describe()``)."""

    streams = False  # the vjps run after each backward pass, on the module's recorded inputs

    def __init__(self, name: str, module: nn.Module, local_names: list[str], origin: str, settings: PassSettings):
        self.name, self.module, self.origin = name, module, origin
        # dotted names: a parametrization's originals, or a child's parameters its parent uses functionally
        self.params = {local: module.get_parameter(local) for local in local_names}
        self.sums = {}
        for local, p in self.params.items():
            shape = (p.numel(), p.numel()) if p.numel() <= limits.DENSE_BLOCK_LIMIT else (p.numel(),)
            self.sums[local] = torch.zeros(shape, dtype=settings.dtype, device=settings.device)
        self._calls: list[LayerCall] = []
        self._count = 0
        self._verified = False

    @property
    def called(self) -> bool:
        return self._count > 0

    def block_names(self) -> list[str]:
        return [full_name(self.name, local) for local in self.params]

    def add_inputs(self, calls: list[LayerCall]) -> None:
        self._calls = calls  # kept until the next batch: every backward pass of this one needs them
        self._count += len(calls)
        for call in calls:
            try:
                _sample_leaves(call)
            except SampleAxisUnknown as error:
                self.skip_reason = f"the sample-axis probe did not find the samples of its {error}"
                return
        if not self._verified and self.skip_reason is None:
            self._verified = True
            self._verify(calls[0])

    def _verify(self, call: LayerCall) -> None:
        """The per-sample re-run of the first ``VERIFY_SAMPLES`` samples must reproduce the recorded output."""
        outputs = _sample_leaves(call)[3]
        count = min(VERIFY_SAMPLES, 1 if outputs[0].state == "whole" else outputs[0].samples)
        # an unbatched call's output (leading size 1, expanded to the batch for the pass) is one sample's output
        expected = [layout.samples_first(leaf)[:count] if layout.fits(leaf) else leaf
                    for leaf, layout in zip([v for v in tree_flatten(call.output_values)[0] if differentiable(v)],
                                            outputs)]
        try:
            with torch.no_grad():
                outputs = _per_sample_outputs(self.module, self._detached_params(), call, count)
        except Exception as error:  # noqa: BLE001 — any failure of the functional re-run means: not per-sample
            self.skip_reason = (f"its forward could not be re-run per sample under torch.func.vmap "
                                f"({type(error).__name__}: {str(error).splitlines()[0][:160]})")
            return
        if len(outputs) != len(expected) or not all(outputs_match(o, e.expand_as(o))
                                                    for o, e in zip(outputs, expected)):
            self.skip_reason = ("its forward does not compute each sample from that sample alone where the sample-axis "
                                "probe found the samples (batch statistics or dropout in train mode?)")

    def _detached_params(self) -> dict[str, Tensor]:
        # copies: a forward that writes to its parameters (Embedding(max_norm) renormalizes rows) must not reach the
        # model
        return {local: p.detach().clone() for local, p in self.params.items()}

    def add_gradients(self, grads: list[list[Tensor]]) -> None:
        if self.skip_reason is not None:
            return
        per_sample: dict[str, Tensor] = {}
        for call, leaf_grads in zip(self._calls, grads):
            for local, u in _per_sample_gradients(self.module, self._detached_params(), call, leaf_grads).items():
                per_sample[local] = u if local not in per_sample else per_sample[local] + u
        for local, u in per_sample.items():
            # detached: a forward that also uses parameters outside theta (the real, trainable ones) would leave an
            # autograd graph on the gradients and keep it alive in the block
            flat = u.detach().reshape(-1, self.params[local].numel()).to(self.sums[local].dtype)
            if self.sums[local].dim() == 2:
                self.sums[local].addmm_(flat.T, flat)
            else:
                self.sums[local] += flat.square().sum(0)

    def state(self) -> list[Tensor]:
        return list(self.sums.values())

    def set_state(self, tensors: list[Tensor]) -> None:
        self.sums = dict(zip(self.sums, tensors))

    def finalize(self, scale: float, device) -> dict[str, DenseBlocks]:
        blocks = {}
        for local, sums in self.sums.items():
            block_name = full_name(self.name, local)
            sums = sums.mul_(scale).to(device)
            if sums.dim() == 2:
                blocks[block_name] = DenseBlocks.dense(sums, f"{self.origin}: dense block (per-sample gradients)",
                                                       block_name)
            else:
                blocks[block_name] = DenseBlocks.diagonal(
                    sums, f"{self.origin}: diagonal (per-sample gradients; P above {limits.DENSE_BLOCK_LIMIT}, "
                          "cross terms dropped)", block_name)
        return blocks


def _sample_leaves(call: LayerCall) -> tuple[list, object, list[tuple[int, SampleLayout]], list[SampleLayout]]:
    """The call's inputs as pytree leaves, their structure, the leaves that carry the samples (with where), and where
    the samples are in each differentiable output leaf. A leaf the probe found the same for every sample
    (``constant``) takes the layout of the call's other leaves when its shape allows, else it is passed whole; the
    first-batch check (``_verify``) catches a wrong guess."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    found = [layout for layout in (*call.input_layouts, *call.output_layouts) if layout.carries_samples]
    guess = found[0] if found else None

    def resolved(layout: SampleLayout, tensor: Tensor | None) -> SampleLayout:
        if layout.state == "constant" and guess is not None and tensor is not None and guess.fits(tensor):
            return guess
        return layout

    batched = []
    for i, (leaf, layout) in enumerate(zip(leaves, call.input_layouts)):
        if isinstance(leaf, Tensor) and resolved(layout, leaf).carries_samples:
            batched.append((i, resolved(layout, leaf)))
        elif layout.state == "unknown":
            raise SampleAxisUnknown(f"input {i}: {layout.describe()}")
    shapes = [torch.empty(shape, device="meta") for shape in call.output_shapes]
    outputs = [resolved(layout, shape) for layout, shape in zip(call.output_layouts, shapes)]
    for i, layout in enumerate(outputs):
        if not layout.carries_samples:
            raise SampleAxisUnknown(f"output {i}: {layout.describe()}")
    return leaves, spec, batched, outputs


class SampleAxisUnknown(ValueError):
    """The sample-axis probe did not find where a call's samples are."""


def _single_sample_forward(module: nn.Module, leaves: list, spec, batched: list[tuple[int, SampleLayout]],
                           outputs: list[SampleLayout], shapes: list[torch.Size]):
    """``(θ, *one sample of the batched leaves) ↦`` the module's differentiable outputs for that sample; an unbatched
    call's output (expanded to ``N·R`` rows for the pass, ``shapes``) as that sample's ``R`` copies of it."""
    copies = [shape[layout.axis] // layout.samples if layout.state == "rows" else None
              for layout, shape in zip(outputs, shapes)]

    def one_sample(leaf: Tensor, layout: SampleLayout, rows: int | None) -> Tensor:
        leaf = layout.from_batch_of_one(leaf)
        if rows is not None and leaf.shape[layout.axis] != rows:
            leaf = leaf.expand(*leaf.shape[:layout.axis], rows, *leaf.shape[layout.axis + 1:])
        return leaf

    def forward(theta: dict[str, Tensor], *values: Tensor) -> tuple[Tensor, ...]:
        inputs = list(leaves)
        for (i, layout), value in zip(batched, values):
            inputs[i] = layout.as_batch_of_one(value)
        args, kwargs = tree_unflatten(inputs, spec)
        out = functional_call(module, theta, args, kwargs, strict=False)
        leaves_out = [leaf for leaf in tree_flatten(out)[0] if differentiable(leaf)]
        return tuple(one_sample(leaf, layout, rows) for leaf, layout, rows in zip(leaves_out, outputs, copies))

    return forward


def _old_style_function(error: RuntimeError) -> bool:
    """torch.func refuses an old-style ``torch.autograd.Function`` (no ``setup_context``: BLOOM's ``GeLUFunction``):
    such a module is run one sample at a time with plain ``torch.autograd`` instead of under ``vmap`` (same values)."""
    return "setup_context" in str(error)


def _chunks(n: int, per_sample: int):
    size = max(1, limits.WORK_BUFFER_ELEMENTS // max(1, per_sample))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


@quiet_vmap_fallbacks()
def _per_sample_outputs(module: nn.Module, theta: dict[str, Tensor], call: LayerCall, count: int) -> list[Tensor]:
    """The module's outputs for the first ``count`` of the call's samples, one sample at a time (``vmap``), samples
    first."""
    leaves, spec, batched, outputs = _sample_leaves(call)
    forward = _single_sample_forward(module, leaves, spec, batched, outputs, call.output_shapes)
    if not batched:  # nothing batched: every sample is the same computation
        return [o.unsqueeze(0).expand(count, *o.shape) for o in forward(theta)]
    values = [layout.samples_first(leaves[i])[:count] for i, layout in batched]
    try:
        return list(vmap(lambda *v: forward(theta, *v))(*values))
    except RuntimeError as error:
        if not _old_style_function(error):
            raise
    each = [forward(theta, *(value[i] for value in values)) for i in range(count)]  # without torch.func
    return [torch.stack(leaf) for leaf in zip(*each)]


@quiet_vmap_fallbacks()
def _per_sample_gradients(module: nn.Module, theta: dict[str, Tensor], call: LayerCall,
                          leaf_grads: list[Tensor]) -> dict[str, Tensor]:
    """``u[k, n] = (∂M(x_n)/∂θ)ᵀ g_{nk}`` for every parameter in ``theta``, as ``(K, N, *θ.shape)``, for the gradients
    ``(K, *leaf.shape)`` of every output leaf."""
    leaves, spec, batched, outputs = _sample_leaves(call)
    forward = _single_sample_forward(module, leaves, spec, batched, outputs, call.output_shapes)
    leaf_grads = [layout.samples_first(g, 1) for g, layout in zip(leaf_grads, outputs)]
    k, n = leaf_grads[0].shape[:2]
    samples = [layout.samples_first(leaves[i]) for i, layout in batched]

    def one_sample(cotangents: tuple[Tensor, ...], *values: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(lambda th: forward(th, *values), theta)
        return pullback(cotangents)[0]

    def one_sample_by_autograd(cotangents: tuple[Tensor, ...], *values: Tensor) -> dict[str, Tensor]:
        params = {name: t.detach().requires_grad_() for name, t in theta.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(forward(params, *values), list(params.values()), cotangents,
                                        allow_unused=True)
        return {name: torch.zeros_like(t) if g is None else g for (name, t), g in zip(theta.items(), grads)}

    vmappable = [True]  # once vmap refuses the module, every later chunk and column goes straight to the loop

    def pulled_back(cotangents: tuple[Tensor, ...], values: list[Tensor]) -> dict[str, Tensor]:
        if vmappable[0]:
            try:
                return vmap(one_sample, in_dims=in_dims)(cotangents, *values)
            except RuntimeError as error:
                if not _old_style_function(error):
                    raise
                vmappable[0] = False
        each = [one_sample_by_autograd(tuple(c[i] for c in cotangents), *(v[i] for v in values))
                for i in range(len(cotangents[0]))]
        return {name: torch.stack([e[name] for e in each]) for name in theta}

    in_dims = (0,) + (0,) * len(batched) if batched else (0,)
    per_sample = sum(t.numel() for t in theta.values()) + sum(g[0, 0].numel() for g in leaf_grads)
    out: dict[str, list[Tensor]] = {name: [] for name in theta}
    for column in range(k):
        pieces = []
        for start, stop in _chunks(n, per_sample):
            cotangents = tuple(g[column, start:stop] for g in leaf_grads)
            values = [value[start:stop] for value in samples]
            pieces.append(pulled_back(cotangents, values))
        for name in theta:
            out[name].append(torch.cat([p[name] for p in pieces]))
    return {name: torch.stack(columns) for name, columns in out.items()}
