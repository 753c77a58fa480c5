"""Eigenspace overlap: identities, random baseline, Kronecker-fast form = dense formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.analyses import eigenspace_overlap, kronecker_overlap, overlap_by_layer

from ..conftest import classification_data, mlp


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
