"""Kronecker factors kept as their rows (``F = scale · UᵀU``, fewer rows than the width) against the same block with
dense factors and against eigvalsh / eigh of the dense ``G ⊗ A`` (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian import limits
from kfac_hessian.blocks import KroneckerBlock
from kfac_hessian.blocks.row_factor import RowFactor
from kfac_hessian.layout import BlockLayout

from ..references import check_factor_spectra


def _rows(r: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(r, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _blocks(layout: BlockLayout, r_a: int, r_g: int, a_rows: bool = True, g_rows: bool = True):
    """The same ``G ⊗ A`` with row factors and with dense factors (``A = UᵀU / r``, ``G = 0.3 · UᵀU``)."""
    u_a, u_g = _rows(r_a, layout.width, 1), _rows(r_g, layout.d_out, 2)
    a, g = RowFactor(u_a, 1 / r_a), RowFactor(u_g, 0.3)
    rows = KroneckerBlock(a if a_rows else a.dense(), g if g_rows else g.dense(), layout, "rows")
    return rows, KroneckerBlock(a.dense(), g.dense(), layout, "dense")


@pytest.mark.parametrize("layout, r_a, r_g", [
    (BlockLayout(6, 4, True), 3, 2),  # both factors rank-deficient: 20 of 30 eigenvalues are zero
    (BlockLayout(5, 7, False, transposed=True), 4, 5),  # G full rank (r = w), A kept as rows anyway
    (BlockLayout(8, 33, True), 33, 5),  # a Gram matrix ≥ 32: eigenvalues through the kept tridiagonal form
])
def test_row_factors_against_dense_factors(layout, r_a, r_g):
    rows, dense_block = _blocks(layout, r_a, r_g)
    dense = dense_block.to_dense()
    assert torch.allclose(rows.to_dense(), dense, atol=1e-13)
    check_factor_spectra(rows, dense, k=min(6, r_a * r_g), atol=1e-11)
    eig = rows.eig()
    zeros = layout.num_params - min(r_a, layout.width) * min(r_g, layout.d_out)
    assert int((eig.eigenvalues == 0).sum()) >= zeros  # the complement's zeros are exact zeros (a count, no vectors)
    assert torch.allclose(eig.eigenvalues, dense_block.eig().eigenvalues, atol=1e-11)
    assert eig.effective_rank() == pytest.approx(dense_block.eig().effective_rank(), rel=1e-10)
    assert float(eig.density(bins=7).counts.sum()) + eig.density(bins=7).n_zero == layout.num_params


def test_row_factor_products_and_structure_label():
    layout = BlockLayout(6, 4, True)
    rows, dense_block = _blocks(layout, 3, 2)
    v = torch.randn(layout.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(rows @ v, dense_block @ v, atol=1e-14)
    assert torch.allclose(rows.matvec(v[:, 0]), dense_block.to_dense() @ v[:, 0], atol=1e-14)
    assert "A as 3 rows of width 5" in rows.describe() and "G as 2 rows of width 6" in rows.describe()
    assert rows.row_factors == ["A", "G"] and dense_block.row_factors == []


def test_topk_reaching_into_the_zero_eigenspace_uses_its_complement():
    """6 of the 30 eigenvalues are nonzero: a top-10 needs 4 vectors of the zero eigenspace, orthonormal and exact."""
    layout = BlockLayout(6, 4, True)
    rows, dense_block = _blocks(layout, 3, 2)
    dense = dense_block.to_dense()
    values, vectors = rows.eig().topk(10)
    assert torch.allclose(values, dense_block.eig().top_eigenvalues(10), atol=1e-13)
    assert torch.allclose(vectors @ vectors.T, torch.eye(10, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(vectors @ dense @ vectors.T, torch.diag(values), atol=1e-12)


@pytest.mark.parametrize("vectors", [False, True])
def test_whole_eigenbasis_of_a_row_factor(vectors):
    """The basis EKFAC asks for: the lifted Gram eigenvectors completed by an orthonormal basis of the complement."""
    layout = BlockLayout(6, 4, True)
    rows, dense_block = _blocks(layout, 3, 2)
    eig = rows.eig(vectors=vectors)
    for factor, basis, values in ((dense_block.A, eig.a_vectors, eig.a_values), (dense_block.G, eig.g_vectors,
                                                                                eig.g_values)):
        w = factor.shape[0]
        assert torch.allclose(basis.T @ basis, torch.eye(w, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(basis.T @ factor @ basis, torch.diag(values), atol=1e-12)
    assert torch.allclose(eig.factor_vectors("G", 6), eig.g_vectors, atol=1e-12)


def test_mixed_row_and_dense_factors_and_diagonal_a():
    layout = BlockLayout(6, 4, True)
    rows, dense_block = _blocks(layout, 3, 2, a_rows=False)
    check_factor_spectra(rows, dense_block.to_dense(), k=4, atol=1e-12)
    embedding = BlockLayout(6, 5, False, transposed=True)
    counts = torch.tensor([0.4, 0.0, 0.2, 0.3, 0.1], dtype=torch.float64)
    g = RowFactor(_rows(2, 6, 5), 0.5)
    block = KroneckerBlock(counts, g, embedding, "embed")
    check_factor_spectra(block, KroneckerBlock(counts, g.dense(), embedding, "e").to_dense(), k=5, atol=1e-12)
    assert "G as 2 rows of width 6" in block.structure()


def test_state_round_trip_and_move(tmp_path):
    layout = BlockLayout(6, 4, True)
    rows, _ = _blocks(layout, 3, 2)
    torch.save(rows.state(), tmp_path / "block.pt")
    loaded = KroneckerBlock.from_state(torch.load(tmp_path / "block.pt", weights_only=True), "rows")
    assert loaded.row_factors == ["A", "G"]
    assert torch.equal(loaded.to_dense(), rows.to_dense())
    moved = rows.to(dtype=torch.float32)
    assert moved.row_factors == ["A", "G"] and moved.dtype == torch.float32
    assert torch.allclose(moved.to_dense().double(), rows.to_dense(), atol=1e-6)


def test_row_factors_are_refused_for_grouped_layouts_and_huge_bases():
    with pytest.raises(ValueError, match="one group"):
        KroneckerBlock(torch.eye(3).expand(2, 3, 3), RowFactor(_rows(1, 2, 0), 1.0), BlockLayout(2, 3, False, 2), "g")
    wide = RowFactor(torch.ones(2, 30_000, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="refused"):
        wide.dense()
    with pytest.raises(ValueError, match="EKFAC"):
        wide.vectors(torch.tensor([6e4, 0.0], dtype=torch.float64), torch.eye(2, dtype=torch.float64), 30_000)


def test_ekfac_and_the_fit_on_row_factors_equal_those_on_dense_factors(monkeypatch):
    """EKFAC's basis on a row factor is completed by the complement; the per-sample gradients lie in the rows' spans,
    so the corrected eigenvalues there are zero in any basis, and both methods equal their dense-factor results."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X, y = torch.randn(3, 8, dtype=torch.float64), torch.randint(0, 3, (3,))
    loss, data = nn.CrossEntropyLoss(), (X, y)
    dense = kh.compute_kfac(model, loss, data)
    monkeypatch.setattr(limits, "ROW_FACTOR_MIN_WIDTH", 1)
    rows = kh.compute_kfac(model, loss, data)
    assert rows["0"].row_factors == ["A", "G"]
    for method in (kh.compute_ekfac, kh.compute_kronecker_fit):
        on_rows, on_dense = method(model, loss, data, kfac=rows), method(model, loss, data, kfac=dense)
        for name in ("0", "2"):
            reference = on_dense[name].to_dense()
            assert torch.allclose(on_rows[name].to_dense(), reference, atol=1e-13 * float(reference.abs().max()))
