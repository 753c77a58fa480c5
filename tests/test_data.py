"""Malformed data gives ValueError with an explanation."""

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from .conftest import classification_data, mlp


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "data is empty"),
        (iter([]), "data is empty"),
        ([torch.randn(3, 5)], "not an \\(inputs, targets\\) pair"),
        ([(torch.randn(3, 5), torch.randint(0, 3, (3,)), 1)], "length 3"),
        ([(torch.randn(3, 5), [0, 1, 2])], "targets must be a tensor"),
        ([(torch.randn(0, 5), torch.zeros(0, dtype=torch.long))], "batch 0 is empty"),
        (torch.randn(3, 5), "iterable of such pairs"),
    ],
)
def test_bad_data(data, match):
    with pytest.raises(ValueError, match=match):
        kh.compute_kfac(mlp(), nn.CrossEntropyLoss(), data)


def test_one_shot_iterator_refused_by_operators():
    X, y = classification_data()
    with pytest.raises(ValueError, match="one-shot iterator"):
        kh.layer_operator(mlp(), nn.CrossEntropyLoss(), iter([(X, y)]), "0")


def test_data_loader_works():
    X, y = classification_data(n=10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    a = kh.compute_kfac(mlp(), nn.CrossEntropyLoss(), loader)
    b = kh.compute_kfac(mlp(), nn.CrossEntropyLoss(), (X, y))
    assert torch.allclose(a["0"].G, b["0"].G, atol=1e-14)
