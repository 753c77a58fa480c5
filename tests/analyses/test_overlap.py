"""Eigenspace overlap: identities, random baseline, Kronecker-fast form = dense formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.analyses import eigenspace_overlap, kronecker_overlap, overlap_by_layer
from kfac_hessian.eigen import eigen_pairs

from ..conftest import classification_data, mlp
from ..references import dense_hessian


def basis(k, P, seed):
    q, _ = torch.linalg.qr(torch.randn(P, P, generator=torch.Generator().manual_seed(seed)))
    return q[:, :k].T, q[:, k:].T


def test_self_complement_and_random():
    V, complement = basis(5, 40, 0)
    assert eigenspace_overlap(V, V) == pytest.approx(1.0)
    assert eigenspace_overlap(V, complement[:5]) == pytest.approx(0.0, abs=1e-14)
    k, P, trials = 5, 400, 50
    values = torch.tensor([eigenspace_overlap(basis(k, P, 2 * s)[0], basis(k, P, 2 * s + 1)[0]) for s in range(trials)])
    # E = k/P exactly for uniformly random subspaces; standard error of the mean over the trials
    assert abs(float(values.mean()) - k / P) < 4 * float(values.std()) / math.sqrt(trials)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        eigenspace_overlap(torch.zeros(2, 5), torch.zeros(3, 5))


def test_kronecker_overlap_equals_dense_formula():
    X, y = classification_data(n=20)
    e1 = kh.compute_kfac(mlp(nn.Tanh, seed=0), nn.CrossEntropyLoss(), (X, y))["0"].eig()
    e2 = kh.compute_kfac(mlp(nn.Tanh, seed=1), nn.CrossEntropyLoss(), (X, y))["0"].eig()
    for k in (1, 4, 9):
        dense = eigenspace_overlap(e1.topk(k)[1], e2.topk(k)[1])
        assert kronecker_overlap(e1, e2, k) == pytest.approx(dense, abs=1e-12)
    assert kronecker_overlap(e1, e1, 4) == pytest.approx(1.0)


def test_overlap_by_layer_reports_baseline():
    X, y = classification_data()
    eigs = [kh.compute_kfac(mlp(seed=s), nn.CrossEntropyLoss(), (X, y)).eig() for s in (0, 1)]
    rows = overlap_by_layer(eigs[0], eigs[1], k=3)
    assert [r["layer"] for r in rows] == ["0", "2"]
    assert rows[0]["random_baseline"] == pytest.approx(3 / 24)


def test_bases_that_are_not_orthonormal_rows_are_refused_with_the_orientation():
    V, _ = basis(5, 40, 0)
    with pytest.raises(ValueError, match=r"more rows than columns.*for \(P, k\) column bases pass V.T"):
        eigenspace_overlap(V.T, V.T)  # (P, k): the torch.linalg.eigh / scipy habit
    with pytest.raises(ValueError, match="not orthonormal"):
        eigenspace_overlap(2 * V, V)
    wide = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(1))).Q  # (6, 4) columns
    with pytest.raises(ValueError, match="more rows than columns"):
        eigenspace_overlap(wide, wide)
    long = torch.ones(2, 3_000_000, dtype=torch.float64)  # a (P, P) check would need 72 TB: only (k, k) is formed
    with pytest.raises(ValueError, match="not orthonormal"):
        eigenspace_overlap(long, long)


def test_overlap_by_layer_takes_lanczos_and_dense_results_against_dense_eigh():
    """Kronecker eigen-structures against Lanczos results of the exact layer blocks, and a dense eigendecomposition:
    each row equals the overlap of the bases from eigh of the dense float64 Hessian block (torch.func)."""
    model, loss_fn = mlp(nn.Tanh), nn.CrossEntropyLoss()
    X, y = classification_data(n=20)
    kfac = kh.compute_kfac(model, loss_fn, (X, y)).eig()
    exact = {name: kh.lanczos(kh.layer_operator(model, loss_fn, (X, y), name), 4) for name in ("0", "2")}
    rows = overlap_by_layer(kfac, exact, k=4)
    for row in rows:
        reference = dense_hessian(model, loss_fn, X, y, [row["layer"]])
        vectors = torch.linalg.eigh(reference).eigenvectors.flip(1)[:, :4].T
        assert row["overlap"] == pytest.approx(eigenspace_overlap(kfac[row["layer"]].topk(4)[1], vectors), abs=1e-10)
        dense = {row["layer"]: eigen_pairs(reference)}
        assert overlap_by_layer(dense, exact, k=4)[0]["overlap"] == pytest.approx(1.0, abs=1e-10)
    with pytest.raises(ValueError, match="exceeds the 4 eigenpairs"):
        overlap_by_layer(kfac, exact, k=5)


def test_eigenspace_overlap_of_results_and_bases_mixed():
    V, _ = basis(6, 12, 3)
    values = torch.arange(6, 0, -1).double()
    pairs = eigen_pairs(V.T @ torch.diag(values) @ V)  # eigenvectors V (up to sign), eigenvalues 6 … 1, then 0s
    assert eigenspace_overlap(pairs, V, k=4) == pytest.approx(1.0, abs=1e-12)
    assert eigenspace_overlap(pairs, V[2:], k=2) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="pass k="):
        eigenspace_overlap(pairs, V)
    with pytest.raises(TypeError, match="eigen result"):
        eigenspace_overlap([V], V, k=2)
