"""Attention: hand-written attention with nn.Linear projections is factored; nn.MultiheadAttention is skipped
with its reason; the exact path falls back to the math attention kernel when a fused one has no double backward."""

from __future__ import annotations

import warnings

import pytest

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import kfac_hessian as kh

from .references import dense_ggn, dense_hessian


class _Attention(nn.Module):
    def __init__(self, dim=8, heads=2, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = (p(x).reshape(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, e)
        return self.head(self.o(a)).transpose(1, 2)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, generator=g, dtype=dtype), torch.randint(0, 3, (3, 4), generator=g)


def test_projections_are_factored_and_multihead_attention_is_skipped_with_reason():
    model = _Attention().double()
    X, y = _data()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert kfac.layer_names == ["q", "k", "v", "o", "head"]
    mha = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True))

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = mha, nn.Linear(8, 3)

        def forward(self, x):
            h = self.inner[0](x)
            return self.head(self.inner[1](h, h, h, need_weights=False)[0]).transpose(1, 2)

    kfac = kh.compute_kfac(Wrapped().double(), nn.CrossEntropyLoss(), (X, y))
    assert "in_proj_weight" in kfac.skipped["inner.1"]
    assert "inner.1.out_proj" in kfac.skipped  # applied functionally: never called as a module


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_exact_products_through_scaled_dot_product_attention(kind):
    model = _Attention().float()
    X, y = _data(torch.float32)
    op = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "q", kind=kind)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        product = op @ v
    if op.math_attention:  # a fused kernel refused double backward: we were told
        assert any("math attention kernel" in str(w.message) for w in caught)
    reference = dense_hessian if kind == "hessian" else dense_ggn
    with sdpa_kernel([SDPBackend.MATH]):
        H = reference(model.double(), nn.CrossEntropyLoss(), X.double(), y, ["q"])
    assert torch.allclose(product.double(), H @ v.double(), rtol=1e-4, atol=1e-6)
