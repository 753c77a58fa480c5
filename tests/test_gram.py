"""Symmetric outer-product sums against ``X Xᵀ`` in float64: rows taken feature-major, the upper block triangle
accumulated, the lower part mirrored once; grouped sums block by block; kept columns and their sketch."""

from __future__ import annotations

import pytest
import torch

from kfac_hessian.gram import FrequentDirections, KeptColumns, add_gram, feature_major, symmetrize_


def _rows(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_feature_major_is_the_rows_transposed_whatever_their_strides():
    rows = _rows(3, 4, 5)  # (N, T, d), contiguous
    assert torch.equal(feature_major(rows, torch.float64), rows.reshape(-1, 5).T)
    conv_like = _rows(3, 5, 4, seed=1).transpose(1, 2)  # (N, T, d) as a view of (N, d, T), as convolution rows are
    assert conv_like.stride(-1) != 1
    assert torch.equal(feature_major(conv_like, torch.float64), conv_like.reshape(-1, 5).T)
    assert feature_major(rows, torch.float32).dtype == torch.float32


@pytest.mark.parametrize("d", [5, 600])  # one strip; two strips of 300 rows
def test_add_gram_then_symmetrize_is_x_x_transposed(d):
    X = _rows(d, 9, seed=d)
    target = torch.zeros(d, d, dtype=torch.float64)
    add_gram(target, X)
    strips = max(1, min(4, d // 256))
    edges = [round(i * d / strips) for i in range(strips + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):  # below the diagonal strips: nothing accumulated
        assert not target[hi:, lo:hi].any()
    add_gram(target, 2 * X)  # running sums: X Xᵀ + 4 X Xᵀ
    expected = 5 * X @ X.T
    assert torch.allclose(symmetrize_(target, block=7), expected, atol=1e-12)
    assert torch.equal(target, target.T)


def test_symmetrize_block_size_does_not_matter():
    upper = torch.triu(_rows(11, 11, seed=2))
    expected = upper + torch.triu(upper, 1).T
    for block in (1, 4, 11, 256):
        assert torch.equal(symmetrize_(upper.clone(), block=block), expected)


def test_grouped_sums_are_one_gram_per_group():
    groups, d = 3, 4
    X = _rows(groups * d, 6, seed=3)  # group g = features g·d … (g+1)·d − 1
    target = torch.zeros(groups, d, d, dtype=torch.float64)
    add_gram(target, X)
    for g in range(groups):
        part = X[g * d : (g + 1) * d]
        assert torch.allclose(target[g], part @ part.T, atol=1e-13)
    assert symmetrize_(target) is target  # a batch is full already


def test_kept_columns_replayed_equal_the_direct_sum_bit_for_bit():
    chunks = [_rows(7, 2, seed=1), _rows(4, 7, seed=2).T, _rows(7, 3, seed=3)]  # a transposed view among them
    kept, direct = KeptColumns(7), torch.zeros(7, 7, dtype=torch.float64)
    for chunk in chunks:
        kept.add(chunk)
        add_gram(direct, chunk)
    assert kept.count == 9 and kept.full and torch.equal(kept.matrix(), torch.cat(chunks, dim=1))
    replayed = torch.zeros(7, 7, dtype=torch.float64)
    for chunk in kept.chunks:
        add_gram(replayed, chunk)
    assert torch.equal(replayed, direct)


@pytest.mark.parametrize("ell", [3, 8])
def test_frequent_directions_bounds(ell):
    """0 ⪯ UᵀU − BᵀB ⪯ shrinkage·I and shrinkage ≤ (‖U‖_F² − ‖B‖_F²)/ℓ, against the dense UᵀU of 50 rows."""
    U = _rows(50, 20, seed=4) * torch.linspace(2, 0.1, 20, dtype=torch.float64)  # a decaying spectrum
    sketch = FrequentDirections(U[:7].T, ell)
    for start in range(7, 50, 11):
        sketch.add(U[start : start + 11].T)
    B = sketch.matrix().T
    assert sketch.count == 50 and B.shape[0] < 2 * ell and sketch.shrinkage > 0
    error = torch.linalg.eigvalsh(U.T @ U - B.T @ B)
    assert float(error.min()) >= -1e-12 * float(U.square().sum())
    assert float(error.max()) <= sketch.shrinkage * (1 + 1e-12)
    assert sketch.shrinkage <= (float(U.square().sum()) - float(B.square().sum())) / ell * (1 + 1e-12)
