"""The model as the user left it: compiled models are run through their eager module, never computed wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from .conftest import classification_data, mlp
from .references import rel_err


def test_a_compiled_model_gives_the_blocks_of_its_eager_module():
    model = mlp(nn.Tanh)
    X, y = classification_data()
    eager = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    compiled = torch.compile(model, backend="aot_eager")
    kfac = kh.compute_kfac(compiled, nn.CrossEntropyLoss(), (X, y))
    assert kfac.layer_names == eager.layer_names == ["0", "2"]  # the original module names, no "_orig_mod."
    for name in eager:
        assert rel_err(kfac[name].G, eager[name].G) < 1e-14 and float(kfac[name].G.norm()) > 0
    op = kh.layer_operator(compiled, nn.CrossEntropyLoss(), (X, y), "2", kind="ggn")
    assert rel_err(op.to_dense(), kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "2",
                                                    kind="ggn").to_dense()) < 1e-14


def test_modules_compiled_in_place_run_eagerly_for_the_pass_and_stay_compiled():
    model = mlp(nn.Tanh)
    X, y = classification_data()
    eager = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    model[2].compile(backend="aot_eager")
    impl = model[2]._compiled_call_impl
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert model[2]._compiled_call_impl is impl
    assert rel_err(kfac["2"].G, eager["2"].G) < 1e-14


def test_a_compiled_submodule_is_refused_with_the_fix():
    model = nn.Sequential(mlp(nn.Tanh))
    model[0] = torch.compile(model[0], backend="aot_eager")
    with pytest.raises(ValueError, match=r"submodule '0' is a torch.compile'd OptimizedModule.*_orig_mod"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), classification_data())
