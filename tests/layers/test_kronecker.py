"""Every Kronecker kind's rows reproduce the layer's own forward pass: z = W ā at every location, per group; which
parameters a Kronecker block covers."""

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.layers import kind_for
from kfac_hessian.layers.conv import ConvKind
from kfac_hessian.layers.linear import LinearKind

from ..conftest import classification_data
from ..references import EXACT, dense_ggn, rel_err


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(4, 3), (2, 4)),
        (nn.Linear(4, 3), (2, 5, 6, 4)),
        (nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (2, 2, 9)),
        (nn.Conv1d(2, 3, 4, padding="same"), (2, 2, 9)),
        (nn.Conv1d(4, 6, 3, groups=2, padding=1), (2, 4, 7)),
        (nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (2, 2, 6, 7)),
        (nn.Conv2d(2, 3, 2, padding="same", padding_mode="circular"), (2, 2, 5, 5)),
        (nn.Conv2d(2, 3, 3, padding="valid", bias=False), (2, 2, 5, 5)),
        (nn.Conv2d(4, 4, 3, groups=4, padding=1), (2, 4, 5, 5)),  # depthwise
        (nn.Conv2d(6, 4, 3, groups=2, stride=2, padding=1, padding_mode="reflect"), (2, 6, 6, 6)),
        (nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)), (2, 2, 4, 6, 5)),
        (nn.Conv3d(4, 6, 3, groups=2, padding="same", bias=False), (2, 4, 4, 4, 4)),
    ],
)
def test_rows_reproduce_forward(layer, shape):
    layer = layer.double()
    kind = kind_for(layer)
    x = torch.randn(shape)
    z = layer(x)
    layout = kind.layout(layer)
    rows = kind.input_rows(layer, x)  # (N, T, groups·d_in)
    assert rows.shape[-1] == layout.groups * layout.d_in
    n, t = rows.shape[:2]
    grouped = rows.reshape(n, t, layout.groups, layout.d_in)
    w = kind.weight_matrices(layer)  # (groups, d_out, d_in)
    z_rows = torch.einsum("ntgi,goi->ntgo", grouped, w).reshape(n, t, -1)
    if layer.bias is not None:
        z_rows = z_rows + layer.bias
    assert torch.allclose(kind.output_rows(layer, z.unsqueeze(0))[0], z_rows, atol=1e-12)


def test_unbatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="batched"):
        ConvKind().input_rows(nn.Conv2d(1, 1, 1), torch.randn(1, 3, 3))
    with pytest.raises(ValueError, match="unbatched"):
        LinearKind().input_rows(nn.Linear(3, 1), torch.randn(3))


@pytest.mark.parametrize("make", [lambda: nn.Linear(5, 4), lambda: nn.Conv1d(5, 4, 1)], ids=["linear", "conv"])
def test_a_frozen_bias_is_not_folded_into_the_trainable_weights_block(make):
    torch.manual_seed(0)
    layer = make()
    layer.bias.requires_grad_(False)  # fine-tuning the weight only

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = layer, nn.Linear(4, 3)

        def forward(self, x):
            h = self.layer(x.unsqueeze(-1)).squeeze(-1) if isinstance(self.layer, nn.Conv1d) else self.layer(x)
            return self.head(torch.tanh(h))

    model = Model().double()
    X, y = classification_data(n=1)  # one sample: the Kronecker block is the exact GGN block of its parameters
    X = X.double()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert kfac.parameter_names["layer"] == ["layer.weight"] and "layer.bias" in kfac.skipped
    assert rel_err(kfac["layer"].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["layer.weight"])) < EXACT
