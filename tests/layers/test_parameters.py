"""Per-sample parameter blocks: free parameters, modules of no kind, overridden forwards, outputs a forward hook changes
— exact against the dense float64 GGN; and every case the per-sample bookkeeping cannot serve is skipped with its
reason or refused, never computed wrong."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_hessian as kh

from ..conftest import FunctionScaled, batches, classification_data
from ..references import EXACT, check_factor_spectra, dense_ggn, rel_err


class TinyViT(nn.Module):
    """Patch embedding (a module with children) that owns a class token and a position embedding, a layer-scale γ on
    the root, a LayerNorm and a head on the class token: one output position per sample."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = _PatchEmbed()
        self.mix = nn.Linear(4, 4)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.gamma * torch.tanh(self.mix(h))
        return self.head(self.norm(h)[:, 0])


class _PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(2, 4, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, 5, 4) * 0.1)

    def forward(self, x):
        patches = self.proj(x).flatten(2).transpose(1, 2)  # (N, 4, 4)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)
        return tokens + self.pos


def _images(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("name", ["embed.cls_token", "embed.pos", "gamma"])
def test_free_parameters_get_their_exact_ggn_block(name):
    model = TinyViT().double()
    X, y = _images()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(X, y, [4, 2]))
    assert "covered 107 of 107 trainable parameters (100.0 %)" in kfac.summary() and not kfac.skipped
    block = kfac[name]
    expected = "free parameter of _PatchEmbed" if name.startswith("embed") else "free parameter of TinyViT"
    described = block.describe()
    assert described.startswith(expected) and "dense block (per-sample gradients) — exact GGN block" in described
    dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])
    assert rel_err(block.to_dense(), dense) < EXACT
    check_factor_spectra(block, dense)
    # the exact path names the block's parameter the same way
    op = kh.layer_operator(model, nn.CrossEntropyLoss(), batches(X, y, [4, 2]), name, kind="ggn")
    assert rel_err(op.to_dense(), dense) < EXACT and kfac.parameter_names[name] == [name]


def test_above_the_size_limit_the_exact_diagonal(monkeypatch):
    import kfac_hessian.limits as limits

    monkeypatch.setattr(limits, "DENSE_BLOCK_LIMIT", 10)
    model = TinyViT().double()
    X, y = _images()
    block = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["embed.pos"]  # 20 parameters
    assert block.blocks.shape == (20, 1, 1) and "exact entries of the GGN block" in block.describe()
    dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["embed.pos"])
    assert rel_err(block.to_dense(), torch.diag(dense.diagonal())) < EXACT


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: an nn.LayerNorm over the channels of NCHW inputs (its own forward permutes)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class _ConvNet(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.norm, self.head = nn.Conv2d(2, 3, 3, padding=1), norm, nn.Linear(3, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("size", [4, 8])  # the old failure modes: a shape error at one size, a wrong block at another
def test_a_subclass_with_its_own_forward_is_not_taken_for_its_base(size):
    model = _ConvNet(LayerNorm2d(3)).double()
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(5, 2, size, size, generator=g), torch.randint(0, 3, (5,), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert "norm" not in kfac and {"norm.weight", "norm.bias"} <= set(kfac)
    assert kfac["norm.weight"].describe().startswith("LayerNorm2d overrides nn.LayerNorm.forward")
    for name in ("norm.weight", "norm.bias"):
        assert rel_err(kfac[name].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])) < EXACT


def test_an_output_changed_by_a_forward_hook_is_detected_and_served_exactly():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    handle = model[0].register_forward_hook(lambda module, args, output: 2.0 * output + 0.1)
    try:
        X, y = classification_data()
        kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
        assert "0" not in kfac and "output differs from the linear formula" in kfac["0.weight"].describe()
        for name in ("0.weight", "0.bias"):
            assert rel_err(kfac[name].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])) < EXACT
        assert kfac["2"].describe().startswith("Kronecker")
    finally:
        handle.remove()


class _Scaled(nn.Module):
    """A free parameter on a module whose forward is not per sample (``coupled``) or not deterministic (dropout)."""

    def __init__(self, coupled: bool):
        super().__init__()
        self.scale, self.coupled = nn.Parameter(torch.ones(5)), coupled
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.scale * (x - x.mean(0) if self.coupled else self.drop(x))


@pytest.mark.parametrize("coupled, reason", [(True, "from that sample alone"), (False, "dropout in train mode")])
def test_modules_that_are_not_per_sample_are_skipped_with_the_reason(coupled, reason):
    torch.manual_seed(6)
    model = nn.Sequential(_Scaled(coupled), nn.Linear(5, 3)).double().train()
    X, y = classification_data()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), seed=0)
    assert "0.scale" not in kfac and reason in kfac.skipped["0.scale"]
    assert "0.scale: skipped (5 parameters)" in kfac.summary() and "1" in kfac


