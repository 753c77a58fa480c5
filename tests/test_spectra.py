"""Kronecker spectra against eigvalsh / eigh of the dense G ⊗ A."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
import kfac_hessian.spectra as spectra
from kfac_hessian.spectra import symmetric_eig, symmetric_eigvals

from .conftest import TinyCNN, classification_data, mlp


@pytest.fixture(scope="module")
def factors():
    model = TinyCNN().double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    return kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))


def test_eigenvalues_equal_dense(factors):
    for f in factors.values():
        expected = torch.linalg.eigvalsh(f.to_dense()).flip(0)
        got = f.eig().eigenvalues()
        assert torch.allclose(got, expected, atol=1e-13 * expected.abs().max())


def test_batched_eig_equals_single(factors):
    batched = factors.eig()
    for name, f in factors.items():
        assert torch.allclose(batched[name].eigenvalues(), f.eig(vectors=False).eigenvalues(), atol=1e-15)


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
    vals, g_vecs, a_vecs = f.eig().top_pairs(3)
    _, vecs = f.eig().topk(3)
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
        window = (float(torch.tensor(top * 1e-8).log10()), float(torch.tensor(top).log10()) + 1e-9) if log else (0.0, top * (1 + 1e-9))
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


def test_clamp_is_reported():
    m = torch.tensor([[[1.0, 0.0], [0.0, -1e-17]]])
    values, _, (report,) = symmetric_eig(m, vectors=False)
    assert values.min() == 0 and report.count == 1 and report.most_negative == pytest.approx(-1e-17)


def test_topk_rejects_bad_k(factors):
    with pytest.raises(ValueError, match="k=0"):
        factors["fc"].eig().topk(0)


def test_float32_factors_with_float64_eig():
    kfac = kh.compute_kfac(mlp(), nn.CrossEntropyLoss(), classification_data(), dtype=torch.float32)
    e = kfac["0"].eig(dtype=torch.float64)
    assert e.a_values.dtype == torch.float64
    assert torch.allclose(e.eigenvalues(), torch.linalg.eigvalsh(kfac["0"].to_dense().double()).flip(0), atol=1e-6)


def _psd(d: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return (x @ x.T / (2 * d)).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_eigenvalues_through_the_tridiagonal_form_equal_eigvalsh(dtype, tol):
    matrices = torch.stack([_psd(40, dtype, seed) for seed in range(3)])
    values, reports, forms = symmetric_eigvals(matrices)
    expected = torch.linalg.eigvalsh(matrices.double()).flip(-1)
    assert values.dtype == dtype and all(f is not None for f in forms) and all(r.count == 0 for r in reports)
    assert torch.allclose(values.double(), expected, atol=tol * expected.max())


@pytest.mark.parametrize("m", [1, 4, 40])
def test_leading_vectors_from_the_tridiagonal_form_are_the_leading_eigenvectors(m):
    matrix = _psd(40)
    _, _, (form,) = symmetric_eigvals(matrix.unsqueeze(0))
    vectors = form.leading_vectors(m)
    values, reference = torch.linalg.eigh(matrix)
    reference = reference.flip(1)[:, :m]
    assert torch.allclose(vectors.T @ vectors, torch.eye(m, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(vectors @ vectors.T, reference @ reference.T, atol=1e-10)  # same subspace (distinct eigenvalues)
    assert torch.allclose(matrix @ vectors, vectors * values.flip(0)[:m], atol=1e-12)


def test_top_pairs_after_values_only_compute_only_the_leading_vectors(factors):
    f = factors["conv1"]  # A 19 × 19, G 3 × 3
    e = f.eig(vectors=False)
    values, vecs = e.topk(4)
    assert e._a_vectors is None and e._g_vectors is None  # no full eigh ran
    dense = f.to_dense()
    assert torch.allclose(vecs @ dense @ vecs.T, torch.diag(values), atol=1e-12 * values[0])
    full_values, full_vecs = f.eig(vectors=True).topk(4)
    assert torch.allclose(values, full_values, atol=1e-13 * values[0])
    assert torch.allclose(vecs.T @ vecs, full_vecs.T @ full_vecs, atol=1e-10)


def test_values_only_path_falls_back_where_no_form_applies(monkeypatch):
    small = torch.stack([_psd(2, seed=s) for s in range(2)])  # d < 3: eigvalsh, no form
    values, _, forms = symmetric_eigvals(small)
    assert forms == [None, None]
    assert torch.allclose(values, torch.linalg.eigvalsh(small).flip(-1), atol=1e-14)
    original = spectra._tridiagonal_eigvals

    def failing_in_float32(matrix):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated")
        return original(matrix)

    monkeypatch.setattr(spectra, "_tridiagonal_eigvals", failing_in_float32)
    values, _, forms = symmetric_eigvals(_psd(10, torch.float32).unsqueeze(0))
    assert values.dtype == torch.float32 and forms == [None]  # retried in float64, cast back
    assert torch.allclose(values[0].double(), torch.linalg.eigvalsh(_psd(10)).flip(0), atol=1e-6)
