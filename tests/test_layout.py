"""Public (weight, then bias) order against the augmented row-major order of G ⊗ A."""

import pytest
import torch

from kfac_hessian.layout import BlockLayout


def test_round_trip_and_permutation():
    layout = BlockLayout(d_out=3, d_in=4, has_bias=True)
    v = torch.randn(2, layout.num_params)
    mats = layout.to_matrices(v)  # (m, groups, d_out, width)
    assert torch.equal(layout.to_vectors(mats), v)
    weight, bias = v[0, :12].reshape(3, 4), v[0, 12:]
    assert torch.equal(mats[0, 0], torch.cat([weight, bias[:, None]], 1))
    perm = layout.permutation()
    assert torch.equal(mats[0].flatten()[perm], v[0])


def test_transposed_and_grouped_weights():
    transposed = BlockLayout(d_out=3, d_in=4, has_bias=True, transposed=True)  # weight stored (d_in, d_out)
    v = torch.randn(1, transposed.num_params)
    weight, bias = v[0, :12].reshape(4, 3), v[0, 12:]
    assert torch.equal(transposed.to_matrices(v)[0, 0], torch.cat([weight.T, bias[:, None]], 1))
    assert torch.equal(transposed.to_vectors(transposed.to_matrices(v)), v)
    grouped = BlockLayout(d_out=2, d_in=3, has_bias=True, groups=3)  # weight (groups·d_out, d_in)
    v = torch.randn(1, grouped.num_params)
    weight, bias = v[0, :18].reshape(3, 2, 3), v[0, 18:].reshape(3, 2)
    assert torch.equal(grouped.to_matrices(v)[0], torch.cat([weight, bias[..., None]], -1))
    assert torch.equal(grouped.to_matrices(v)[0].flatten()[grouped.permutation()], v[0])
    with pytest.raises(ValueError, match="one group"):
        BlockLayout(2, 3, False, groups=2, transposed=True)


def test_rank_one_vectors_are_outer_products():
    layout = BlockLayout(d_out=2, d_in=3, has_bias=False)
    g, a = torch.randn(1, 2), torch.randn(1, 3)
    assert torch.allclose(layout.rank_one_vectors(g, a)[0], torch.kron(g[0], a[0]))
