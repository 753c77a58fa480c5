"""The eigen-result protocol: dense decompositions against eigh, truncated results, every kind of result alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.eigen import EigenPairs, eigen_pairs, eigenvalues_of, is_eigen_result
from kfac_hessian.exact import model_spectrum

from .conftest import classification_data, mlp, psd
from .references import dense_hessian


def test_eigen_pairs_of_an_indefinite_matrix_against_eigh():
    g = torch.Generator().manual_seed(0)
    M = psd(6, seed=1) - 0.5 * psd(6, seed=2) + 1e-3 * torch.randn(6, 6, generator=g)  # not symmetric, indefinite
    pairs = eigen_pairs(M)
    reference = torch.linalg.eigvalsh(0.5 * (M + M.T)).flip(0)
    assert torch.allclose(pairs.eigenvalues, reference, atol=1e-13) and reference.min() < 0  # nothing clamped
    values, vectors = pairs.topk(10)  # a complete decomposition: at most k, all P
    assert len(values) == 6 and torch.allclose(vectors @ vectors.T, torch.eye(6), atol=1e-12)
    assert torch.allclose(pairs.to_dense(), 0.5 * (M + M.T), atol=1e-12)  # the matrix it decomposes
    truncated = EigenPairs(values[:2], vectors[:2])
    with pytest.raises(ValueError, match="exceeds the 2 eigenpairs"):
        truncated.topk(3)
    with pytest.raises(ValueError, match="square"):
        eigen_pairs(torch.zeros(2, 3))


def test_every_kind_of_result_has_the_protocol():
    """Kronecker, EKFAC, Kronecker-fit and dense block eigen-structures, Lanczos, a dense decomposition and a
    whole-model spectrum: descending eigenvalues, orthonormal (k, P) rows, the same top eigenvalue of the exact block
    for the exact results (dense float64 Hessian, torch.func)."""
    model, loss_fn = mlp(nn.Tanh, widths=(4, 3, 2)), nn.CrossEntropyLoss()
    X, y = classification_data(n=10, d=4, classes=2)
    kfac = kh.compute_kfac(model, loss_fn, (X, y))
    H = dense_hessian(model, loss_fn, X, y, ["0"])
    results = {
        "kronecker": kfac.eig()["0"],
        "ekfac": kh.compute_ekfac(model, loss_fn, (X, y), kfac=kfac)["0"].eig(),
        "fit": kh.compute_kronecker_fit(model, loss_fn, (X, y), kfac=kfac)["0"].eig(),
        "lanczos": kh.lanczos(kh.layer_operator(model, loss_fn, (X, y), "0"), 3),
        "dense": eigen_pairs(H),
        "model": model_spectrum(model, loss_fn, (X, y), k=3, layers=["0"], n_probes=1, n_iter=3),
    }
    for name, result in results.items():
        assert is_eigen_result(result), name
        values = eigenvalues_of(result)
        assert (values[:-1] >= values[1:]).all() and result.num_params == H.shape[0], name
        top, vectors = result.topk(3)
        assert torch.allclose(top, values[:3]) and torch.allclose(vectors @ vectors.T, torch.eye(3), atol=1e-10), name
    for name in ("lanczos", "dense", "model"):
        assert float(results[name].eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-10)
    assert not is_eigen_result(H) and not is_eigen_result(kfac["0"])  # a block is not its eigen-structure
    with pytest.raises(TypeError, match="eigen result"):
        eigenvalues_of([1.0])
