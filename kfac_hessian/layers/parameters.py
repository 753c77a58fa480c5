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

``M`` must compute each sample from that sample alone along axis 0 of its inputs; this is checked on the first batch
(the per-sample outputs must reproduce the recorded output) and a module that fails (batch statistics, dropout in
train mode, sequence-first layouts, operations ``vmap`` cannot run) is skipped with the reason. Cost: one more
forward and backward of ``M`` per backpropagated column.
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
        own = dict(own_parameters(module))
        self.params = {local: own[local] for local in local_names}
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
        if not self._verified and self.skip_reason is None:
            self._verified = True
            self._verify(calls[0])

    def _verify(self, call: LayerCall) -> None:
        """The per-sample re-run of the first ``VERIFY_SAMPLES`` samples must reproduce the recorded output."""
        n = call.output_shapes[0][0] if call.output_shapes else 0
        count = min(VERIFY_SAMPLES, n)
        expected = [leaf[:count] if leaf.shape[0] == n else leaf
                    for leaf in tree_flatten(call.output_values)[0] if differentiable(leaf)]
        try:
            with torch.no_grad():
                outputs = _per_sample_outputs(self.module, self._detached_params(), call, n, count)
        except Exception as error:  # noqa: BLE001 — any failure of the functional re-run means: not per-sample
            self.skip_reason = (f"its forward could not be re-run per sample under torch.func.vmap "
                                f"({type(error).__name__}: {str(error).splitlines()[0][:160]})")
            return
        if len(outputs) != len(expected) or not all(outputs_match(o, e.expand_as(o))
                                                    for o, e in zip(outputs, expected)):
            self.skip_reason = ("its forward does not compute each sample from that sample alone along axis 0 of its "
                                "inputs (batch statistics, dropout in train mode, or a sequence-first layout?)")

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


def _batched_inputs(call: LayerCall, n: int) -> tuple[list, object, list[int]]:
    """The call's inputs as pytree leaves, their structure, and which leaves carry the batch (axis 0 of size ``n``)."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    batched = [i for i, leaf in enumerate(leaves)
               if isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == n]
    return leaves, spec, batched


def _single_sample_forward(module: nn.Module, leaves: list, spec, batched: list[int]):
    """``(θ, *one sample of the batched leaves) ↦`` the module's differentiable outputs for that sample."""

    def forward(theta: dict[str, Tensor], *values: Tensor) -> tuple[Tensor, ...]:
        inputs = list(leaves)
        for i, value in zip(batched, values):
            inputs[i] = value.unsqueeze(0)  # a batch of one
        args, kwargs = tree_unflatten(inputs, spec)
        out = functional_call(module, theta, args, kwargs, strict=False)
        return tuple(leaf[0] for leaf in tree_flatten(out)[0] if differentiable(leaf))

    return forward


def _chunks(n: int, per_sample: int):
    size = max(1, limits.WORK_BUFFER_ELEMENTS // max(1, per_sample))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


@quiet_vmap_fallbacks()
def _per_sample_outputs(module: nn.Module, theta: dict[str, Tensor], call: LayerCall, n: int,
                        count: int) -> list[Tensor]:
    """The module's outputs for the first ``count`` of the call's ``n`` samples, one sample at a time (``vmap``)."""
    leaves, spec, batched = _batched_inputs(call, n)
    forward = _single_sample_forward(module, leaves, spec, batched)
    if not batched:  # nothing batched: every sample is the same computation
        return [o.unsqueeze(0).expand(count, *o.shape) for o in forward(theta)]
    return list(vmap(lambda *v: forward(theta, *v))(*[leaves[i][:count] for i in batched]))


@quiet_vmap_fallbacks()
def _per_sample_gradients(module: nn.Module, theta: dict[str, Tensor], call: LayerCall,
                          leaf_grads: list[Tensor]) -> dict[str, Tensor]:
    """``u[k, n] = (∂M(x_n)/∂θ)ᵀ g_{nk}`` for every parameter in ``theta``, as ``(K, N, *θ.shape)``."""
    k, n = leaf_grads[0].shape[:2]
    leaves, spec, batched = _batched_inputs(call, n)
    forward = _single_sample_forward(module, leaves, spec, batched)

    def one_sample(cotangents: tuple[Tensor, ...], *values: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(lambda th: forward(th, *values), theta)
        return pullback(cotangents)[0]

    in_dims = (0,) + (0,) * len(batched) if batched else (0,)
    per_sample = sum(t.numel() for t in theta.values()) + sum(g[0, 0].numel() for g in leaf_grads)
    out: dict[str, list[Tensor]] = {name: [] for name in theta}
    for column in range(k):
        pieces = []
        for start, stop in _chunks(n, per_sample):
            cotangents = tuple(g[column, start:stop] for g in leaf_grads)
            values = [leaves[i][start:stop] for i in batched]
            pieces.append(vmap(one_sample, in_dims=in_dims)(cotangents, *values))
        for name in theta:
            out[name].append(torch.cat([p[name] for p in pieces]))
    return {name: torch.stack(columns) for name, columns in out.items()}
