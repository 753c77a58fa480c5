"""DenseBlocks: dense sub-blocks on a partition of the parameters, against the dense matrix written out."""

from __future__ import annotations

import pytest
import torch

from kfac_hessian.blocks import DenseBlocks
from kfac_hessian.blocks.base import eig_blocks

from ..conftest import psd as _psd
from ..references import check_factor_spectra


def _dense(blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    P = index.numel()
    out = torch.zeros(P, P, dtype=blocks.dtype)
    for b in range(len(blocks)):
        for i, p in enumerate(index[b].tolist()):
            for j, q in enumerate(index[b].tolist()):
                out[p, q] = blocks[b, i, j]
    return out


@pytest.mark.parametrize("make", ["dense", "paired", "diagonal", "scattered"])
def test_structures_against_the_matrix_written_out(make):
    if make == "dense":
        block = DenseBlocks.dense(_psd(40), "dense")  # large enough for the tridiagonal path
        reference = block.blocks[0]
    elif make == "paired":
        block = DenseBlocks.paired(_psd(2, 6), "paired")
        reference = _dense(block.blocks, torch.stack([torch.arange(6), torch.arange(6, 12)], 1))
    elif make == "diagonal":
        values = torch.rand(9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        block = DenseBlocks.diagonal(values, "diagonal")
        reference = torch.diag(values)
    else:
        index = torch.randperm(12, generator=torch.Generator().manual_seed(2)).reshape(4, 3)
        block = DenseBlocks(_psd(3, 4, seed=3), index, "scattered")
        reference = _dense(block.blocks, index)
    assert torch.allclose(block.to_dense(), reference, atol=1e-15)
    check_factor_spectra(block, reference, k=5)
    e = block.eig()
    p = torch.linalg.eigvalsh(reference).clamp_min(0)
    p = p[p > 0] / p.sum()
    assert e.effective_rank() == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-10)
    d = e.density(bins=7, chunk=2)
    assert float(d.counts.sum()) + d.n_zero == block.num_params


def test_vectors_now_or_on_first_use_agree():
    block = DenseBlocks.paired(_psd(2, 5, seed=4), "paired")
    lazy, eager = eig_blocks({"b": block})["b"], eig_blocks({"b": block}, vectors=True)["b"]
    assert lazy._vectors is None and eager._vectors is not None
    (v1, x1), (v2, x2) = lazy.topk(4), eager.topk(4)
    assert torch.allclose(v1, v2) and torch.allclose((x1 @ x2.T).abs(), torch.eye(4), atol=1e-12)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="expected blocks"):
        DenseBlocks(torch.zeros(2, 2, 3), torch.zeros(2, 2, dtype=torch.long), "bad")
