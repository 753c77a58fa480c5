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

from torch import nn

from ..blocks import KroneckerBlock
from ..data import Data
from ..layers import Entry, KroneckerKind, PerSampleStatistic, Selection, select
from ..losses import loss_spec
from ..model_state import eager_model
from .driver import PassOptions, _Pass, _settings, compute_kfac, stream_pass
from .result import KFAC


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


def base_kfac(model: nn.Module, loss_fn: nn.Module, data: Data, kfac: KFAC | None, options: PassOptions,
              kfac_options: dict) -> KFAC:
    """``kfac``, or ``compute_kfac`` with ``options`` and ``kfac_options`` when it is not given."""
    if kfac is not None:
        if kfac_options:
            raise ValueError(f"{sorted(kfac_options)} configure compute_kfac, which does not run when kfac= is given")
        return kfac
    return compute_kfac(model, loss_fn, data, curvature=options.curvature, mc_samples=options.mc_samples,
                        seed=options.seed, column_chunk=options.column_chunk, per_position=options.per_position,
                        position_signs=options.position_signs, batch_norm_eval=options.batch_norm_eval,
                        progress=options.progress, distributed=options.distributed, output=options.output,
                        **kfac_options)


def per_sample_pass(model: nn.Module, loss_fn: nn.Module, data: Data, kfac: KFAC,
                    statistics: Callable[[Entry, KroneckerBlock], PerSampleStatistic], options: PassOptions) -> KFAC:
    """``kfac`` with its Kronecker blocks replaced by those of ``statistics(entry, block)`` after one pass."""
    spec = loss_spec(loss_fn)
    model = eager_model(model)
    pairs = kronecker_entries(model, kfac)
    selection = Selection([entry for entry, _ in pairs])
    settings = _settings(selection, "expand", pairs[0][1].dtype)
    accumulators = {entry.module_name: entry.kind.per_sample_accumulator(entry.module_name, entry.module, settings,
                                                                         statistics(entry, block))
                    for entry, block in pairs}
    pass_ = _Pass(model, accumulators, selection, settings, True, options.output, check_formulas=False)
    n_samples, scale = stream_pass(model, spec, data, pass_, options)
    new = pass_.result(scale, pairs[0][1].device, options.curvature, kfac.approx, spec, n_samples).blocks
    blocks = {name: new.get(name, block) for name, block in kfac.items()}
    return KFAC(blocks, kfac.curvature, kfac.approx, kfac.loss, kfac.reduction, n_samples, dict(kfac.skipped),
                dict(kfac.parameter_names), dict(kfac.counts), kfac.total_params, dict(kfac.tied))
