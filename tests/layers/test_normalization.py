"""Normalization layers: the exact dense (γ, β) GGN block, and per-feature blocks above the size limit, against the
dense float64 GGN; RMSNorm, LayerNorm without bias, and an RMSNorm-like module by registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.blocks import DenseBlocks

from ..conftest import batches, classification_data
from ..references import check_factor_spectra, dense_ggn


class _Norms(nn.Module):
    """conv → BatchNorm2d → GroupNorm → pooled linear → LayerNorm → linear, every norm affine."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():  # non-trivial running statistics and affine parameters
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            for norm in (self.bn, self.gn, self.ln):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = torch.tanh(self.gn(self.bn(self.conv(x))))
        return self.head(torch.tanh(self.ln(self.fc(h.mean((2, 3))))))


def _data(n=7):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("name", ["bn", "gn", "ln"])
def test_dense_block_equals_the_exact_ggn_block(name):
    model = _Norms().double().train()  # BatchNorm is evaluated in eval mode by default
    X, y = _data()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(X, y, [4, 3]))
    assert model.training and model.bn.training
    factor = kfac[name]
    assert isinstance(factor, DenseBlocks) and factor.blocks.shape[0] == 1  # one dense block
    model.eval()
    dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])  # public order: γ's then β's
    assert torch.allclose(factor.to_dense(), dense, rtol=1e-10, atol=1e-14)
    check_factor_spectra(factor, dense)


@pytest.mark.parametrize("name", ["bn", "ln"])
def test_wide_layers_keep_the_exact_per_feature_blocks(name, monkeypatch):
    import kfac_hessian.limits as limits

    monkeypatch.setattr(limits, "DENSE_BLOCK_LIMIT", 4)
    model = _Norms().double()
    X, y = _data()
    factor = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))[name]
    assert factor.blocks.shape[1:] == (2, 2) and "2×2" in factor.describe()
    model.eval()
    dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])
    f = factor.num_params // 2
    mask = torch.zeros(2 * f, 2 * f, dtype=torch.bool)
    index = torch.arange(f)
    for a in range(2):
        for b in range(2):
            mask[a * f + index, b * f + index] = True
    ours = factor.to_dense()
    assert torch.allclose(ours[mask], dense[mask], rtol=1e-10, atol=1e-14)
    assert ours[~mask].abs().max() == 0
    assert dense[~mask].abs().max() > 1e-6  # the dropped cross-feature blocks are really there
    check_factor_spectra(factor, ours)


def test_train_mode_batch_norm_on_request_and_summary(tmp_path):
    model = _Norms().double().train()
    X, y = _data()
    buffers = {k: v.clone() for k, v in model.bn.named_buffers()}
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), batch_norm_eval=False)
    for k, v in model.bn.named_buffers():  # the train-mode pass leaves the running statistics alone
        assert torch.equal(v, buffers[k])
    # train mode: the output's Jacobian in γ is still x̂ (batch statistics), so the blocks are the
    # dense GGN's of the train-mode function (reference without running statistics: torch.func cannot
    # update buffers)
    model.bn.track_running_stats = False
    model.bn.running_mean = model.bn.running_var = model.bn.num_batches_tracked = None
    dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["bn"])
    assert torch.allclose(kfac["bn"].to_dense(), dense, rtol=1e-10, atol=1e-14)
    text = kfac.summary()
    assert "bn: normalization, dense (γ, β) block of 4 features — exact GGN block, P=8" in text
    assert "covered 145 of 145 trainable parameters" in text
    kfac.save(tmp_path / "k.pt")
    loaded = kh.KFAC.load(tmp_path / "k.pt")
    assert torch.equal(loaded["ln"].blocks, kfac["ln"].blocks)
    assert loaded.summary() == text


def test_norm_layers_by_name_and_frozen():
    model = _Norms().double()
    X, y = _data()
    only = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["ln"])
    assert list(only) == ["ln"] and "not selected" in only.skipped["bn"]
    model.gn.requires_grad_(False)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert "gn" not in kfac and "frozen" in kfac.skipped["gn"]


def test_exact_path_runs_batch_norm_in_eval_mode_like_the_factors():
    model = _Norms().double().train()
    X, y = _data()
    op = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "bn", kind="ggn")
    dense = op.to_dense()
    assert model.training and model.bn.training
    model.eval()
    assert torch.allclose(dense, dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["bn"]), rtol=1e-10, atol=1e-14)
    model.train()
    with pytest.raises(ValueError, match="batch_norm_eval"):
        kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "bn", kind="ggn", batch_norm_eval=False) @ torch.ones(8)


class _Gammas(nn.Module):
    """Linear → RMSNorm → LayerNorm without bias → BatchNorm1d → head: normalizations with γ only or (γ, β)."""

    def __init__(self, rms: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(3, 6)
        self.rms = rms if rms is not None else nn.RMSNorm(6)
        self.ln = nn.LayerNorm(6, bias=False)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            for norm in (self.rms, self.ln, self.bn):
                norm.weight.uniform_(0.5, 1.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.ln(torch.tanh(self.rms(self.fc(x)))))))


@pytest.mark.parametrize("name, wide", [("rms", False), ("ln", False), ("bn", False), ("rms", True)])
def test_gamma_only_and_batch_norm_1d_blocks_equal_the_exact_ggn_block(name, wide, monkeypatch):
    import kfac_hessian.limits as limits

    if wide:  # above the limit a γ-only layer keeps the exact diagonal
        monkeypatch.setattr(limits, "DENSE_BLOCK_LIMIT", 4)
    model = _Gammas().double().eval()
    X, y = classification_data(n=9, d=3)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(X, y, [5, 4]))
    dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])
    block = kfac[name]
    assert block.num_params == dense.shape[0] and "normalization" in block.describe()
    if wide:
        assert "diagonal" in block.describe()
        dense = torch.diag(dense.diagonal())
    assert torch.allclose(block.to_dense(), dense, rtol=1e-10, atol=1e-14)
    check_factor_spectra(block, dense)


class LlamaStyleRMSNorm(nn.Module):
    """An RMSNorm written by hand (as transformers' LlamaRMSNorm): not an nn.RMSNorm."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(size)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_rms_norm_like_module_by_registration_equals_its_per_sample_block():
    model = _Gammas(rms=LlamaStyleRMSNorm(6)).double().eval()
    with torch.no_grad():
        model.rms.weight.uniform_(0.5, 1.5)
    X, y = classification_data(n=9, d=3)
    unregistered = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert "rms.weight" in unregistered and "no layer kind claims it" in unregistered["rms.weight"].describe()
    kind = kh.layers.register(kh.layers.NormalizationKind(
        "llama_rms_norm", [LlamaStyleRMSNorm],
        normalize=lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)))
    try:
        registered = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    finally:
        kh.layers.unregister(kind)
    assert "rms" in registered and "normalization" in registered["rms"].describe()
    dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["rms"])
    assert torch.allclose(registered["rms"].to_dense(), dense, rtol=1e-10, atol=1e-14)
    assert torch.allclose(unregistered["rms.weight"].to_dense(), dense, rtol=1e-10, atol=1e-14)
