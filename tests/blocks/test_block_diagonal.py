"""BlockDiagonal: Kronecker parts on a partition of the public positions, against the dense matrix built from the parts'
own dense matrices."""

from __future__ import annotations

import pytest
import torch

from kfac_hessian.blocks import BlockDiagonal, KroneckerBlock
from kfac_hessian.layout import BlockLayout

from ..conftest import psd
from ..references import check_factor_spectra


def _block() -> tuple[BlockDiagonal, torch.Tensor]:
    layouts = {"first": BlockLayout(3, 2, True), "second": BlockLayout(2, 4, False)}
    parts = {name: KroneckerBlock(psd(layout.width, seed=i), psd(layout.d_out, seed=10 + i), layout, name)
             for i, (name, layout) in enumerate(layouts.items())}
    sizes = [layout.num_params for layout in layouts.values()]
    positions = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(0))
    index = dict(zip(parts, positions.split(sizes)))
    dense = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    for name, block in parts.items():
        dense[index[name][:, None], index[name][None, :]] = torch.kron(block.G, block.A)[
            block.layout.permutation()][:, block.layout.permutation()]
    return BlockDiagonal(parts, index, "layer", "an assumption"), dense


def test_products_and_spectra_equal_the_dense_matrix():
    block, dense = _block()
    assert torch.allclose(block.to_dense(), dense, atol=1e-15)
    check_factor_spectra(block, dense, k=4)
    eig = block.eig()
    p = eig.eigenvalues / eig.eigenvalues.sum()
    assert eig.effective_rank() == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-12)
    assert torch.allclose(eig.top_eigenvalues(3), torch.linalg.eigvalsh(dense).flip(0)[:3], atol=1e-12)
    assert eig.density(bins=5).counts.sum() == block.num_params
    assert "an assumption" in block.structure() and "first: G 3² ⊗ A 3²" in block.structure()


def test_state_round_trip_and_bad_index():
    block, dense = _block()
    loaded = BlockDiagonal.from_state(block.state(), "layer")
    assert torch.equal(loaded.to_dense(), dense) and loaded.structure() == block.structure()
    with pytest.raises(ValueError, match="exactly once"):
        BlockDiagonal(block.parts, {name: index.clamp(max=0) for name, index in block.index.items()})
    with pytest.raises(ValueError, match="parameters but an index"):
        BlockDiagonal(block.parts, {name: index[:1] for name, index in block.index.items()})
