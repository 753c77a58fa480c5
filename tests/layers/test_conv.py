"""Convolutions (1-D/2-D/3-D, groups, depthwise): exact against dense float64 Hessians where the Kronecker form is
exact — per-location MSE with "expand", average pooling with "reduce" — and block-diagonal over groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import TinyCNN, batches
from ..references import EXACT, dense_ggn, dense_hessian, rel_err


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Conv2d(2, 3, (2, 3), stride=2, dilation=(1, 2), padding=(1, 0), bias=False),
        nn.Conv2d(2, 3, 2, padding="same", padding_mode="reflect"),
        nn.Conv1d(2, 3, 3, stride=2, padding=2),
        nn.Conv1d(4, 6, 3, groups=2, padding=1),
        nn.Conv2d(4, 6, 3, groups=2, padding=1),
        nn.Conv2d(4, 4, 3, groups=4, padding=1),  # depthwise
        nn.Conv2d(2, 6, 3, groups=2, stride=2, bias=False),  # depthwise with multiplier 3
        nn.Conv3d(2, 3, (2, 3, 2), padding=(1, 1, 0)),
        nn.Conv3d(4, 4, 3, groups=2, stride=(1, 2, 1), padding=1),
    ],
)
def test_expand_is_exact_for_per_location_mse(conv):
    torch.manual_seed(0)
    conv = conv.double()
    spatial = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}[len(conv.kernel_size)]
    X = torch.randn(4, conv.in_channels, *spatial)
    y = torch.randn_like(conv(X)).detach()
    model = nn.Sequential(conv)
    kfac = kh.compute_kfac(model, nn.MSELoss(), batches(X, y, [3, 1]), approx="expand")
    block = kfac["0"]
    assert block.layout.groups == conv.groups
    assert rel_err(block.to_dense(), dense_hessian(model, nn.MSELoss(), X, y, ["0"])) < EXACT


def test_reduce_is_exact_after_average_pooling():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    X, y = torch.randn(5, 2, 4, 4), torch.randn(5, 2)
    kfac = kh.compute_kfac(model, nn.MSELoss(), batches(X, y, [3, 2]), approx="reduce")
    assert rel_err(kfac["0"].to_dense(), dense_hessian(model, nn.MSELoss(), X, y, ["0"])) < EXACT
    expand = kh.compute_kfac(model, nn.MSELoss(), (X, y), approx="expand")
    assert rel_err(expand["0"].to_dense(), dense_hessian(model, nn.MSELoss(), X, y, ["0"])) > 1e-3


def test_grouped_block_is_the_exact_block_without_its_cross_group_terms():
    """One sample and one location: each group's G_g ⊗ A_g is exact; the dropped cross-group blocks are not zero
    when the groups meet downstream."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)).double()
    X, y = torch.randn(1, 4, 3, 3), torch.tensor([1])
    block = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["0"]
    dense = dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["0"])
    ours = block.to_dense()
    mask = ours != 0
    layout = block.layout
    in_group = torch.zeros(layout.num_params, dtype=torch.long)  # the group of every public index
    in_group[: layout.num_weights] = torch.arange(layout.groups).repeat_interleave(layout.d_out * layout.d_in)
    in_group[layout.num_weights :] = torch.arange(layout.groups).repeat_interleave(layout.d_out)
    same = in_group[:, None] == in_group[None, :]
    assert torch.equal(mask & ~same, torch.zeros_like(mask))
    assert rel_err(ours[same], dense[same]) < EXACT
    assert dense[~same].abs().max() > 1e-6
    assert "2 groups" in block.describe()


def test_depthwise_spectrum_and_top_eigenvectors():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(3, 2)).double()
    X, y = torch.randn(6, 3, 4, 4), torch.randint(0, 2, (6,))
    block = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["0"]
    dense = block.to_dense()
    from ..references import check_factor_spectra

    check_factor_spectra(block, dense, k=6)


def test_cnn_runs_and_factor_shapes():
    model = TinyCNN().double()
    X, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert kfac["conv1"].A.shape == (2 * 9 + 1, 19) and kfac["conv1"].G.shape == (3, 3)
    assert kfac["conv2"].A.shape == (3 * 4, 12)
    assert kfac["conv1"].num_params == sum(p.numel() for p in model.conv1.parameters())


def test_convolution_patches_unfolded_in_chunks_give_the_same_factors(monkeypatch):
    import kfac_hessian.limits as limits

    model = TinyCNN()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(7, 2, 4, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    whole = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    monkeypatch.setattr(limits, "WORK_BUFFER_ELEMENTS", 40)  # a few samples' patches per chunk (one conv1 sample: 288)
    chunked = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    for name in whole:
        assert torch.allclose(whole[name].A, chunked[name].A, atol=1e-14)
        assert torch.allclose(whole[name].G, chunked[name].G, atol=1e-14)
