"""The checks of a pass: non-finite values are refused with where they are, an all-zero block is warned about."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import classification_data, mlp


@pytest.mark.parametrize("where", ["input", "weight"])
def test_non_finite_values_raise(where):
    model = mlp()
    X, y = classification_data()
    if where == "input":
        X = X.clone()
        X[3, 1] = float("nan")
    else:
        with torch.no_grad():
            model[2].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="batch 0"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))


def test_non_finite_activation_names_the_layer():
    class DeadBranch(nn.Module):
        """A layer on a branch that never reaches the output sees Inf while the output stays finite."""

        def __init__(self):
            super().__init__()
            self.probe, self.fc = nn.Linear(5, 2), nn.Linear(5, 3)

        def forward(self, x):
            self.probe(x * float("inf"))
            return self.fc(x)

    X, y = classification_data()
    with pytest.raises(FloatingPointError, match="A factor of layer 'probe' after batch 0"):
        kh.compute_kfac(DeadBranch().double(), nn.CrossEntropyLoss(), (X, y))


def test_a_block_without_curvature_is_warned_about():
    model = mlp(nn.Tanh)
    with torch.no_grad():
        model[2].weight.zero_()  # a zero-initialised head: nothing reaches layer 0
    with pytest.warns(RuntimeWarning, match=r"blocks \['0'\] are exactly zero"):
        kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), classification_data())
    assert float(kfac["0"].trace()) == 0 and float(kfac["2"].trace()) > 0


def test_require_finite_checks_entries_only_when_the_sum_is_not_finite():
    from kfac_hessian.factors.checks import all_finite, require_finite

    huge = torch.full((2,), torch.finfo(torch.float64).max, dtype=torch.float64)
    assert not torch.isfinite(huge.sum())  # the sum overflows, every entry is finite: no error
    require_finite(huge, "huge")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(FloatingPointError, match="the sums of layer 'x' contains NaN or Inf"):
            require_finite(torch.tensor([1.0, bad]), "the sums of layer 'x'")
    assert all_finite({"a": torch.ones(2), "b": (3, "text", [torch.zeros(1)])})
    assert not all_finite({"a": torch.ones(2), "b": (3, [torch.tensor([float("nan")])])})
