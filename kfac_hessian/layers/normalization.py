"""Normalization layers with affine parameters — ``BatchNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``
(and RMSNorm-like modules by registration): their **exact** curvature block.

Such a layer computes ``z = γ_f x̂ + β_f`` per feature ``f`` (channel for BatchNorm/GroupNorm, element of
``normalized_shape`` for LayerNorm/RMSNorm) at ``T`` positions per sample, ``x̂`` the normalized input (``β`` absent
for ``RMSNorm`` and ``LayerNorm(bias=False)``). ``γ`` and ``β`` do not enter the normalization statistics, so the
Jacobian of the output in ``(γ_f, β_f)`` is exactly ``(x̂, 1)`` at every position — in train mode too. With the
per-sample, per-column vectors

    u_{nk} = (Σ_t g_{nkft} x̂_{nft})_f  ⊕  (Σ_t g_{nkft})_f        (public order: γ's, then β's)

(``g`` the output gradients of ``compute_kfac``'s columns) the block is ``scale · Σ_{n,k} u uᵀ`` — for
``curvature="ggn"`` the exact GGN block, no approximation, when the model has one output position per sample or
with ``per_position=True`` (otherwise joint columns add cross-position terms, docs/conventions.md §3). It is kept
dense while ``P ≤ limits.DENSE_BLOCK_LIMIT`` (4096); wider layers keep the per-feature ``(γ_f, β_f)``
blocks (2×2, or 1×1 without ``β``: exact within each, cross-feature terms dropped).

``Σ_t`` runs over every position of sample ``n``, wherever the sample-axis probe found the samples
(``sample_layout``): axis 0, a sequence-first ``(T, N, C)`` tensor's axis 1, or rows flattened as ``(N·T, C)``;
a layer whose samples the probe did not find (or found on a feature axis) is skipped with the probe's reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import limits
from ..blocks import DenseBlocks
from ..capture import LayerCall
from ..sample_layout import SampleLayout, rows_layout
from .base import Accumulator, LayerKind, PassSettings, forward_is, outputs_match


def _batch_norm(module: nn.Module, x: Tensor) -> Tensor:
    use_batch = module.training or module.running_mean is None
    return F.batch_norm(x, None if use_batch else module.running_mean, None if use_batch else module.running_var,
                        None, None, use_batch, 0.0, module.eps)


def _rms_norm(module: nn.Module, x: Tensor) -> Tensor:
    return F.rms_norm(x, module.normalized_shape, None, module.eps)


class NormalizationKind(LayerKind):
    """``z = γ x̂ + β`` per feature (module docstring), for modules of ``types`` with their own ``forward``.

    ``normalize(module, x)`` gives ``x̂`` shaped like the output; ``channels_first``: the features are axis 1
    (BatchNorm, GroupNorm), else the trailing ``features(module)`` elements (LayerNorm, RMSNorm). Register one
    for an RMSNorm-like module (``docs/layer_kinds.md``)::

        kh.layers.register(kh.layers.NormalizationKind(
            "llama_rms_norm", [LlamaRMSNorm],
            normalize=lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)))
    """

    def __init__(self, name: str, types: list[type[nn.Module]] | tuple[type[nn.Module], ...],
                 normalize: Callable[[nn.Module, Tensor], Tensor], channels_first: bool = False,
                 own_forward_only: bool = False):
        self.name, self.types, self.normalize = name, tuple(types), normalize
        self.channels_first = channels_first
        self.own_forward_only = own_forward_only  # built-in kinds: a subclass that overrides forward is not claimed

    def claims(self, module: nn.Module) -> bool:
        if not isinstance(module, self.types) or getattr(module, "weight", None) is None:
            return False
        if not self.own_forward_only:
            return True
        return any(isinstance(module, t) and forward_is(module, t) for t in self.types)

    def rows(self, module: nn.Module, tensor: Tensor, lead: int = 1, layout: SampleLayout | None = None) -> Tensor:
        """A tensor shaped like the output, with ``lead`` leading axes (``(N, *)``, or ``(K, N, *)`` for a batch of
        columns), as ``(…, N, T, F)`` rows; ``layout``: where the samples are in the output (default: axis 0), which
        ``layout_reason`` accepts."""
        if layout is None or (layout.state == "axis" and layout.axis == 0):
            front = tensor.shape[:lead]
            if self.channels_first:
                return tensor.reshape(*front, tensor.shape[lead], -1).transpose(-1, -2)
            return tensor.reshape(*front, -1, module.weight.numel())
        front = tensor.shape[:lead - 1]
        if self.channels_first:  # features last first, so that the samples can be put first around them
            tensor = tensor.movedim(lead, -1)
            layout = layout if layout.axis < 1 else replace(layout, axis=layout.axis - 1)
        samples_first = layout.samples_first(tensor, lead - 1)
        return samples_first.reshape(*front, samples_first.shape[lead - 1], -1, module.weight.numel())

    def layout_reason(self, module: nn.Module, layout: SampleLayout, dim: int) -> str | None:
        """Why the samples, laid out as ``layout`` in an output of ``dim`` axes, do not give per-sample rows
        (``None``: they do)."""
        if not layout.carries_samples:
            return f"the sample-axis probe did not find the samples in its input or output: {layout.describe()}"
        features = range(1, 2) if self.channels_first else range(dim - module.weight.dim(), dim)
        if layout.state != "whole" and layout.axis in features:
            return f"the sample-axis probe found the {layout.describe()}, one of its feature axes"
        return None

    def reproduces(self, module: nn.Module, call: LayerCall) -> bool:
        if module.training and isinstance(module, nn.modules.batchnorm._BatchNorm):
            return True  # batch statistics: the checked samples alone would normalize differently
        x_hat = self.normalize(module, call.inputs)
        shape = (1, -1) + (1,) * (x_hat.dim() - 2) if self.channels_first else module.weight.shape
        expected = x_hat * module.weight.reshape(shape)
        if getattr(module, "bias", None) is not None:
            expected = expected + module.bias.reshape(shape)
        return outputs_match(expected, call.output_values)

    def accumulator(self, name: str, module: nn.Module, settings: PassSettings) -> NormSums:
        return NormSums(self, name, module, settings)


class NormSums(Accumulator):
    """Running ``Σ u uᵀ`` of one normalization layer: ``(P, P)``, or per-feature ``(F, p, p)`` above
    ``limits.DENSE_BLOCK_LIMIT`` (``p = 2`` with ``β``, 1 without)."""

    def __init__(self, kind: NormalizationKind, name: str, module: nn.Module, settings: PassSettings):
        self.kind, self.name, self.module = kind, name, module
        self.n_features = module.weight.numel()
        self.per_feature = 1 + int(getattr(module, "bias", None) is not None)  # (γ_f, β_f) or γ_f
        self.num_params = self.per_feature * self.n_features
        self.dense = self.num_params <= limits.DENSE_BLOCK_LIMIT
        shape = ((self.num_params, self.num_params) if self.dense
                 else (self.n_features, self.per_feature, self.per_feature))
        self.sums = torch.zeros(shape, dtype=settings.dtype, device=settings.device)
        self.calls = 0
        self._x_hat: Tensor | None = None
        self._layouts: list[SampleLayout | None] = []

    @property
    def called(self) -> bool:
        return self.calls > 0

    def add_inputs(self, calls: list[LayerCall]) -> None:
        self._layouts = []
        for call in calls:
            layout = rows_layout(call.input_layouts[0], call.output_layouts) if call.input_layouts else None
            reason = None if layout is None else self.kind.layout_reason(self.module, layout, call.inputs.dim())
            if reason is not None:
                self.skip_reason = reason
                return
            self._layouts.append(layout)
        rows = [self.kind.rows(self.module, _x_hat(self.kind, self.module, c), layout=layout)
                for c, layout in zip(calls, self._layouts)]
        self._x_hat = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
        self.calls += len(calls)
        for call in calls:
            call.args = call.kwargs = None

    def add_gradients(self, grads: list[list[Tensor]]) -> None:
        """Gradient rows of this batch's calls, matching ``add_inputs``'s ``x̂`` rows."""
        rows = [self.kind.rows(self.module, g[0], lead=2, layout=layout) for g, layout in zip(grads, self._layouts)]
        grad_rows = rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)  # (K, N, T, F)
        parts = [(grad_rows * self._x_hat).sum(2)]  # Σ_t g x̂
        if self.per_feature == 2:
            parts.append(grad_rows.sum(2))  # Σ_t g
        parts = [p.to(self.sums.dtype) for p in parts]
        if self.dense:
            u = torch.cat(parts, dim=-1).reshape(-1, self.num_params)
            self.sums.addmm_(u.T, u)
        else:
            u = torch.stack(parts, dim=-1)  # (K, N, F, p)
            self.sums += torch.einsum("knfa,knfb->fab", u, u)

    def state(self) -> list[Tensor]:
        return [self.sums]

    def set_state(self, tensors: list[Tensor]) -> None:
        (self.sums,) = tensors

    def finalize(self, scale: float, device) -> dict[str, DenseBlocks]:
        sums = self.sums.mul_(scale).to(device)
        what = "(γ, β)" if self.per_feature == 2 else "γ"
        if self.dense:
            block = DenseBlocks.dense(sums, f"normalization, dense {what} block of {self.n_features} features",
                                      self.name)
        elif self.per_feature == 2:
            block = DenseBlocks.paired(sums, f"normalization, {self.n_features} 2×2 (γ, β) blocks "
                                             "(cross-feature terms dropped)", self.name)
        else:
            block = DenseBlocks.diagonal(sums.reshape(-1), f"normalization, diagonal of the γ block of "
                                                           f"{self.n_features} features (cross-feature terms dropped)",
                                         self.name)
        return {self.name: block}


def _x_hat(kind: NormalizationKind, module: nn.Module, call: LayerCall) -> Tensor:
    """``x̂`` of a call, shaped like its output as the pass sees it (an unbatched call's expanded to the batch)."""
    x_hat = kind.normalize(module, call.inputs)
    return x_hat.expand(call.output_shapes[0]) if call.output_shapes and x_hat.shape != call.output_shapes[0] else x_hat


BATCH_NORM = NormalizationKind("batch_norm", [nn.modules.batchnorm._BatchNorm], _batch_norm, channels_first=True,
                               own_forward_only=True)
GROUP_NORM = NormalizationKind("group_norm", [nn.GroupNorm],
                               lambda m, x: F.group_norm(x, m.num_groups, None, None, m.eps),
                               channels_first=True, own_forward_only=True)
LAYER_NORM = NormalizationKind("layer_norm", [nn.LayerNorm],
                               lambda m, x: F.layer_norm(x, m.normalized_shape, None, None, m.eps),
                               own_forward_only=True)
RMS_NORM = NormalizationKind("rms_norm", [nn.RMSNorm], _rms_norm, own_forward_only=True)