class _Positions(nn.Module):
    """A position embedding called on unbatched indices, its output broadcast over the samples — or reduced over
    the batch axis (which the expansion to the batch would change)."""

    def __init__(self, reduce_over_batch: bool = False):
        super().__init__()
        torch.manual_seed(7)
        self.tok, self.pos, self.head = nn.Embedding(5, 3), nn.Embedding(4, 3), nn.Linear(3, 2)
        self.reduce_over_batch = reduce_over_batch

    def forward(self, tokens, positions=None):
        if positions is None:
            positions = torch.arange(tokens.shape[1]).unsqueeze(0)  # (1, T): broadcast over the batch
        pos = self.pos(positions)
        if self.reduce_over_batch:
            pos = pos.sum(0)
        return self.head(torch.tanh(self.tok(tokens) + pos)).transpose(1, 2)


def test_unbatched_calls_are_expanded_to_the_batch():
    model = _Positions().double()
    g = torch.Generator().manual_seed(8)
    tokens, labels = torch.randint(0, 5, (6, 4), generator=g), torch.randint(0, 2, (6, 4), generator=g)
    broadcast = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(tokens, labels, [4, 2]))

    class Batched(nn.Module):  # the same model, called with the positions expanded to the batch by hand
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, tokens):
            return self.inner(tokens, torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1))

    batched = kh.compute_kfac(Batched(), nn.CrossEntropyLoss(), batches(tokens, labels, [4, 2]))
    for name in ("pos", "tok", "head"):
        assert rel_err(broadcast[name].to_dense(), batched[f"inner.{name}"].to_dense()) < EXACT


def test_an_expansion_that_changes_the_model_output_is_refused():
    model = _Positions(reduce_over_batch=True).double()
    tokens, labels = torch.randint(0, 5, (6, 4)), torch.randint(0, 2, (6, 4))
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens, labels))
    # the probe's check: expanding pos to the batch changes the model output, so it is not expanded — and its output,
    # shared by all samples, gives no per-sample curvature: skipped with the reason, the other layers computed
    assert "pos" not in kfac and "tok" in kfac and "head" in kfac
    assert "shared by all samples" in kfac.skipped["pos"] and "not broadcast over the samples" in kfac.skipped["pos"]
    with pytest.raises(ValueError, match="layer 'pos': its output .* is shared by all samples"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens, labels), layers=["pos"])


