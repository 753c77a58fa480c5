"""PassOptions: every option validated where it is declared, keywords overriding an options object, and the same
result from either way of passing them — for compute_kfac, compute_ekfac and compute_kronecker_fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian import PassOptions
from kfac_hessian.factors.options import FIELDS, split_pass_options

from ..conftest import batches, classification_data, mlp


@pytest.mark.parametrize("fields, message", [
    (dict(curvature="fisher"), "curvature must be 'ggn', 'mc' or 'empirical', got 'fisher'"),
    (dict(curvature="mc", mc_samples=0), "mc_samples must be a positive integer, got 0"),
    (dict(curvature="mc", mc_samples=True), "mc_samples must be a positive integer, got True"),
    (dict(curvature="mc", mc_samples=2.0), "mc_samples must be a positive integer, got 2.0"),
    (dict(position_signs=True), "position_signs must be a non-negative integer"),
    (dict(position_signs=-1), "position_signs must be a non-negative integer"),
    (dict(position_signs=1.5), "position_signs must be a non-negative integer"),
    (dict(curvature="mc", per_position=True), "apply to curvature='ggn'"),
    (dict(curvature="empirical", position_signs=2), "apply to curvature='ggn'"),
    (dict(per_position=True, position_signs=2), "pick one"),
    (dict(column_signs=0), "column_signs must be a positive integer (combinations) or None, got 0"),
    (dict(column_signs=True), "column_signs must be a positive integer"),
    (dict(curvature="mc", column_signs=4), "column_signs applies to curvature='ggn'"),
    (dict(column_signs=4, position_signs=2), "leave per_position and position_signs unset"),
    (dict(column_signs=4, per_position=True), "leave per_position and position_signs unset"),
    (dict(memory_budget=0), "memory_budget must be a positive number of bytes or None, got 0"),
    (dict(memory_budget=1.5), "memory_budget must be a positive number of bytes"),
    (dict(time_budget=-1.0), "time_budget must be a positive number of seconds or None, got -1.0"),
    (dict(time_budget=float("nan")), "time_budget must be a positive number"),
    (dict(column_chunk=0), "column_chunk must be a positive integer or None, got 0"),
    (dict(column_chunk=False), "column_chunk must be a positive integer or None, got False"),
    (dict(column_chunk=-3), "column_chunk must be a positive integer or None, got -3"),
])
def test_every_invalid_option_is_refused_with_what_it_got(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PassOptions(**fields)
    # the same check behind the keyword arguments
    with pytest.raises(ValueError, match="must|apply to|applies to|pick one|unset"):
        kh.compute_kfac(mlp(), nn.CrossEntropyLoss(), classification_data(), **fields)


def test_valid_edge_values_are_accepted():
    assert PassOptions(position_signs=0).position_signs == 0  # joint columns
    assert PassOptions(per_position=True, position_signs=0).per_position  # zero draws: no second way chosen
    assert PassOptions(curvature="mc", position_signs=0).curvature == "mc"
    assert PassOptions(column_chunk=1).column_chunk == 1 and PassOptions(curvature="mc", mc_samples=1).mc_samples == 1


@pytest.mark.parametrize("fields, draws", [
    (dict(), 1),  # ggn, one output position or many: one draw by default
    (dict(position_signs=0), 0),
    (dict(position_signs=5), 5),
    (dict(per_position=True), 0),
    (dict(curvature="mc"), 0),
    (dict(curvature="empirical"), 0),
    (dict(column_signs=3), 0),  # the combinations carry their own signs per position
])
def test_sign_draws(fields, draws):
    assert PassOptions(**fields).sign_draws == draws


def test_build_overrides_fields_and_refuses_unknown_names():
    base = PassOptions(curvature="mc", mc_samples=3, seed=1)
    built = PassOptions.build(base, seed=2, column_chunk=4)
    assert built == dataclasses.replace(base, seed=2, column_chunk=4)
    assert base.seed == 1  # frozen: the object given is left as it was
    assert PassOptions.build(None) == PassOptions()
    assert PassOptions.build(None, curvature="empirical").curvature == "empirical"
    with pytest.raises(TypeError, match=r"unexpected arguments \['mc_sample'\]"):
        PassOptions.build(base, mc_sample=2)
    with pytest.raises(TypeError, match="options must be a PassOptions, got dict"):
        PassOptions.build({"curvature": "mc"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.seed = 3
    with pytest.raises(ValueError, match="pick one"):  # the built options are validated too
        PassOptions.build(PassOptions(per_position=True), position_signs=2)


def test_split_pass_options():
    fields, rest = split_pass_options({"seed": 1, "layers": ["0"], "output": None, "approx": "reduce"})
    assert fields == {"seed": 1, "output": None} and rest == {"layers": ["0"], "approx": "reduce"}
    assert set(FIELDS) == {f.name for f in dataclasses.fields(PassOptions)}


def _equal(a: kh.KFAC, b: kh.KFAC) -> bool:
    return a.layer_names == b.layer_names and all(torch.equal(a[n].to_dense(), b[n].to_dense()) for n in a)


def test_compute_kfac_takes_an_options_object_or_keywords_alike():
    model, (X, y) = mlp(nn.Tanh), classification_data()
    data = batches(X, y, [6, 5])
    with_object = kh.compute_kfac(model, nn.CrossEntropyLoss(), data, options=PassOptions(curvature="mc", seed=0))
    with_keywords = kh.compute_kfac(model, nn.CrossEntropyLoss(), data, curvature="mc", seed=0)
    assert with_object.curvature == "mc" and _equal(with_object, with_keywords)
    # a keyword overrides the object's field: seed 1, not 0
    overridden = kh.compute_kfac(model, nn.CrossEntropyLoss(), data, options=PassOptions(curvature="mc", seed=0),
                                 seed=1)
    assert _equal(overridden, kh.compute_kfac(model, nn.CrossEntropyLoss(), data, curvature="mc", seed=1))
    assert not _equal(overridden, with_keywords)
    with pytest.raises(TypeError, match="unexpected arguments"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), data, mc_sample=2)
    with pytest.raises(ValueError, match="approx must be 'expand' or 'reduce'"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), data, approx="mean")


def test_compute_ekfac_and_the_kronecker_fit_take_options():
    model, (X, y) = mlp(nn.Tanh), classification_data()
    data = batches(X, y, [6, 5])
    options = PassOptions(curvature="empirical")
    ekfac = kh.compute_ekfac(model, nn.CrossEntropyLoss(), data, options=options)
    assert ekfac.curvature == "empirical"
    assert _equal(ekfac, kh.compute_ekfac(model, nn.CrossEntropyLoss(), data, curvature="empirical"))
    options = PassOptions(curvature="mc", seed=0)  # the fit's passes need a seed for sampled labels
    fit = kh.compute_kronecker_fit(model, nn.CrossEntropyLoss(), data, options=options, iterations=1)
    again = kh.compute_kronecker_fit(model, nn.CrossEntropyLoss(), data, curvature="mc", seed=0, iterations=1)
    assert fit.curvature == "mc" and _equal(fit, again)
