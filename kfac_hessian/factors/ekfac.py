"""``compute_ekfac``: eigenvalue-corrected Kronecker blocks (EKFAC; George et al., NeurIPS 2018; ``blocks.ekfac``).

One more pass over the data after ``compute_kfac`` (``factors.per_sample``): every Kronecker layer's per-sample
gradients are taken in the eigenbasis ``V ⊗ U`` of its ``G ⊗ A`` and their second moments,
``Λ = scale · Σ_{n,k} (Vᵀ ∇W̄_{nk} U)²``, replace the Kronecker eigenvalues.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import CurvatureBlock, EKFACBlock, KroneckerBlock
from ..blocks.base import eig_blocks
from ..data import Data
from ..layers import Entry, PerSampleStatistic
from ..layout import BlockLayout
from .options import Curvature, PassOptions
from .per_sample import base_kfac, correction_options, per_sample_pass
from .result import KFAC


class EigenbasisSquares(PerSampleStatistic):
    """``Σ (Vᵀ ∇W̄ U)²`` per group: ``V`` ``(groups, d_out, d_out)``, ``U`` ``(groups, width, width)`` or ``None``
    for a diagonal ``A`` (``U = I``)."""

    def __init__(self, g_vectors: Tensor, a_vectors: Tensor | None, layout: BlockLayout, dtype, device):
        self.output_basis = g_vectors.to(device, dtype)
        self.input_basis = None if a_vectors is None else a_vectors.to(device, dtype)
        self.values = g_vectors.new_zeros((layout.groups, layout.d_out, layout.width), dtype=dtype, device=device)

    def add_outer(self, grads: Tensor, inputs: Tensor) -> None:
        self.values += torch.einsum("knbo,nbw->bow", grads.square(), inputs.square())  # Σ (g̃ ãᵀ)² = (g̃²)ᵀ ã²

    def add_matrices(self, matrices: Tensor) -> None:
        self.values += matrices.square().sum((0, 1))

    def add_token_columns(self, columns: Tensor, tokens: Tensor) -> None:
        self.values[0].index_add_(1, tokens, columns.square().T)

    def state(self) -> list[Tensor]:
        return [self.values]

    def set_state(self, tensors: list[Tensor]) -> None:
        (self.values,) = tensors

    def finalize(self, scale: float, device, layout: BlockLayout, name: str) -> dict[str, CurvatureBlock]:
        a = None if self.input_basis is None else self.input_basis.to(device)
        return {name: EKFACBlock(self.output_basis.to(device), a, self.values.mul_(scale).to(device), layout, name)}


def compute_ekfac(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    curvature: Curvature | None = None,
    kfac: KFAC | None = None,
    *,
    options: PassOptions | None = None,
    **arguments: Any,
) -> KFAC:
    """EKFAC blocks of every Kronecker layer of ``kfac`` (computed here with ``compute_kfac`` when not given), the
    other blocks of ``kfac`` unchanged.

    ``curvature`` (default: ``kfac``'s, else that of ``options``, ``"ggn"``) and the other pass options (``options``
    and/or ``PassOptions`` fields as keywords: ``mc_samples``, ``seed``, ``column_chunk``, ``per_position``,
    ``position_signs``, ``batch_norm_eval``, ``progress``, ``distributed``, ``output``) choose the per-sample columns
    of the correction pass as in ``compute_kfac``, and run ``compute_kfac`` when ``kfac`` is not given; the other
    ``arguments`` go to ``compute_kfac`` (``layers``, ``approx``, ``device``, ``dtype``). For ``"ggn"`` with one
    output position per sample (or ``per_position=True``) every EKFAC block is ``Q diag(Qᵀ H Q) Qᵀ`` for the exact
    GGN block ``H``: the same trace, and the nearest matrix to ``H`` in the Frobenius norm that is diagonal in the
    Kronecker eigenbasis ``Q`` (so never further from ``H`` than ``G ⊗ A``). Cost: ``compute_kfac``, the factors'
    eigenvectors, and one pass whose backward passes are those of ``compute_kfac`` plus, per layer and column,
    products of the size of a weight gradient.
    """
    options, kfac_arguments = correction_options(curvature, kfac, options, arguments)
    kfac = base_kfac(model, loss_fn, data, kfac, options, kfac_arguments)
    eigs = eig_blocks({name: block for name, block in kfac.items() if isinstance(block, KroneckerBlock)}, vectors=True,
                      progress=options.progress)

    def statistic(entry: Entry, block: KroneckerBlock) -> EigenbasisSquares:
        eig, layout = eigs[entry.module_name], block.layout
        a_vectors = None if eig.a_is_diagonal else eig.factor_vectors("A", layout.width)
        return EigenbasisSquares(eig.factor_vectors("G", layout.d_out), a_vectors, layout, block.dtype, block.device)

    return per_sample_pass(model, loss_fn, data, kfac, statistic, options, "EKFAC")