class _SequenceFirst(nn.Module):
    """A Linear and a LayerNorm applied to (T, N, d) tensors, as in nn.Transformer(batch_first=False)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.fc, self.norm, self.head = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x):  # x: (N, T, 3)
        h = self.norm(torch.tanh(self.fc(x.transpose(0, 1))))  # (T, N, 4)
        return self.head(h).permute(1, 2, 0)  # (N, 2, T)


class _BatchFirst(nn.Module):
    def __init__(self, twin: _SequenceFirst):
        super().__init__()
        self.fc, self.norm, self.head = twin.fc, twin.norm, twin.head

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.fc(x)))).transpose(1, 2)


@pytest.mark.parametrize("length", [3, 5])
def test_sequence_first_calls(length):
    """(T, N, d) tensors with T ≠ N and T == N (5 samples): the sample-axis probe finds axis 1 whatever the sizes."""
    model = _SequenceFirst().double()
    g = torch.Generator().manual_seed(10)
    X, y = torch.randn(5, length, 3, generator=g), torch.randint(0, 2, (5, length), generator=g)
    twin = _BatchFirst(model)
    for approx in ("expand", "reduce"):
        kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), approx=approx, per_position=True)
        reference = kh.compute_kfac(twin, nn.CrossEntropyLoss(), (X, y), approx=approx, per_position=True)
        for name in ("fc", "head"):  # the factors of the batch-first twin
            assert rel_err(kfac[name].A, reference[name].A) < EXACT and rel_err(kfac[name].G, reference[name].G) < EXACT
        # the normalization block: the exact GGN block of the sequence-first layer
        dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["norm"])
        assert rel_err(kfac["norm"].to_dense(), dense) < EXACT and kfac["norm"].status == "exact GGN block"


def _parametrized_mlp(parametrization: str) -> nn.Sequential:
    torch.manual_seed(0)
    first = nn.Linear(5, 4)
    if parametrization == "weight_norm":
        first = nn.utils.parametrizations.weight_norm(first)
    elif parametrization == "spectral_norm":
        first = nn.utils.parametrizations.spectral_norm(first)
    elif parametrization == "orthogonal":
        first = nn.utils.parametrizations.orthogonal(first)
    return nn.Sequential(first, nn.Tanh(), nn.Linear(4, 3)).double()


@pytest.mark.parametrize("parametrization", ["weight_norm", "spectral_norm", "orthogonal"])
def test_parametrized_weights_get_exact_blocks_of_their_originals_on_both_paths(parametrization):
    model = _parametrized_mlp(parametrization)  # train mode: spectral_norm would step its power iteration
    X, y = classification_data(n=6)
    X = X.double()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    originals = [n for n, _ in model.named_parameters() if ".parametrizations.weight.original" in n]
    assert originals and kfac.covered_params() == kfac.total_params == sum(p.numel() for p in model.parameters())
    if parametrization == "weight_norm":  # torch: no forward-mode derivative, an asymmetric second derivative
        with pytest.raises(NotImplementedError, match="weight_norm"):
            kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "0")
    else:  # the exact path covers the originals too
        op = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "0", kind="ggn")
        assert op.param_names == ["0.bias", *originals]
        dense = op.to_dense()
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers()) and model.training
    model.eval()  # the reference: the function the passes see (parametrizations in eval mode)
    if parametrization != "weight_norm":
        assert rel_err(dense, dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["0.bias", *originals])) < EXACT
    for name in ["0.bias", *originals]:
        assert "computed by a parametrization" in kfac[name].describe()
        assert rel_err(kfac[name].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])) < EXACT


def test_the_deprecated_hook_weight_norm_is_skipped_with_the_fix():
    with pytest.warns(FutureWarning):
        first = nn.utils.weight_norm(nn.Linear(5, 4))
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(4, 3))
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), classification_data())
    assert "parametrizations.weight_norm" in kfac.skipped["0"] and list(kfac) == ["2"]
    assert kfac.counts["0"] == sum(p.numel() for p in first.parameters())
    with pytest.raises(ValueError, match="parametrizations.weight_norm"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), classification_data(), layers=["0"])


def test_torch_vmap_fallback_notices_do_not_reach_the_user():
    model = _parametrized_mlp("orthogonal")  # tril_ has no vmap batching rule: torch warns about its slow fallback
    X, y = classification_data(n=6)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="There is a performance drop")
        kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X.double(), y))
        kh.layer_operator(model, nn.CrossEntropyLoss(), (X.double(), y), "0", kind="ggn") @ torch.ones(
            sum(p.numel() for _, p in model[0].named_parameters()), dtype=torch.float64)
    assert "0.parametrizations.weight.original" in kfac


def test_per_sample_blocks_carry_no_autograd_graph():
    class Scaled(nn.Module):  # the per-sample re-run of `scale` also runs through the trainable lin.weight
        def __init__(self):
            super().__init__()
            self.lin, self.scale = nn.Linear(5, 3), nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.lin(x) * self.scale

    kfac = kh.compute_kfac(Scaled(), nn.CrossEntropyLoss(), classification_data())
    assert "scale" in kfac and not any(t.requires_grad for b in kfac.values() for t in b.state().values()
                                        if isinstance(t, torch.Tensor))


def test_a_parametrized_layer_without_bias_named_alone():
    torch.manual_seed(0)  # its first trainable tensor is an original, under a dotted name
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(5, 4, bias=False)), nn.Tanh(),
                          nn.Linear(4, 3)).double()
    X, y = classification_data(n=6)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X.double(), y), layers=["0"])
    names = ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1"]
    assert list(kfac) == names
    for name in names:
        assert rel_err(kfac[name].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X.double(), y, [name])) < EXACT


def test_a_module_with_an_old_style_autograd_function_gets_its_exact_block_without_vmap():
    """torch.func refuses an old-style ``torch.autograd.Function`` (BLOOM's ``GeLUFunction``): the per-sample
    gradients run one sample at a time with plain autograd, and the block equals the plain twin's dense GGN."""
    model = nn.Sequential(nn.Linear(5, 4), FunctionScaled(), nn.Linear(4, 3)).double()
    twin = nn.Sequential(nn.Linear(5, 4), FunctionScaled(plain=True), nn.Linear(4, 3)).double()
    twin.load_state_dict(model.state_dict())
    X, y = classification_data(n=6)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(X.double(), y, [4, 2]))
    assert rel_err(kfac["1.scale"].to_dense(), dense_ggn(twin, nn.CrossEntropyLoss(), X.double(), y, ["1"])) < EXACT
