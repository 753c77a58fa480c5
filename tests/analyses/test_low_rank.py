"""Low-rank structure of eigenvectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.analyses import low_rank_structure
from kfac_hessian.eigen import eigen_pairs

from ..conftest import classification_data, mlp
from ..references import dense_hessian


def test_kronecker_eigenvectors_are_exactly_rank_one():
    X, y = classification_data()
    e = kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), (X, y))["0"].eig()
    _, vecs = e.topk(3)
    s = low_rank_structure(vecs, e)
    assert torch.allclose(s.energy_share, torch.ones(3), atol=1e-12)
    assert torch.allclose(s.g_alignment, torch.ones(3), atol=1e-12)
    assert torch.allclose(s.a_alignment, torch.ones(3), atol=1e-12)


def test_random_vectors_are_not_rank_one():
    X, y = classification_data()
    e = kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), (X, y))["0"].eig()
    v = torch.randn(4, e.num_params, generator=torch.Generator().manual_seed(0))
    energy = low_rank_structure(v / v.norm(dim=1, keepdim=True), e).energy_share
    assert (energy < 0.9).all()


def test_exact_eigenvectors_of_any_result_against_a_hand_reshaped_svd():
    """Lanczos and dense results of the exact Hessian block (float64, torch.func) reshaped with the Kronecker layout:
    the energy share equals σ₁²/Σσ² of the eigenvectors of eigh reshaped by hand to [W b]."""
    model, loss_fn = mlp(nn.Tanh), nn.CrossEntropyLoss()
    X, y = classification_data(n=20)
    e = kh.compute_kfac(model, loss_fn, (X, y))["0"].eig()
    reference = dense_hessian(model, loss_fn, X, y, ["0"])
    vectors = torch.linalg.eigh(reference).eigenvectors.flip(1)[:, :3].T  # (3, P): weight (4·5), then bias (4)
    by_hand = torch.cat([vectors[:, :20].reshape(3, 4, 5), vectors[:, 20:].reshape(3, 4, 1)], dim=2)
    sigma = torch.linalg.svdvals(by_hand)
    expected = sigma[:, 0] ** 2 / sigma.pow(2).sum(1)
    lanczos = kh.lanczos(kh.layer_operator(model, loss_fn, (X, y), "0"), 3)
    for result in (lanczos, eigen_pairs(reference)):
        s = low_rank_structure(result, e, k=3)
        assert torch.allclose(s.energy_share, expected, atol=1e-10)
        assert ((s.g_alignment > 0) & (s.g_alignment <= 1 + 1e-12)).all()
    layout_only = low_rank_structure(lanczos, e.layout, k=3)
    assert torch.allclose(layout_only.energy_share, expected, atol=1e-10) and layout_only.g_alignment is None
    assert layout_only.to_dict()["a_alignment"] is None


def test_results_without_a_layout_are_refused():
    model, loss_fn = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double(), nn.CrossEntropyLoss()
    X, y = classification_data()
    eigs = kh.compute_kfac(model, loss_fn, (X, y)).eig()
    with pytest.raises(TypeError, match="needs its layout"):
        low_rank_structure(eigs["1"], eigs["1"], k=2)
    with pytest.raises(ValueError, match="do not reshape"):
        low_rank_structure(eigs["2"], eigs["0"], k=2)
    with pytest.raises(ValueError, match="pass k="):
        low_rank_structure(eigs["0"], eigs["0"])
