"""``compute_ekfac``: eigenvalue-corrected Kronecker blocks (EKFAC; George et al., NeurIPS 2018; ``blocks.ekfac``).

One more pass over the data after ``compute_kfac``: every Kronecker layer's per-sample (per-column) gradients are
formed in the eigenbasis of its ``G ⊗ A`` and their second moments replace the Kronecker eigenvalues. The other
blocks (normalization layers, per-sample parameter blocks) are exact already and are kept as they are.
"""

from __future__ import annotations

from torch import nn

from ..blocks import KroneckerBlock, eig_blocks
from ..data import Data, OutputSelector
from ..layers import KroneckerKind, Selection, select
from ..losses import loss_spec
from ..model_state import eager_model
from .driver import PassOptions, _Pass, _settings, stream_pass
from .result import KFAC


def compute_ekfac(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    curvature: str | None = None,
    kfac: KFAC | None = None,
    *,
    mc_samples: int = 1,
    seed: int | None = None,
    column_chunk: int | None = None,
    per_position: bool = False,
    position_signs: int = 0,
    batch_norm_eval: bool = True,
    progress: bool = False,
    distributed: bool = False,
    output: OutputSelector | None = None,
    **kfac_options,
) -> KFAC:
    """EKFAC blocks of every Kronecker layer of ``kfac`` (computed here with ``compute_kfac`` when not given), the
    other blocks of ``kfac`` unchanged.

    ``curvature`` (default: ``kfac``'s, else ``"ggn"``) chooses the per-sample columns of the correction pass as in
    ``compute_kfac``, as do ``mc_samples``, ``seed``, ``column_chunk``, ``per_position``, ``position_signs``,
    ``batch_norm_eval``, ``distributed`` and ``output``; ``kfac_options`` go to ``compute_kfac`` (``layers``,
    ``approx``, ``dtype``, …). For ``"ggn"`` with one output position per sample (or ``per_position=True``) every
    EKFAC block's trace equals the exact GGN block's. Cost: ``compute_kfac``, the factors' eigenvectors, and one pass
    whose backward passes are those of ``compute_kfac`` plus, per layer and column, products of the size of a weight
    gradient.
    """
    curvature = curvature or (kfac.curvature if kfac is not None else "ggn")
    if kfac is None:
        kfac = _kfac(model, loss_fn, data, curvature, mc_samples, seed, column_chunk, per_position, position_signs,
                     batch_norm_eval, progress, distributed, output, kfac_options)
    elif kfac_options:
        raise ValueError(f"{sorted(kfac_options)} configure compute_kfac, which does not run when kfac= is given")
    spec = loss_spec(loss_fn)
    model = eager_model(model)
    kronecker = [name for name, block in kfac.items() if isinstance(block, KroneckerBlock)]
    if not kronecker:
        raise ValueError("the KFAC result has no Kronecker block to correct")
    selection = select(model, kronecker)
    entries = [e for e in selection.entries if isinstance(e.kind, KroneckerKind) and e.module_name in kronecker]
    if len(entries) != len(kronecker):
        missing = sorted(set(kronecker) - {e.module_name for e in entries})
        raise ValueError(f"the model's layers {missing} are not the Kronecker layers the KFAC result was computed on")
    selection = Selection(entries)
    settings = _settings(selection, "expand", kfac[kronecker[0]].dtype)
    eigs = eig_blocks({name: kfac[name] for name in kronecker}, vectors=True)
    accumulators = {}
    for entry in entries:
        eig = eigs[entry.module_name]
        g_vectors = eig.factor_vectors("G", entry.kind.layout(entry.module).d_out)
        a_vectors = None if eig.a_is_diagonal else eig.factor_vectors("A", entry.kind.layout(entry.module).width)
        accumulators[entry.module_name] = entry.kind.ekfac_accumulator(entry.module_name, entry.module, settings,
                                                                       g_vectors, a_vectors)
    options = PassOptions(curvature, mc_samples, seed, column_chunk, per_position, position_signs, batch_norm_eval,
                          progress, distributed, output)
    pass_ = _Pass(model, accumulators, selection, settings, True, output, check_formulas=False)
    n_samples, scale = stream_pass(model, spec, data, pass_, options)
    corrected = pass_.result(scale, kfac[kronecker[0]].device, curvature, kfac.approx, spec, n_samples).blocks
    blocks = {name: corrected.get(name, block) for name, block in kfac.items()}
    return KFAC(blocks, curvature, kfac.approx, kfac.loss, kfac.reduction, n_samples, dict(kfac.skipped),
                dict(kfac.parameter_names), dict(kfac.counts), kfac.total_params, dict(kfac.tied))


def _kfac(model, loss_fn, data, curvature, mc_samples, seed, column_chunk, per_position, position_signs,
          batch_norm_eval, progress, distributed, output, kfac_options) -> KFAC:
    from .driver import compute_kfac

    return compute_kfac(model, loss_fn, data, curvature=curvature, mc_samples=mc_samples, seed=seed,
                        column_chunk=column_chunk, per_position=per_position, position_signs=position_signs,
                        batch_norm_eval=batch_norm_eval, progress=progress, distributed=distributed, output=output,
                        **kfac_options)
