"""One more pass over the data after ``compute_kfac`` for methods built on the per-sample gradients of the Kronecker
layers (``compute_ekfac``, ``compute_kronecker_fit``): each layer's ``PerSampleStatistic``
(``layers.kronecker``) receives ``∇W̄_{nk} = Σ_t g_{nkt} ā_{nt}ᵀ`` for every sample ``n`` and output column ``k``
(the columns of ``compute_kfac``: loss-Hessian square roots, sampled labels or the true labels), and its blocks
replace the Kronecker ones. The blocks of other kinds (normalization, per-sample parameter blocks) are exact already
and are kept.

Which curvature the per-sample gradients represent is that of the columns: for ``"ggn"`` with one output position per
sample (or ``per_position=True``) ``scale · Σ_{n,k} vec(∇W̄_{nk}) vec(∇W̄_{nk})ᵀ`` is the exact GGN block; with
``position_signs`` an unbiased estimate of it; with the joint columns of sequence outputs it carries their
cross-position terms (docs/conventions.md §3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..blocks import KroneckerBlock
from ..data import Data
from ..layers import Entry, KroneckerKind, LayerKind, PerSampleStatistic, Selection, select
from ..losses import loss_spec
from ..model_state import eager_model
from .driver import compute_kfac
from .labels import label_blocks
from .options import PassOptions, split_pass_options
from .result import KFAC
from .stream import Pass, pass_settings, stream_pass


def kronecker_entries(model: nn.Module, kfac: KFAC) -> list[tuple[Entry, KroneckerBlock]]:
    """The model's Kronecker layers that ``kfac`` holds Kronecker blocks of, with those blocks."""
    names = [name for name, block in kfac.items() if isinstance(block, KroneckerBlock)]
    if not names:
        raise ValueError("the KFAC result has no Kronecker block")
    entries = [e for e in select(model, names).entries if isinstance(e.kind, KroneckerKind) and e.module_name in names]
    if len(entries) != len(names):
        missing = sorted(set(names) - {e.module_name for e in entries})
        raise ValueError(f"the model's layers {missing} are not the Kronecker layers the KFAC result was computed on")
    return [(entry, kfac[entry.module_name]) for entry in entries]


def routing_entries(model: nn.Module, kfac: KFAC) -> list[Entry]:
    """The model's layers whose kind reroutes their forward for a pass (``LayerKind.pass_context``:
    ``MultiheadAttention`` calls ``out_proj`` as a module only then) but whose blocks in ``kfac`` are kept
    (cross-attention's ``BlockDiagonal``). They join the per-sample pass with their plain accumulators, whose blocks
    are dropped, so that the layers they route (``out_proj``) are called as modules there as in ``compute_kfac``."""
    kept = [name for name, block in kfac.items() if not isinstance(block, KroneckerBlock)]
    if not kept:
        return []
    return [e for e in select(model, kept).entries if e.module_name in kept and e.kind is not None
            and type(e.kind).pass_context is not LayerKind.pass_context]


def correction_options(curvature: str | None, kfac: KFAC | None, options: PassOptions | None,
                       arguments: dict[str, Any]) -> tuple[PassOptions, dict[str, Any]]:
    """The options of a per-sample pass — ``curvature`` when given, else ``kfac``'s, else that of ``options``
    (default ``"ggn"``), and the ``PassOptions`` fields among ``arguments`` — and the rest of ``arguments``, for
    ``compute_kfac`` (``layers``, ``approx``, ``device``, ``dtype``)."""
    fields, kfac_arguments = split_pass_options(arguments)
    if curvature is None and kfac is not None:
        curvature = kfac.curvature
    return PassOptions.build(options, **({"curvature": curvature} if curvature else {}), **fields), kfac_arguments


def base_kfac(model: nn.Module, loss_fn: nn.Module, data: Data, kfac: KFAC | None, options: PassOptions,
              kfac_arguments: dict[str, Any]) -> KFAC:
    """``kfac``, or ``compute_kfac`` with ``options`` and ``kfac_arguments`` when it is not given."""
    if kfac is None:
        return compute_kfac(model, loss_fn, data, options=options, **kfac_arguments)
    if kfac_arguments:
        raise ValueError(f"{sorted(kfac_arguments)} configure compute_kfac, which does not run when kfac= is given")
    return kfac


def per_sample_pass(model: nn.Module, loss_fn: nn.Module, data: Data, kfac: KFAC,
                    statistics: Callable[[Entry, KroneckerBlock], PerSampleStatistic], options: PassOptions,
                    approximation: str) -> KFAC:
    """``kfac`` with its Kronecker blocks replaced by those of ``statistics(entry, block)`` after one pass;
    ``approximation`` names what the new blocks are (their ``status``)."""
    spec = loss_spec(loss_fn)
    model = eager_model(model)
    pairs = kronecker_entries(model, kfac)
    routers = routing_entries(model, kfac)
    selection = Selection([entry for entry, _ in pairs] + routers)
    settings = pass_settings(selection, "expand", pairs[0][1].dtype)
    accumulators = {entry.module_name: entry.kind.per_sample_accumulator(entry.module_name, entry.module, settings,
                                                                         statistics(entry, block))
                    for entry, block in pairs}
    accumulators |= {entry.module_name: entry.kind.accumulator(entry.module_name, entry.module, settings)
                     for entry in routers}
    pass_ = Pass(model, accumulators, selection, settings, True, options.output, check_formulas=False)
    n_samples, scale, positions = stream_pass(model, spec, data, pass_, options)
    new, _, _ = pass_.finalize(scale, pairs[0][1].device)
    new = {entry.module_name: new[entry.module_name] for entry, _ in pairs if entry.module_name in new}
    label_blocks(new, options, positions, approximation)
    return kfac.with_blocks({name: new.get(name, block) for name, block in kfac.items()}, n_samples=n_samples)
