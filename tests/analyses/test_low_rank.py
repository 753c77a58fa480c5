"""Low-rank structure of eigenvectors."""

from __future__ import annotations

import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.analyses import low_rank_structure

from ..conftest import classification_data, mlp


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
