"""Unfolded layer inputs reproduce each layer's own forward pass: z = W ā at every location."""

import pytest
import torch
from torch import nn

from kfac_hessian.layers import input_rows, output_rows, select_layers, weight_matrix_shape


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(4, 3), (2, 4)),
        (nn.Linear(4, 3), (2, 5, 6, 4)),
        (nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (2, 2, 9)),
        (nn.Conv1d(2, 3, 4, padding="same"), (2, 2, 9)),
        (nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (2, 2, 6, 7)),
        (nn.Conv2d(2, 3, 2, padding="same", padding_mode="circular"), (2, 2, 5, 5)),
        (nn.Conv2d(2, 3, 3, padding="valid", bias=False), (2, 2, 5, 5)),
    ],
)
def test_rows_reproduce_forward(layer, shape):
    layer = layer.double()
    x = torch.randn(shape)
    z = layer(x)
    rows = input_rows(layer, x)  # (N, T, d_in)
    d_out, d_in = weight_matrix_shape(layer)
    assert rows.shape[-1] == d_in
    w = layer.weight.reshape(d_out, d_in)
    z_rows = rows @ w.T + (layer.bias if layer.bias is not None else 0)
    assert torch.allclose(output_rows(layer, z.unsqueeze(0))[0], z_rows, atol=1e-12)


def test_unbatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="batched"):
        input_rows(nn.Conv2d(1, 1, 1), torch.randn(1, 3, 3))
    with pytest.raises(ValueError, match="unbatched"):
        input_rows(nn.Linear(3, 1), torch.randn(3))


def test_select_layers_without_supported_layers():
    with pytest.raises(ValueError, match="no supported layer"):
        select_layers(nn.Sequential(nn.LayerNorm(3)), None)
