"""The KFAC mapping: products, trace and dense form of its blocks, dtype conversion, summary."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import classification_data, mlp


def test_matvec_equals_dense_and_accepts_parameter_tuples():
    model = mlp(nn.Tanh)
    X, y = classification_data()
    f = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["0"]
    v = torch.randn(f.num_params, 3)
    assert torch.allclose(f @ v, f.to_dense() @ v, atol=1e-13)
    assert torch.allclose(f @ v[:, 0], f.to_dense() @ v[:, 0], atol=1e-13)
    w, b = torch.randn_like(model[0].weight), torch.randn_like(model[0].bias)
    out_w, out_b = f @ (w, b)
    assert torch.allclose(torch.cat([out_w.flatten(), out_b]), f.to_dense() @ torch.cat([w.flatten(), b]), atol=1e-13)


def test_trace():
    f = kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), classification_data())["0"]
    assert math.isclose(float(f.trace()), float(torch.trace(f.to_dense())), rel_tol=1e-12)


def test_to_dense_refuses_large_layers():
    f = kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), classification_data())["0"]
    with pytest.raises(ValueError, match="eig"):
        f.to_dense(max_params=10)


def test_to_dtype_and_summary():
    kfac = kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), classification_data(), dtype=torch.float32)
    assert kfac["0"].A.dtype == torch.float32
    assert kfac.to(dtype=torch.float64)["0"].G.dtype == torch.float64
    assert ("0: Kronecker G ⊗ A, A (6, 6), G (4, 4) — approximation of the GGN block (Kronecker factorization), "
            "P=24") in kfac.summary()
    assert "covered 39 of 39 trainable parameters" in kfac.summary()


def test_a_skipped_block_is_named_with_the_reason_and_copies_are_independent():
    model = mlp(nn.Tanh)
    for p in model[0].parameters():
        p.requires_grad_(False)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), classification_data())
    assert kfac.layer_names == ["2"] and len(kfac) == 1 and "0" not in kfac
    with pytest.raises(KeyError, match=re.escape(f"0 was skipped: {kfac.skipped['0']}")):
        kfac["0"]
    with pytest.raises(KeyError, match=r"no block named 'nope'; blocks: \['2'\]"):
        kfac["nope"]
    copy = kfac.with_blocks(dict(kfac.blocks), n_samples=1)
    copy.skipped["other"] = "changed in the copy"
    assert copy.n_samples == 1 and kfac.n_samples == len(classification_data()[0]) and "other" not in kfac.skipped


def test_to_converts_every_block_and_keeps_how_they_were_computed():
    kfac = kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), classification_data(), curvature="empirical")
    low = kfac.to(dtype=torch.float32)
    assert all(block.dtype == torch.float32 for block in low.values())
    assert (low.curvature, low.n_samples, low.parameter_names) == (kfac.curvature, kfac.n_samples, kfac.parameter_names)
    for name in kfac:
        assert torch.allclose(low[name].to_dense().double(), kfac[name].to_dense(), rtol=1e-6, atol=1e-7)
        assert torch.allclose(kfac.eig()[name].eigenvalues, kfac[name].eig().eigenvalues, atol=1e-15)
