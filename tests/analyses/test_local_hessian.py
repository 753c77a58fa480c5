from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import hessian

from kfac_hessian.analyses import back_matching_hessians, condition_number
from kfac_hessian.factors.driver import input_second_moments

from ..conftest import batches, classification_data


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8]))
        model[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        model[1].weight.copy_(torch.tensor([1.2, 0.7, -0.9, 1.1]))
    return model.eval()


def test_weight_local_hessian_equals_dense_hessian_of_the_back_matching_loss():
    model = _model()
    X, y = classification_data(n=9, d=4, classes=3)
    result = back_matching_hessians(model, batches(X, y, [5, 4]), batch_norm={"0": "1"})
    bn = model[1]
    Z = torch.cat([X, torch.ones(9, 1)], dim=1)  # layer 0 sees the raw inputs, bias appended
    targets = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))

    def back_matching(flat_w):  # ½ mean_n ‖BN(W̄ z̄_n) − t_n‖², BN with its running statistics
        pre = Z @ flat_w.reshape(4, 5).T
        out = bn.weight * (pre - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) + bn.bias
        return 0.5 * ((out - targets) ** 2).sum(1).mean()

    W_bar = torch.cat([model[0].weight, model[0].bias[:, None]], dim=1).detach()
    H = hessian(back_matching)(W_bar.flatten())
    ours = result["0"].weight_eigenvalues()
    assert torch.allclose(ours, torch.linalg.eigvalsh(H).flip(0), atol=1e-12)
    assert result["0"].weight_condition == pytest.approx(condition_number(torch.linalg.eigvalsh(H)), rel=1e-9)
    # and A is the input factor, mean of z̄ z̄ᵀ
    assert torch.allclose(input_second_moments(model, (X, y))["0"], Z.T @ Z / 9, atol=1e-14)


def test_input_local_hessians_plain_bn_and_residual():
    model = _model()
    X, y = classification_data(n=9, d=4, classes=3)
    result = back_matching_hessians(model, (X, y), residual=["0"], batch_norm={"0": "1"})
    bn, lin = model[1], model[0]
    t = torch.randn(4, generator=torch.Generator().manual_seed(3))

    def residual_bn(z):  # ½‖BN(z + W z + b) − t‖²
        out = bn.weight * (z + lin(z) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) + bn.bias
        return 0.5 * ((out - t) ** 2).sum()

    H = hessian(residual_bn)(X[0])
    assert torch.allclose(result["0"].input_eigenvalues, torch.linalg.eigvalsh(H).flip(0), atol=1e-12)

    def plain(z):  # last layer: ½‖W z + b − t‖² → WᵀW
        return 0.5 * ((model[3](z) - t[:3]) ** 2).sum()

    H = hessian(plain)(torch.randn(4))
    assert torch.allclose(result["3"].input_eigenvalues, torch.linalg.eigvalsh(H).flip(0).clamp_min(0), atol=1e-12)
    assert result["3"].input_condition == math.inf  # W is 3×4: WᵀW is singular


def test_orthogonal_weight_gives_condition_one():
    layer = nn.Linear(6, 6, bias=False).double()
    nn.init.orthogonal_(layer.weight)
    X = torch.randn(10, 6)
    result = back_matching_hessians(nn.Sequential(layer), (X, torch.zeros(10)))
    assert result["0"].input_condition == pytest.approx(1.0, abs=1e-12)


def test_errors():
    model = _model()
    X, y = classification_data(n=9, d=4, classes=3)
    with pytest.raises(ValueError, match="not one of"):
        back_matching_hessians(model, (X, y), residual=["2"])
    with pytest.raises(ValueError, match="square"):
        back_matching_hessians(model, (X, y), residual=["3"])
    with pytest.raises(ValueError, match="not a BatchNorm"):
        back_matching_hessians(model, (X, y), batch_norm={"0": "2"})
    with pytest.raises(ValueError, match="never called"):
        input_second_moments(_UnusedLayer(), (X, y))


class _UnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 2).double(), nn.Linear(3, 3).double()

    def forward(self, x):
        return self.used(x)
