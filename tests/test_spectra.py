"""The symmetric eigendecomposition primitives: clamping, the kept tridiagonal form, the GIL-free LAPACK calls."""

from __future__ import annotations

import pytest
import torch

import kfac_hessian.spectra as spectra
from kfac_hessian.spectra import symmetric_eig, symmetric_eigvals

from .conftest import psd


def test_clamp_is_reported():
    m = torch.tensor([[[1.0, 0.0], [0.0, -1e-17]]])
    values, _, (report,) = symmetric_eig(m, vectors=False)
    assert values.min() == 0 and report.count == 1 and report.most_negative == pytest.approx(-1e-17)


def _psd(d: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    return psd(d, seed=seed).to(dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_eigenvalues_through_the_tridiagonal_form_equal_eigvalsh(dtype, tol, threads, monkeypatch):
    monkeypatch.setattr(spectra, "EIG_THREADS", threads)  # serial, and concurrent on a thread pool
    sizes = (40, 64, 33, 40, 50)  # of several sizes: scheduled largest first, results back in order
    matrices = [_psd(d, dtype, seed).unsqueeze(0) for seed, d in enumerate(sizes)]
    results = symmetric_eigvals(matrices)
    for matrix, (values, reports, forms) in zip(matrices, results):
        expected = torch.linalg.eigvalsh(matrix.double()).flip(-1)
        assert values.shape == matrix.shape[:2] and values.dtype == dtype
        assert forms[0] is not None and reports[0].count == 0
        assert torch.allclose(values.double(), expected, atol=tol * float(expected.max()))


@pytest.mark.parametrize("m", [1, 4, 40])
def test_leading_vectors_from_the_tridiagonal_form_are_the_leading_eigenvectors(m):
    matrix = _psd(40)
    ((_, _, (form,)),) = symmetric_eigvals([matrix.unsqueeze(0)])
    vectors = form.leading_vectors(m)
    values, reference = torch.linalg.eigh(matrix)
    reference = reference.flip(1)[:, :m]
    assert torch.allclose(vectors.T @ vectors, torch.eye(m, dtype=torch.float64), atol=1e-12)
    # the same subspace (distinct eigenvalues)
    assert torch.allclose(vectors @ vectors.T, reference @ reference.T, atol=1e-10)
    assert torch.allclose(matrix @ vectors, vectors * values.flip(0)[:m], atol=1e-12)


def test_values_only_path_falls_back_where_no_form_applies(monkeypatch):
    small = torch.stack([_psd(20, seed=s) for s in range(2)])  # a batch, or d < TRIDIAGONAL_MIN_SIZE: no form
    ((values, _, forms), (single, _, single_forms)) = symmetric_eigvals([small, small[:1]])
    assert forms == [None, None] and single_forms == [None]
    assert torch.allclose(values, torch.linalg.eigvalsh(small).flip(-1), atol=1e-14)
    assert torch.allclose(single, values[:1], atol=1e-14)
    original = spectra._tridiagonal_eigvals

    def failing_in_float32(matrix):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated")
        return original(matrix)

    monkeypatch.setattr(spectra, "_tridiagonal_eigvals", failing_in_float32)
    ((values, _, forms),) = symmetric_eigvals([_psd(40, torch.float32).unsqueeze(0)])
    assert values.dtype == torch.float32 and forms == [None]  # retried in float64, cast back
    assert torch.allclose(values[0].double(), torch.linalg.eigvalsh(_psd(40)).flip(0), atol=1e-6)


def test_float32_eigh_failure_is_retried_in_float64(monkeypatch):
    calls = []
    original = torch.linalg.eigh

    def flaky(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated convergence failure")
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    m = torch.randn(2, 5, 5, dtype=torch.float32)
    m = m @ m.transpose(1, 2)
    values, vectors, _ = symmetric_eig(m, vectors=True)
    assert calls == [torch.float32, torch.float64]
    assert values.dtype == torch.float32 and vectors.dtype == torch.float32
    assert torch.allclose(values, torch.linalg.eigvalsh(m.double()).flip(-1).float(), rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_eigenvectors_through_concurrent_syevd_are_eigh(dtype, tol, threads, monkeypatch):
    monkeypatch.setattr(spectra, "EIG_THREADS", threads)
    batches = [_psd(40, dtype, 0).unsqueeze(0), torch.stack([_psd(64, dtype, s) for s in (1, 2)]),
               _psd(5, dtype, 3).unsqueeze(0), _psd(33, dtype, 4).unsqueeze(0)]  # d = 5: torch's batched eigh
    for batch, (values, vectors, reports) in zip(batches, spectra.symmetric_eigs(batches)):
        reference = batch.double()
        expected = torch.linalg.eigvalsh(reference).flip(-1)  # float64 reference, descending
        assert values.dtype == vectors.dtype == dtype and vectors.shape == batch.shape
        assert [r.count for r in reports] == [0] * len(batch)
        assert torch.allclose(values.double(), expected, atol=tol * float(expected.max()))
        eye = torch.eye(batch.shape[-1], dtype=torch.float64)
        assert torch.allclose(vectors.double().mT @ vectors.double(), eye.expand_as(reference), atol=10 * tol)
        residual = reference @ vectors.double() - vectors.double() * values.double().unsqueeze(-2)
        assert float(residual.abs().max()) < 10 * tol * float(expected.max())


def test_float32_syevd_failure_is_retried_in_float64(monkeypatch):
    from kfac_hessian import _lapack

    original = _lapack.syevd

    def failing_in_float32(matrix):
        values, vectors, info = original(matrix)
        return values, vectors, (1 if matrix.dtype.name == "float32" else info)

    monkeypatch.setattr(_lapack, "syevd", failing_in_float32)
    ((values, vectors, _),) = spectra.symmetric_eigs([_psd(40, torch.float32).unsqueeze(0)])
    assert values.dtype == vectors.dtype == torch.float32  # retried in float64, cast back
    assert torch.allclose(values[0].double(), torch.linalg.eigvalsh(_psd(40)).flip(0), atol=1e-6)
    with pytest.raises(torch.linalg.LinAlgError, match="syevd"):
        monkeypatch.setattr(_lapack, "syevd", lambda matrix: (*original(matrix)[:2], 3))
        spectra.symmetric_eigs([_psd(40).unsqueeze(0)])
