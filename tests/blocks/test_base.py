"""The block protocol: ``eig_blocks`` decomposes blocks of every structure together, each result as that block's own
``eig()``; one rule for ``k``; every eigen-structure stands for its block."""

from __future__ import annotations

import pytest
import torch

from kfac_hessian.blocks import DenseBlocks, EKFACBlock, KroneckerBlock
from kfac_hessian.blocks.base import eig_blocks
from kfac_hessian.eigen import is_eigen_result
from kfac_hessian.layout import BlockLayout

from ..conftest import psd


def _blocks() -> dict:
    layout = BlockLayout(2, 3, True)
    (_, U), (_, V) = torch.linalg.eigh(psd(4, 1, seed=3)), torch.linalg.eigh(psd(2, 1, seed=4))
    values = torch.rand(1, 2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return {
        "kron": KroneckerBlock(psd(4, seed=1), psd(2, seed=2), layout, "kron"),
        "dense": DenseBlocks.paired(psd(2, 5, seed=6), "paired", "dense"),
        "ekfac": EKFACBlock(V, U, values, layout, "ekfac"),
        "big": KroneckerBlock(psd(41, seed=7), psd(35, seed=8), BlockLayout(35, 40, True), "big"),
    }


@pytest.mark.parametrize("vectors", [False, True])
def test_eig_blocks_gives_each_block_its_own_eigen_structure(vectors):
    blocks = _blocks()
    together = eig_blocks(blocks, vectors=vectors)
    assert list(together) == list(blocks)
    for name, block in blocks.items():
        eigen = together[name]
        assert eigen.source is block and eigen.num_params == block.num_params
        alone = block.eig()
        assert torch.allclose(eigen.eigenvalues, alone.eigenvalues, atol=1e-12)
        if block.num_params <= 40:
            expected = torch.linalg.eigvalsh(block.to_dense()).flip(0).clamp_min(0)
            assert torch.allclose(eigen.eigenvalues, expected, atol=1e-12 * float(expected[0]))
        values, vecs = eigen.topk(3)
        assert torch.allclose(values, eigen.top_eigenvalues(3)) and torch.allclose(values, alone.eigenvalues[:3])
        assert torch.allclose(block @ vecs.T, vecs.T * values, atol=1e-10 * float(values[0]))


def test_one_rule_for_k():
    for name, block in _blocks().items():
        eigen = block.eig()
        values, vecs = eigen.topk(block.num_params + 5)  # at most k: all P
        assert len(values) == block.num_params and vecs.shape == (block.num_params, block.num_params), name
        assert len(eigen.top_eigenvalues(block.num_params + 5)) == block.num_params
        for bad in (0, -1, True, 2.0):
            with pytest.raises(ValueError, match="must be a positive integer"):
                eigen.topk(bad)


def test_an_all_zero_block_has_effective_rank_zero():
    zero = DenseBlocks.diagonal(torch.zeros(4, dtype=torch.float64), "zeros")
    assert zero.eig().effective_rank() == 0.0
    ones = DenseBlocks.diagonal(torch.ones(4, dtype=torch.float64), "ones")
    assert ones.eig().effective_rank() == pytest.approx(4.0, rel=1e-14)  # a flat spectrum: all 4 directions


def test_every_eigen_structure_is_an_eigen_result():
    """The one eigen-result protocol (``kfac_hessian.eigen``): ``eigenvalues`` a property, descending, equal to eigvalsh
    of the dense block; ``topk`` orthonormal rows; ``num_params``."""
    for name, block in _blocks().items():
        eigen = block.eig()
        assert is_eigen_result(eigen), name
        assert isinstance(type(eigen).eigenvalues, property)
        values = eigen.eigenvalues
        assert (values[:-1] >= values[1:]).all() and len(values) == eigen.num_params == block.num_params
        _, vecs = eigen.topk(3)
        assert torch.allclose(vecs @ vecs.T, torch.eye(3), atol=1e-12)


def _many_blocks(n: int) -> dict:
    layout = BlockLayout(4, 5, True)
    return {f"layer{i}": KroneckerBlock(psd(6, seed=2 * i), psd(4, seed=2 * i + 1), layout, f"layer{i}")
            for i in range(n)}


@pytest.mark.parametrize("vectors", [False, True])
def test_eig_blocks_reports_progress_over_many_blocks_with_the_same_results(monkeypatch, capsys, vectors):
    import sys

    import kfac_hessian.blocks.base as base

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # the plain lines (tqdm draws to the terminal)
    monkeypatch.setattr(base, "EIG_COST_WORTH_A_BAR", 0)
    blocks = _many_blocks(base.EIG_BLOCKS_WORTH_A_BAR + 1)
    quiet = eig_blocks(blocks, vectors=vectors)
    assert capsys.readouterr().err == ""  # off by default
    reported = eig_blocks(blocks, vectors=vectors, progress=True)
    lines = capsys.readouterr().err.splitlines()
    what = "eigendecompositions" if vectors else "eigenvalues"
    assert lines and lines[-1].startswith(f"{what} of 9 blocks: 9/9 block, ") and lines[-1].endswith("ETA 0.0 s")
    for name, block in blocks.items():
        expected = torch.linalg.eigvalsh(block.to_dense()).flip(0).clamp_min(0)  # dense float64 reference
        assert torch.allclose(reported[name].eigenvalues, expected, atol=1e-12 * float(expected[0]))
        assert torch.allclose(reported[name].eigenvalues, quiet[name].eigenvalues, atol=1e-12 * float(expected[0]))


def test_eig_blocks_is_quiet_for_few_blocks_or_little_work(capsys):
    import kfac_hessian.blocks.base as base

    eig_blocks(_many_blocks(base.EIG_BLOCKS_WORTH_A_BAR - 1), progress=True)  # few blocks
    eig_blocks(_many_blocks(base.EIG_BLOCKS_WORTH_A_BAR), progress=True)  # many, but microseconds of work
    assert capsys.readouterr().err == ""

