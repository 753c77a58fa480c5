"""Attention: hand-written attention with nn.Linear projections is factored; nn.MultiheadAttention's in-projection
is one Kronecker block for self-attention and a block-diagonal per input for cross-attention; the exact path falls
back to the math attention kernel when a fused one has no double backward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import kfac_hessian as kh

from ..references import EXACT, dense_ggn, dense_hessian, rel_err


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


def test_hand_written_projections_are_factored():
    model = _Attention().double()
    X, y = _data()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert kfac.layer_names == ["q", "k", "v", "o", "head"]


class _MHA(nn.Module):
    def __init__(self, batch_first=True, cross=False, **options):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **options)
        self.head = nn.Linear(8, 3)
        self.batch_first, self.cross = batch_first, cross

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1)
        out = self.mha(h, h + 1.0 if self.cross else h, h, need_weights=False)[0]  # cross: key ≠ value
        return self.head(out if self.batch_first else out.transpose(0, 1)).transpose(1, 2)


@pytest.mark.parametrize("batch_first", [True, False])
def test_decomposed_multihead_attention_computes_the_same_function(batch_first):
    from kfac_hessian.layers.attention import AttentionKind, AttentionSums
    from kfac_hessian.layers.base import PassSettings

    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    float_mask = torch.randn(5, 5, generator=g, dtype=torch.float64)
    cases = [dict(), dict(attn_mask=causal), dict(key_padding_mask=padding), dict(attn_mask=float_mask),
             dict(attn_mask=causal, key_padding_mask=padding, average_attn_weights=False)]
    query = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)  # T_q = 2 ≠ T_kv = 5: cross-attention
    query = query if batch_first else query.transpose(0, 1)
    value = torch.randn_like(x)
    inputs = [(x, x, x)] * len(cases) + [(query, x, x), (query, x, value), (query, x, x)]
    cases += [dict(), dict(), dict(key_padding_mask=padding)]
    for args, kwargs in zip(inputs, cases):
        expected = mha(*args, **kwargs)
        sums = AttentionSums("m", mha, PassSettings("expand", torch.float64, torch.device("cpu")))
        with AttentionKind().pass_context({"m": sums}):
            got = mha(*args, **kwargs)
        assert torch.allclose(got[0], expected[0], atol=1e-12)
        assert torch.allclose(got[1], expected[1], atol=1e-12)
    assert "forward" not in mha.__dict__


def test_multihead_attention_in_projection_equals_a_linear_layer():
    model = _MHA().double()
    X, y = _data()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert {"mha", "mha.out_proj", "head"} == set(kfac.layer_names)
    assert "covered 315 of 315 trainable parameters" in kfac.summary()

    class Hand(nn.Module):  # the same attention written with nn.Linear in/out projections
        def __init__(self):
            super().__init__()
            self.in_proj, self.out_proj, self.head = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            n, t, e = x.shape
            q, k, v = (z.reshape(n, t, 2, 4).transpose(1, 2) for z in self.in_proj(x).chunk(3, -1))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, e)
            return self.head(self.out_proj(a)).transpose(1, 2)

    hand = Hand().double()
    with torch.no_grad():
        hand.in_proj.weight.copy_(model.mha.in_proj_weight)
        hand.in_proj.bias.copy_(model.mha.in_proj_bias)
        hand.out_proj.load_state_dict(model.mha.out_proj.state_dict())
        hand.head.load_state_dict(model.head.state_dict())
    reference = kh.compute_kfac(hand, nn.CrossEntropyLoss(), (X, y))
    for ours, theirs in (("mha", "in_proj"), ("mha.out_proj", "out_proj"), ("head", "head")):
        assert torch.allclose(kfac[ours].A, reference[theirs].A, atol=1e-12)
        assert torch.allclose(kfac[ours].G, reference[theirs].G, atol=1e-12)
    # the block is in the module's own order [in_proj_weight, in_proj_bias], as the exact path sees it
    op = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "mha", kind="ggn")
    assert op.param_names == ["mha.in_proj_weight", "mha.in_proj_bias"] and op.num_params == kfac["mha"].num_params


def test_unsupported_variants_get_exact_per_sample_blocks():
    X, y = _data()
    model = _MHA(add_bias_kv=True).double().eval()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert {"mha.in_proj_weight", "mha.in_proj_bias", "mha.bias_k", "mha.bias_v"} <= set(kfac) and "mha" not in kfac
    assert "add_bias_kv or add_zero_attn is not supported (no attention block)" in kfac["mha.bias_k"].describe()
    # T = 4 positions feed each output position: joint columns add cross-position terms, per-position ones do not
    exact = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), per_position=True)
    with sdpa_kernel([SDPBackend.MATH]):
        dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["mha.bias_k"])
    assert rel_err(exact["mha.bias_k"].to_dense(), dense) < 1e-10
    # out_proj is applied functionally by the unsupported variant's forward: its parameters join the per-sample blocks
    # (no hook ever sees it called), named after themselves, whole coverage, exact
    assert kfac.covered_trainable_params == kfac.trainable_params and not kfac.skipped
    with sdpa_kernel([SDPBackend.MATH]):
        for name in ["mha.out_proj.weight", "mha.out_proj.bias"]:
            dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])
            assert exact[name].status == "exact GGN block"
            assert rel_err(exact[name].to_dense(), dense) < EXACT, name
    named = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["mha"])
    assert {"mha.out_proj.weight", "mha.out_proj.bias"} <= set(named)


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


class _Decoder(nn.Module):
    """nn.TransformerDecoderLayer (sequence-first, its default) on a target of ``t_q`` positions and a memory of the
    rest; its ``multihead_attn`` is cross-attention with ``T_q ≠ T_kv``."""

    def __init__(self, t_q: int):
        super().__init__()
        torch.manual_seed(0)
        self.t_q = t_q
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x (N, T_q + T_kv, E)
        tgt, memory = x[:, : self.t_q].transpose(0, 1), x[:, self.t_q :].transpose(0, 1)
        return self.head(self.dec(tgt, memory)).transpose(0, 1).flatten(1)


def _part_positions(e: int, start: int, stop: int) -> torch.Tensor:
    """Public positions of in-projection rows ``start·E … stop·E`` in ``[in_proj_weight, in_proj_bias]``."""
    return torch.cat([torch.arange(start * e * e, stop * e * e), 3 * e * e + torch.arange(start * e, stop * e)])


@pytest.mark.parametrize(("t_q", "t_kv", "exact_part", "rows"), [(1, 3, "query", (0, 1)), (2, 1, "key/value", (1, 3))])
def test_cross_attention_parts_equal_the_dense_ggn_where_their_input_has_one_location(t_q, t_kv, exact_part, rows):
    """One sample: the query part is exact with one query position (any memory length), the key/value part with one
    memory position (its key rows then have zero curvature: a softmax over one key is constant)."""
    model = _Decoder(t_q).double().eval()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(1, t_q + t_kv, 8, generator=g, dtype=torch.float64)
    y = torch.randn(1, 3 * t_q, generator=g, dtype=torch.float64)
    kfac = kh.compute_kfac(model, nn.MSELoss(), (X, y))
    block = kfac["dec.multihead_attn"]
    assert list(block.parts) == ["query", "key/value"] and "approximation" in block.status
    assert kfac.covered_trainable_params == kfac.trainable_params  # the decoder layer is covered in full
    with sdpa_kernel([SDPBackend.MATH]):
        dense = dense_ggn(model, nn.MSELoss(), X, y, ["dec.multihead_attn"])
    positions = _part_positions(8, *rows)
    assert torch.equal(block.index[exact_part], positions)
    exact = dense[positions][:, positions]
    assert exact.norm() > 1e-6 and rel_err(block.parts[exact_part].to_dense(), exact) < EXACT


def test_cross_attention_parts_equal_linear_layers_over_each_input():
    """Any sizes: the parts' factors are those of nn.Linear q and [k; v] (or k and v) projections over the query and
    memory rows of the same attention written by hand."""
    X, y = _data()

    class Hand(nn.Module):
        def __init__(self, shared: bool):
            super().__init__()
            self.shared = shared
            self.q, self.k, self.v, self.kv = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16)
            self.out_proj, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            n, t, e = x.shape
            memory = x + 1.0
            k, v = self.kv(memory).chunk(2, -1) if self.shared else (self.k(memory), self.v(x))
            q, k, v = (z.reshape(n, t, 2, 4).transpose(1, 2) for z in (self.q(x), k, v))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, e)
            return self.head(self.out_proj(a)).transpose(1, 2)

    class Cross(_MHA):
        def __init__(self, shared: bool):
            super().__init__()
            self.shared = shared

        def forward(self, x):
            memory = x + 1.0
            out = self.mha(x, memory, memory if self.shared else x, need_weights=False)[0]
            return self.head(out).transpose(1, 2)

    for shared, parts in ((True, {"query": "q", "key/value": "kv"}), (False, {"query": "q", "key": "k", "value": "v"})):
        model = Cross(shared).double()
        hand = Hand(shared).double()
        w, b = model.mha.in_proj_weight.detach(), model.mha.in_proj_bias.detach()
        with torch.no_grad():
            for name, (start, stop) in (("q", (0, 8)), ("k", (8, 16)), ("v", (16, 24)), ("kv", (8, 24))):
                getattr(hand, name).weight.copy_(w[start:stop])
                getattr(hand, name).bias.copy_(b[start:stop])
            hand.out_proj.load_state_dict(model.mha.out_proj.state_dict())
            hand.head.load_state_dict(model.head.state_dict())
        assert torch.allclose(model(X), hand(X), atol=1e-12)
        kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
        reference = kh.compute_kfac(hand, nn.CrossEntropyLoss(), (X, y), layers=list(parts.values()))
        assert list(kfac["mha"].parts) == list(parts)
        for ours, theirs in parts.items():
            assert torch.allclose(kfac["mha"].parts[ours].A, reference[theirs].A, atol=1e-12)
            assert torch.allclose(kfac["mha"].parts[ours].G, reference[theirs].G, atol=1e-12)


def test_a_module_called_both_as_self_and_cross_attention_is_skipped():
    class Both(_MHA):
        def forward(self, x):
            out = self.mha(x, x, x, need_weights=False)[0]
            out = self.mha(out, x, x, need_weights=False)[0]
            return self.head(out).transpose(1, 2)

    X, y = _data()
    kfac = kh.compute_kfac(Both().double(), nn.CrossEntropyLoss(), (X, y))
    assert "mha" not in kfac and "both as self-attention and as cross-attention" in kfac.skipped["mha"]
