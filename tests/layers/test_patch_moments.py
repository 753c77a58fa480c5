"""Patch moments from shifted products against explicitly sliced patches (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.layers.base import PassSettings
from kfac_hessian.layers.conv import ConvKind, padding_amounts
from kfac_hessian.layers.kronecker import KroneckerSums
from kfac_hessian.layers.patch_moments import Geometry, patch_moments

from ..conftest import TinyCNN
from ..references import rel_err


def explicit_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N·locations, c·k_h·k_w)`` patches sliced from a zero-padded copy of ``x`` — no ``unfold`` — channel-major
    as ``weight.flatten()``; the output size is read off the module's own output."""
    out = module(x)
    if isinstance(module, nn.Conv1d):
        x, out = x.unsqueeze(2), out.unsqueeze(2)
        (kh, kw), (dh, dw) = (1, module.kernel_size[0]), (1, module.dilation[0])
        padding = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
    else:
        (kh, kw), (dh, dw), padding = module.kernel_size, module.dilation, module.padding
    h_out, w_out = out.shape[-2:]
    if padding == "valid":
        top, left = 0, 0
    elif padding == "same":  # PyTorch puts the extra element of an odd total on the right
        top, left = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    else:
        top, left = padding
    n, c, h, w = x.shape
    padded = torch.zeros(n, c, h_out + dh * (kh - 1), w_out + dw * (kw - 1), dtype=x.dtype)
    padded[:, :, top : top + h, left : left + w] = x
    columns = [padded[:, ch, dh * i : dh * i + h_out, dw * j : dw * j + w_out].reshape(n, -1)
               for ch in range(c) for i in range(kh) for j in range(kw)]
    return torch.stack(columns, -1).reshape(-1, len(columns))


def geometry(conv: nn.Module) -> Geometry:
    return Geometry(tuple(conv.kernel_size), tuple(conv.dilation), tuple(padding_amounts(conv)))


CONV2D = [dict(kernel_size=k, dilation=d, padding=p) for k in (1, 3, (3, 2), 5) for d in (1, 2)
          for p in (0, 1, 2, "same", "valid") if not (p == "same" and d == 2 and k == (3, 2))]
CONV1D = [dict(kernel_size=k, dilation=d, padding=p) for k in (2, 3) for d in (1, 3) for p in (0, 1, "same")]


@pytest.mark.parametrize("kind, options", [("2d", o) for o in CONV2D] + [("1d", o) for o in CONV1D])
def test_patch_moments_equal_explicit_patches(kind, options):
    torch.manual_seed(0)
    conv = (nn.Conv2d if kind == "2d" else nn.Conv1d)(3, 2, **options).double()
    x = torch.randn(4, 3, 10, 9, dtype=torch.float64) if kind == "2d" else torch.randn(4, 3, 12, dtype=torch.float64)
    patches = explicit_patches(conv, x)
    gram, sums, rows = patch_moments(geometry(conv), x, torch.float64)
    assert rows == patches.shape[0]
    assert rel_err(gram, patches.T @ patches) < 1e-12
    assert rel_err(sums, patches.sum(0)) < 1e-12


def test_patch_moments_accumulate_in_the_requested_dtype():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    gram, sums, _ = patch_moments(geometry(conv), x, torch.float64)
    patches = explicit_patches(conv.double(), x.double())
    assert gram.dtype == sums.dtype == torch.float64
    assert rel_err(gram, patches.T @ patches) < 1e-12


@pytest.mark.parametrize("conv, approx, shifted", [
    (nn.Conv2d(2, 2, 3, padding=1), "expand", True),
    (nn.Conv1d(2, 2, 3, dilation=2), "expand", True),
    (nn.Conv2d(2, 2, 3, padding=1), "reduce", False),
    (nn.Conv2d(2, 2, 3, stride=2), "expand", False),
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "expand", False),
    (nn.Conv2d(2, 2, 3, padding=1, groups=2), "expand", False),
    (nn.Conv3d(2, 2, 3, padding=1), "expand", False),
])
def test_which_convolutions_take_the_shifted_products(conv, approx, shifted):
    sums = KroneckerSums(ConvKind(), "c", conv, PassSettings(approx, torch.float32, torch.device("cpu")))
    assert (ConvKind()._shifted(conv, sums) is not None) == shifted


def test_compute_kfac_gives_the_same_factors_with_unfolded_patches(monkeypatch):
    model = TinyCNN().double()  # conv1: stride 1, padding 1 (shifted products); conv2: stride 2 (unfolded)
    X, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    shifted = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    monkeypatch.setattr(ConvKind, "_shifted", lambda self, module, sums: None)
    unfolded = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    for name in shifted:
        assert rel_err(shifted[name].A, unfolded[name].A) < 1e-13
        assert torch.equal(shifted[name].G, unfolded[name].G)
