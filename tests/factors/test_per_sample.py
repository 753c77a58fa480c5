"""The per-sample pass behind EKFAC and the Kronecker fit: the KFAC result it starts from must fit the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import classification_data


def test_results_that_do_not_fit_the_model_are_refused():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = classification_data(n=10)
    X = X.double()
    norm_only = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["1"])
    with pytest.raises(ValueError, match="no Kronecker block"):
        kh.compute_ekfac(model, nn.CrossEntropyLoss(), (X, y), kfac=norm_only)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match="no layer or parameter named '3'"):
        kh.compute_kronecker_fit(nn.Sequential(nn.Linear(5, 3)).double(), nn.CrossEntropyLoss(), (X, y), kfac=kfac)
    swapped = nn.Sequential(nn.LayerNorm(5), nn.Tanh(), nn.Tanh(), nn.Linear(5, 3)).double()  # "0" is no Linear now
    with pytest.raises(ValueError, match=r"layers \['0'\] are not the Kronecker layers"):
        kh.compute_kronecker_fit(swapped, nn.CrossEntropyLoss(), (X, y), kfac=kfac)


def test_the_correction_pass_takes_the_curvature_of_the_kfac_it_is_given():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = classification_data(n=10)
    empirical = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="empirical")
    given = kh.compute_ekfac(model, nn.CrossEntropyLoss(), (X, y), kfac=empirical)
    own = kh.compute_ekfac(model, nn.CrossEntropyLoss(), (X, y), curvature="empirical")
    assert given.curvature == own.curvature == "empirical"
    assert all(torch.equal(given[n].values, own[n].values) for n in ("0", "2"))
    ggn = kh.compute_ekfac(model, nn.CrossEntropyLoss(), (X, y))
    assert not torch.allclose(ggn["0"].values, given["0"].values)  # the columns differ
