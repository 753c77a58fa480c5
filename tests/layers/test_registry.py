"""The layer-kind registry: the order kinds are tried in, a kind a user registers for their own module, and the
selection (``layers=``, frozen modules, what is left out)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import kfac_hessian as kh
from kfac_hessian.layers import KroneckerKind
from kfac_hessian.layout import BlockLayout

from ..conftest import classification_data, mlp
from ..references import dense_ggn, rel_err


class ScaledLinear(nn.Module):
    """A user's layer: ``z = W (s ⊙ x)`` with a fixed scale buffer ``s`` and no bias."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d_in))

    def forward(self, x: Tensor) -> Tensor:
        return (self.scale * x) @ self.weight.T


class ScaledLinearKind(KroneckerKind):
    """The kind of ``docs/layer_kinds.md``: the layout, the input rows ``ā = s ⊙ x`` and the output rows."""

    name = "scaled_linear"

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, ScaledLinear)

    def layout(self, module: nn.Module) -> BlockLayout:
        d_out, d_in = module.weight.shape
        return BlockLayout(d_out, d_in, has_bias=False)

    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        return (module.scale * inputs).reshape(inputs.shape[0], -1, inputs.shape[-1])

    def output_rows(self, module: nn.Module, grads: Tensor) -> Tensor:
        return grads.reshape(grads.shape[0], grads.shape[1], -1, grads.shape[-1])


@pytest.fixture
def scaled_kind():
    kind = kh.layers.register(ScaledLinearKind())
    yield kind
    kh.layers.unregister(kind)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(ScaledLinear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def test_a_registered_kind_gives_its_kronecker_block(scaled_kind):
    model = _model()
    assert kh.layers.kinds()[0] is scaled_kind and kh.layers.kind_for(model[0]) is scaled_kind
    X, y = classification_data(n=1)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert kfac["0"].describe().startswith("Kronecker")
    assert rel_err(kfac["0"].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["0"])) < 1e-10  # one sample
    X, y = classification_data(n=9)  # several samples: A is over the scaled inputs, as for a Linear fed s ⊙ x
    block = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["0"]
    scaled = model[0].scale * X
    assert torch.allclose(block.A, scaled.T @ scaled / len(X), atol=1e-14)


def test_without_the_kind_the_module_gets_an_exact_per_sample_block():
    model = _model()
    X, y = classification_data(n=9)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert "0.weight" in kfac and "parameter of ScaledLinear (no layer kind claims it)" in kfac["0.weight"].describe()
    assert rel_err(kfac["0.weight"].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["0"])) < 1e-10


def test_register_and_unregister_check_their_argument():
    with pytest.raises(TypeError, match="LayerKind"):
        kh.layers.register(nn.Linear)
    with pytest.raises(ValueError, match="not registered"):
        kh.layers.unregister(ScaledLinearKind())
    names = [k.name for k in kh.layers.kinds()]
    assert names == ["attention", "linear", "transposed_linear", "conv", "embedding", "batch_norm", "group_norm",
                     "layer_norm", "rms_norm", "recurrent"]


def test_with_layers_given_the_summary_lists_what_was_left_out():
    model = mlp(nn.Tanh, widths=(5, 4, 4, 3))
    X, y = classification_data()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["2"])
    assert list(kfac) == ["2"]
    summary = kfac.summary()
    assert ("0: skipped (24 parameters) — not selected" in summary
            and "4: skipped (15 parameters) — not selected" in summary)
    assert "covered 20 of 59 trainable parameters (33.9 %)" in summary
