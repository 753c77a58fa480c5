"""EKFAC blocks built directly: ``Q diag(Λ) Qᵀ`` in the Kronecker eigenbasis — the Kronecker block itself when ``Λ``
holds the products of the factors' eigenvalues, and with any ``Λ`` a matrix whose spectrum is ``Λ``."""

from __future__ import annotations

import pytest
import torch

from kfac_hessian.blocks import EKFACBlock, KroneckerBlock
from kfac_hessian.layout import BlockLayout

from ..conftest import psd
from ..references import check_factor_spectra, public_kron


def _eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(matrices)
    return values, vectors


@pytest.mark.parametrize("layout", [BlockLayout(3, 4, True), BlockLayout(2, 3, False, groups=3)])
def test_product_eigenvalues_give_back_the_kronecker_block(layout):
    A = psd(layout.width, layout.groups, seed=1)
    G = psd(layout.d_out, layout.groups, seed=2)
    (a_values, U), (g_values, V) = _eigh(A), _eigh(G)
    block = EKFACBlock(V, U, g_values[:, :, None] * a_values[:, None, :], layout, "e")
    kronecker = KroneckerBlock(A if layout.groups > 1 else A[0], G if layout.groups > 1 else G[0], layout, "k")
    assert torch.allclose(block.to_dense(), kronecker.to_dense(), atol=1e-13)
    if layout.groups == 1 and layout.has_bias:  # against the Kronecker product written out as well
        assert torch.allclose(block.to_dense(), public_kron(G[0], A[0], True), atol=1e-13)


def test_a_diagonal_a_has_the_unit_vectors_as_its_basis():
    layout = BlockLayout(3, 5, False, transposed=True)  # an embedding: vocabulary 5, dim 3
    a = torch.rand(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    G = psd(3, seed=4)
    g_values, V = _eigh(G[None])
    block = EKFACBlock(V, None, g_values[:, :, None] * a[None, None, :], layout, "embed")
    assert torch.allclose(block.to_dense(), KroneckerBlock(a, G, layout, "k").to_dense(), atol=1e-13)


def test_any_eigenvalues_are_the_spectrum_and_the_eigenvectors_are_rank_one():
    layout = BlockLayout(3, 4, True)
    (_, U), (_, V) = _eigh(psd(5, 1, seed=5)), _eigh(psd(3, 1, seed=6))
    values = torch.rand(1, 3, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    block = EKFACBlock(V, U, values, layout, "e")
    dense = block.to_dense()
    assert torch.allclose(dense, dense.T, atol=1e-14)
    check_factor_spectra(block, dense, k=4)
    assert torch.allclose(torch.linalg.eigvalsh(dense).flip(0), values.flatten().sort(descending=True).values,
                          atol=1e-13)
    pairs = block.eig().top_pairs(4)
    _, vectors = block.eig().topk(4)
    for n in range(4):
        w_bar = torch.outer(pairs.g_vectors[n], pairs.a_vectors[n])  # [W b]
        assert torch.allclose(torch.cat([w_bar[:, :-1].flatten(), w_bar[:, -1]]), vectors[n], atol=1e-14)
    assert float(block.trace()) == pytest.approx(float(values.sum()), rel=1e-14)


def test_shapes_must_fit_the_layout():
    (_, U), (_, V) = _eigh(psd(5, 1)), _eigh(psd(3, 1))
    with pytest.raises(ValueError, match="do not fit"):
        EKFACBlock(V, U, torch.ones(1, 3, 4, dtype=torch.float64), BlockLayout(3, 4, True), "e")  # values: width 5
