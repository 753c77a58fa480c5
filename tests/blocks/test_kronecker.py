"""Kronecker blocks and their spectra against eigvalsh / eigh of the dense G ⊗ A (one group, groups, transposed
weights, a diagonal A)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.blocks import KroneckerBlock, KroneckerEigen
from kfac_hessian.layout import BlockLayout

from ..conftest import TinyCNN, classification_data, mlp
from ..conftest import psd as _psd
from ..references import check_factor_spectra


@pytest.fixture(scope="module")
def factors():
    model = TinyCNN().double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    return kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))


def test_eigenvalues_equal_dense(factors):
    for f in factors.values():
        expected = torch.linalg.eigvalsh(f.to_dense()).flip(0)
        got = f.eig().eigenvalues
        assert torch.allclose(got, expected, atol=1e-13 * expected.abs().max())


def test_batched_eig_equals_single(factors):
    batched = factors.eig()
    for name, f in factors.items():
        assert torch.allclose(batched[name].eigenvalues, f.eig(vectors=False).eigenvalues, atol=1e-15)


@pytest.mark.parametrize("k", [1, 5, 17])
def test_topk(factors, k):
    for f in factors.values():
        dense = f.to_dense()
        e = f.eig(vectors=False)  # vectors computed lazily
        vals, vecs = e.topk(k)
        expected = torch.linalg.eigvalsh(dense).flip(0)[:k]
        assert torch.allclose(vals, expected, atol=1e-13 * expected[0])
        assert torch.allclose(vecs @ vecs.T, torch.eye(k), atol=1e-12)
        assert torch.allclose(vecs @ dense @ vecs.T, torch.diag(vals), atol=1e-12 * expected[0])


def test_top_pairs_are_rank_one_weight_matrices(factors):
    f = factors["fc"]
    vals, g_vecs, a_vecs, groups = f.eig().top_pairs(3)
    _, vecs = f.eig().topk(3)
    assert torch.equal(groups, torch.zeros(3, dtype=torch.long))
    for n in range(3):
        weight_and_bias = torch.outer(g_vecs[n], a_vecs[n])  # [W b] shape
        public = torch.cat([weight_and_bias[:, :-1].flatten(), weight_and_bias[:, -1]])
        assert torch.allclose(public, vecs[n], atol=1e-14)


def test_trace(factors):
    for f in factors.values():
        assert torch.isclose(f.eig().trace(), torch.trace(f.to_dense()), rtol=1e-12)


@pytest.mark.parametrize("log", [True, False])
def test_density_counts_every_eigenvalue_in_its_bin(factors, log):
    for f in factors.values():
        values = torch.linalg.eigvalsh(f.to_dense()).clamp_min(0)
        d = f.eig().density(bins=30, log=log, chunk=7)  # small chunks exercise the streaming
        assert float(d.counts.sum()) + d.n_zero == f.num_params
        assert torch.isclose(torch.sum(d.density * (d.edges[1:] - d.edges[:-1])), d.counts.sum())
        # compare bins where eigvalsh resolves the values (not round-off-sized eigenvalues of rank-deficient G)
        top = float(values.max())
        window = ((float(torch.tensor(top * 1e-8).log10()), float(torch.tensor(top).log10()) + 1e-9) if log
                  else (0.0, top * (1 + 1e-9)))
        resolved = f.eig().density(bins=30, log=log, range=window)
        x = values[values > 0].log10() if log else values
        expected = torch.histc(x, bins=30, min=window[0], max=window[1])
        # eigvalsh and the factor products differ by round-off, which may move a value across a bin edge
        assert (expected - resolved.counts).abs().sum() <= 2


def test_density_counts_zero_eigenvalues_apart():
    """Dead inputs give A a zero eigenvalue: its products are zeros, not -inf on a log axis."""
    model = mlp(nn.Tanh)
    X, y = classification_data()
    X[:, 0] = 0.0
    e = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["0"].eig()
    d = e.density(bins=10, log=True)
    assert d.n_zero == 4 and float(d.counts.sum()) == e.num_params - 4


def test_topk_rejects_bad_k(factors):
    with pytest.raises(ValueError, match="k=0"):
        factors["fc"].eig().topk(0)


def test_float32_factors_with_float64_eig():
    kfac = kh.compute_kfac(mlp(), nn.CrossEntropyLoss(), classification_data(), dtype=torch.float32)
    e = kfac["0"].eig(dtype=torch.float64)
    assert e.a_values.dtype == torch.float64
    assert torch.allclose(e.eigenvalues, torch.linalg.eigvalsh(kfac["0"].to_dense().double()).flip(0), atol=1e-6)


def test_top_pairs_after_values_only_compute_only_the_leading_vectors():
    model = mlp(nn.Tanh, widths=(40, 35, 3))  # "0": A 41 × 41, G 35 × 35 — large enough for the tridiagonal path
    X, y = classification_data(n=50, d=40)
    f = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["0"]
    e = f.eig(vectors=False)
    values, vecs = e.topk(4)
    assert e._vectors == {"A": None, "G": None}  # no full eigh ran
    dense = f.to_dense()
    assert torch.allclose(vecs @ dense @ vecs.T, torch.diag(values), atol=1e-12 * values[0])
    full_values, full_vecs = f.eig(vectors=True).topk(4)
    assert torch.allclose(values, full_values, atol=1e-13 * values[0])
    assert torch.allclose(vecs.T @ vecs, full_vecs.T @ full_vecs, atol=1e-10)


def _reference(A: torch.Tensor, G: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """blockdiag_g(G_g ⊗ A_g) in public order, the permutation written out element by element."""
    groups, d_out, d_in, width = layout.groups, layout.d_out, layout.d_in, layout.width
    A = torch.diag(A) if A.dim() == 1 else A
    A, G = (A, G) if groups > 1 else (A[None], G[None])
    P = layout.num_params
    dense = torch.zeros(P, P, dtype=torch.float64)

    def public(g: int, r: int, c: int) -> int:  # position of W̄_g[r, c] in torch.cat([weight.flatten(), bias])
        if c == d_in:
            return groups * d_out * d_in + g * d_out + r
        return c * d_out + r if layout.transposed else (g * d_out + r) * d_in + c

    for g in range(groups):
        for r in range(d_out):
            for c in range(width):
                for r2 in range(d_out):
                    for c2 in range(width):
                        dense[public(g, r, c), public(g, r2, c2)] = G[g, r, r2] * A[g, c, c2]
    return dense


@pytest.mark.parametrize("layout", [
    BlockLayout(3, 4, True), BlockLayout(3, 4, False), BlockLayout(2, 3, True, groups=3),
    BlockLayout(1, 4, False, groups=5), BlockLayout(3, 4, True, transposed=True),
    BlockLayout(3, 5, False, transposed=True),
])
def test_structures_against_their_dense_reference(layout):
    grouped = layout.groups > 1
    A = _psd(layout.width, *((layout.groups,) if grouped else ()), seed=1)
    G = _psd(layout.d_out, *((layout.groups,) if grouped else ()), seed=2)
    block = KroneckerBlock(A, G, layout, "b")
    dense = _reference(A, G, layout)
    assert torch.allclose(block.to_dense(), dense, atol=1e-14)
    check_factor_spectra(block, dense, k=min(6, layout.num_params))


def test_diagonal_a_against_its_dense_reference():
    layout = BlockLayout(3, 7, False, transposed=True)  # an embedding: vocabulary 7, dim 3
    a = torch.rand(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a[2] = 0  # a token that never occurs
    block = KroneckerBlock(a, _psd(3), layout, "embed")
    dense = _reference(a, _psd(3), layout)
    assert torch.allclose(block.to_dense(), dense, atol=1e-14)
    check_factor_spectra(block, dense, k=5)
    assert block.eig().density(bins=5).n_zero == 3


def test_grouped_effective_rank_and_density_against_the_explicit_spectrum():
    layout = BlockLayout(2, 3, True, groups=4)
    block = KroneckerBlock(_psd(4, 4, seed=5), _psd(2, 4, seed=6), layout, "g")
    e = block.eig()
    values = torch.linalg.eigvalsh(block.to_dense()).clamp_min(0)
    p = values[values > 0] / values.sum()
    assert e.effective_rank() == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-10)
    d = e.density(bins=9, log=True, chunk=3)
    assert float(d.counts.sum()) + d.n_zero == layout.num_params


def test_factor_shapes_must_fit_the_layout():
    with pytest.raises(ValueError, match="do not fit"):
        KroneckerBlock(_psd(4), _psd(3), BlockLayout(3, 4, True), "x")  # A must be 5 × 5 with the bias


def test_rank_deficient_factors_more_parameters_than_samples():
    """3 samples, 6 inputs: A has rank ≤ 3; eigenvalues are clamped at 0, never negative, never NaN."""
    model = mlp(nn.ReLU, widths=(6, 8, 3))
    X, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    e = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["0"].eig()
    values = e.eigenvalues
    assert torch.isfinite(values).all() and (values >= 0).all()
    assert (e.a_values[4:] < 1e-12 * e.a_values[0]).all()  # rank ≤ 3 (+ the bias direction)


def test_density_of_a_layer_with_1e8_products_in_bounded_memory():
    g = torch.Generator().manual_seed(0)
    a_values = torch.rand(10_000, generator=g, dtype=torch.float64).sort(descending=True).values
    g_values = torch.rand(10_000, generator=g, dtype=torch.float64).sort(descending=True).values
    e = KroneckerEigen(BlockLayout(10_000, 10_000, False), a_values=a_values[None], g_values=g_values[None])
    d = e.density(bins=50, log=True, chunk=2**22)  # 24 chunks of ≤ 4M products, never 1e8 at once
    assert float(d.counts.sum()) + d.n_zero == 10**8
    # log10(μλ) = log10 μ + log10 λ: its mean is the sum of the factor means, exact to binning
    mean = float((d.centers * d.counts).sum() / d.counts.sum())
    expected = float(g_values.log10().mean() + a_values.log10().mean())
    assert abs(mean - expected) < float(d.edges[1] - d.edges[0])
