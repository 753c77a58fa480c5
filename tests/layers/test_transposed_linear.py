"""Transposed-weight linear layers (transformers' ``Conv1D``, ``z = x W + b`` with ``W`` of shape ``(d_in, d_out)``):
exact where the Kronecker form is, in the module's own public order (``weight.flatten()``, then the bias)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import Conv1D, batches
from ..references import EXACT, check_factor_spectra, dense_ggn, dense_hessian, rel_err


def _conv1d_classes():
    classes = [Conv1D]
    try:
        from transformers.pytorch_utils import Conv1D as HFConv1D
    except ImportError:  # pragma: no cover - transformers is a test extra
        return classes
    return classes + [HFConv1D]


class _Net(nn.Module):
    """Two Conv1D layers; on sequences (N, T, d) the output comes out as (N, C, T), axis 1 the feature axis."""

    def __init__(self, cls, activation=nn.Tanh):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.act, self.c2 = cls(4, 3), activation(), cls(2, 4)

    def forward(self, x):
        out = self.c2(self.act(self.c1(x)))
        return out.transpose(1, 2) if out.dim() == 3 else out


@pytest.mark.parametrize("cls", _conv1d_classes())
def test_one_sample_equals_the_ggn_block(cls):
    model = _Net(cls).double()
    X, y = torch.randn(1, 3), torch.tensor([1])
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    for name in ("c1", "c2"):
        block = kfac[name]
        assert block.layout.transposed and "Kronecker" in block.describe()
        dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])  # public order: weight (d_in, d_out), bias
        assert rel_err(block.to_dense(), dense) < EXACT
    check_factor_spectra(kfac["c1"], kfac["c1"].to_dense())


@pytest.mark.parametrize("cls", _conv1d_classes())
def test_deep_linear_sequence_with_mse_is_exact(cls):
    model = _Net(cls, activation=nn.Identity).double()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(5, 6, 3, generator=g), torch.randn(5, 2, 6, generator=g)
    kfac = kh.compute_kfac(model, nn.MSELoss(), batches(X, y, [3, 2]))
    for name in ("c1", "c2"):
        assert rel_err(kfac[name].to_dense(), dense_hessian(model, nn.MSELoss(), X, y, [name])) < EXACT
    # the optimizer and the local Hessians see the weight as the (d_out, d_in) matrix of z = W x
    kind = kh.layers.kind_for(model.c1)
    assert torch.equal(kind.weight_matrices(model.c1)[0], model.c1.weight.detach().T)
