"""Normalization layers: the exact dense (γ, β) GGN block, and per-feature 2×2 blocks above the size limit,
against the dense float64 GGN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from .conftest import batches
from .references import check_factor_spectra, dense_ggn


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
    factor = kfac.other_factors[name]
    assert factor.dense
    model.eval()
    dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])  # public order: γ's then β's
    assert torch.allclose(factor.to_dense(), dense, rtol=1e-10, atol=1e-14)
    check_factor_spectra(factor, dense)


@pytest.mark.parametrize("name", ["bn", "ln"])
def test_wide_layers_keep_the_exact_per_feature_blocks(name, monkeypatch):
    import kfac_hessian.normalization as normalization

    monkeypatch.setattr(normalization, "DENSE_NORM_LIMIT", 4)
    model = _Norms().double()
    X, y = _data()
    factor = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y)).other_factors[name]
    assert not factor.dense and "2×2" in factor.describe()
    model.eval()
    dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])
    f = factor.n_features
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
    assert torch.allclose(kfac.other_factors["bn"].to_dense(), dense, rtol=1e-10, atol=1e-14)
    text = kfac.summary()
    assert "bn: normalization, exact dense (γ, β) block of 4 features, P=8" in text
    assert "covered 145 of 145 parameters" in text
    kfac.save(tmp_path / "k.pt")
    loaded = kh.KFAC.load(tmp_path / "k.pt")
    assert torch.equal(loaded.other_factors["ln"].matrix, kfac.other_factors["ln"].matrix)
    assert loaded.summary() == text


def test_norm_layers_by_name_and_frozen():
    model = _Norms().double()
    X, y = _data()
    only = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["ln"])
    assert list(only.other_factors) == ["ln"] and len(only) == 0
    model.gn.requires_grad_(False)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert "gn" not in kfac.other_factors and "frozen" in kfac.skipped["gn"]


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
