"""``compute_kfac``: the curvature blocks of every selected layer, gathered in one streamed pass over the data.

For a Kronecker layer ``z = W̄ ā`` the block of the objective's Hessian (augmented row-major order, see ``layout``)
is approximated by ``G ⊗ A`` with

* ``A = mean of ā āᵀ`` over samples (and, with ``approx="expand"``, over the shared locations);
* ``G = scale · Σ g gᵀ``, ``g`` the output gradients of the *summed* loss backpropagated from a set of
  columns at the model output: the loss-Hessian square-root columns (``curvature="ggn"``), labels sampled
  from the model (``"mc"``), or the true labels (``"empirical"``).

Normalization layers and the parameters no Kronecker kind covers get exact blocks ``scale · Σ u uᵀ`` from their
per-sample gradients ``u`` (``layers.normalization``, ``layers.parameters``). ``scale`` makes every block
approximate the Hessian of exactly the objective ``loss_fn`` computes over the whole data set (``stream`` has its
table). Weight sharing (``T`` locations per sample): ``"expand"`` treats every location as a sample (``A`` averages
over ``N·T`` rows, ``G`` sums over all of them); ``"reduce"`` averages ``ā`` and sums ``g`` over the locations of
each sample first. A layer called several times in one forward pass contributes every call, as further locations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..data import Data
from ..layers import KroneckerKind, Selection, select
from ..losses import loss_spec
from ..model_state import eager_model
from .checks import warn_about_dropout, warn_about_zero_blocks
from .counting import parameter_counts
from .labels import label_blocks
from .options import Approx, Curvature, PassOptions, check_approx
from .plan import plan_pass
from .result import KFAC
from .stream import Pass, accumulators_for, forward_pass, pass_settings, stream_pass


def compute_kfac(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    curvature: Curvature | None = None,
    layers: list[str] | None = None,
    approx: Approx = "expand",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    options: PassOptions | None = None,
    **pass_options: Any,
) -> KFAC:
    """Curvature blocks of every selected layer (see the module docstring; the kinds: ``kfac_hessian.layers``).

    Args:
        model: any ``nn.Module`` (a ``torch.compile``'d one is unwrapped to its eager module); it runs as it is
            (except BatchNorm, see ``PassOptions.batch_norm_eval``) and is left as it was (modes, flags, ``.grad``).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (reduction mean/sum).
        data: an ``(inputs, targets)`` pair or an iterable of pairs, streamed batch by batch; ``inputs`` a tensor
            (``model(inputs)``) or a dict (``model(**inputs)``).
        curvature: ``"ggn"`` (the default), ``"mc"`` or ``"empirical"`` (``PassOptions.curvature``).
        layers: module names (from ``named_modules``), or parameter names for blocks of single parameters;
            ``None`` takes every trainable parameter.
        approx: weight-sharing approximation, ``"expand"`` or ``"reduce"``.
        device, dtype: where and in which precision the blocks are accumulated and kept (default: the
            model's; float32 for a bfloat16/float16 model). Forward and backward passes run on the model's device,
            under the caller's ``torch.autocast`` if any (our own sums are computed without it).
        options, pass_options: how the pass runs — a ``PassOptions``, and/or its fields as keywords
            (``mc_samples``, ``seed``, ``column_chunk``, ``per_position``, ``position_signs``, ``column_signs``,
            ``memory_budget``, ``time_budget``, ``batch_norm_eval``, ``progress``, ``distributed``, ``output``), which
            override the object's.

    The pass is planned first (``kfac_hessian.plan``: one forward of the first batch, no backward pass): a plan
    whose peak memory exceeds ``memory_budget`` (default: the memory available) or whose time estimate exceeds
    ``time_budget`` seconds (default ``limits.PASS_SECONDS_LIMIT``, an hour) raises
    ``PlanExceedsBudget`` (a ``ValueError``) naming the cheaper choices — ``curvature="mc"``, ``column_signs=R``,
    ``layers=`` without the largest factors, fewer positions.
    """
    check_approx(approx)
    options = PassOptions.build(options, **({"curvature": curvature} if curvature else {}), **pass_options)
    spec = loss_spec(loss_fn)
    model = eager_model(model)
    warn_about_dropout(model, options.seed)
    selection = select(model, layers)
    settings = pass_settings(selection, approx, dtype)
    cost, data = plan_pass(model, spec, data, selection, settings, options)
    cost.check()  # refused within seconds, before any backward pass, rather than failing or running for days
    pass_ = Pass(model, accumulators_for(selection, settings), selection, settings, layers is not None,
                 options.output)
    n_samples, scale, positions = stream_pass(model, spec, data, pass_, options)
    blocks, skipped, parameter_names = pass_.finalize(scale, device)
    label_blocks(blocks, options, positions)
    warn_about_zero_blocks({name: float(block.trace()) for name, block in blocks.items()})
    counted = parameter_counts(model, parameter_names, skipped)
    return KFAC(blocks, options.curvature, approx, spec.name, spec.reduction, n_samples, skipped, parameter_names,
                counted.counts, counted.total, counted.tied, counted.trainable, counted.covered_trainable)


def input_second_moments(
    model: nn.Module,
    data: Data,
    layers: list[str] | None = None,
    approx: Approx = "expand",
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The ``A`` factors alone, ``A = mean over rows of ā āᵀ`` (as in ``compute_kfac``), from forward passes only,
    for every Kronecker layer with vector inputs (``KroneckerKind.dense_inputs``: not embeddings); ``A`` is
    ``(groups, width, width)`` for a grouped convolution.

    No loss is evaluated (targets in ``data`` are ignored) and nothing is backpropagated: this is the local
    Hessian ``∇²_W ℓ = I ⊗ A`` of a block's back-matching loss (``analyses.local_hessian``) and costs one
    forward pass over the data.
    """
    check_approx(approx)
    model = eager_model(model)
    selection = select(model, layers)
    kronecker = [e for e in selection.entries if isinstance(e.kind, KroneckerKind) and e.kind.dense_inputs]
    if layers is not None and len(kronecker) != len(selection.entries):
        other = [n for e in selection.entries if e not in kronecker for n in e.block_names()]
        raise ValueError(f"{other} have no input second moments (only Kronecker layers with vector inputs do)")
    if not kronecker:
        raise ValueError(f"{type(model).__name__} has no Kronecker layer with vector inputs (Linear, Conv, …)")
    selection = Selection(kronecker, selection.skipped)
    settings = pass_settings(selection, approx, dtype)
    accumulators = accumulators_for(selection, settings)
    forward_pass(Pass(model, accumulators, selection, settings, True, output=None), data)
    missing = [acc.name for acc in accumulators.values() if not acc.called]
    if missing:
        raise ValueError(f"layers {missing} were never called in the model's forward pass")
    return {acc.name: acc.input_factor() for acc in accumulators.values()}
