"""Malformed data gives ValueError with an explanation."""

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from .conftest import Transpose as Transpose12
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


class _Keyword(nn.Module):
    """A model with keyword inputs returning an object with ``.logits`` and more (as transformers models do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()

    def forward(self, features, scale=1.0):
        class Output:
            logits = self.net(features * scale)
            hidden = features
        return Output()


def test_dict_inputs_and_logits_outputs_on_both_paths():
    X, y = classification_data()
    model = _Keyword()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), ({"features": X, "scale": 2.0}, y))
    plain = kh.compute_kfac(model.net, nn.CrossEntropyLoss(), (2.0 * X, y))
    assert torch.allclose(kfac["net.0"].G, plain["0"].G, atol=1e-14)
    op = kh.layer_operator(model, nn.CrossEntropyLoss(), ({"features": X, "scale": 2.0}, y), "net.0", kind="ggn")
    assert torch.allclose(op.to_dense(), kh.layer_operator(model.net, nn.CrossEntropyLoss(), (2.0 * X, y), "0",
                                                           kind="ggn").to_dense(), atol=1e-14)


def test_other_outputs_need_an_output_selector():
    X, y = classification_data()

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x), x

    with pytest.raises(ValueError, match="returned tuple, not a tensor: pass output="):
        kh.compute_kfac(Pair(), nn.CrossEntropyLoss(), (X, y))
    kfac = kh.compute_kfac(Pair(), nn.CrossEntropyLoss(), (X, y), output=lambda out: out[0])
    assert kfac.layer_names == ["net.0", "net.2"]
    with pytest.raises(ValueError, match="output= must return a tensor"):
        kh.compute_kfac(Pair(), nn.CrossEntropyLoss(), (X, y), output=lambda out: out)


def test_language_model_logits_are_presented_classes_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))  # logits (N, T, V)
    tokens = torch.randint(0, 7, (3, 5))
    with pytest.raises(ValueError, match="classes last.*output=kfac_hessian.sequence_logits"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens, tokens))
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens, tokens), output=kh.sequence_logits)
    transposed = kh.compute_kfac(nn.Sequential(model, Transpose12()), nn.CrossEntropyLoss(), (tokens, tokens))
    assert torch.allclose(kfac["1"].G, transposed["0.1"].G, atol=1e-14)
