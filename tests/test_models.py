"""The reference architectures run end to end, every parameter accounted for."""

from __future__ import annotations

import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.models import ResNet18, TinyGPT


def _accounted(model: nn.Module, kfac) -> None:
    unique = sum(p.numel() for p in model.parameters())
    assert sum(kfac.module_params.values()) == unique
    assert f"covered {unique} of {unique} parameters" in kfac.summary()
    listed = {line.split(":")[0].strip() for line in kfac.summary().splitlines()[1:-1]}
    with_params = {n for n, m in model.named_modules() if list(m.parameters(recurse=False))}
    assert listed == with_params


def test_resnet18_with_batch_norm_end_to_end():
    model = ResNet18(width=4).double()
    assert sum(p.numel() for p in ResNet18().parameters()) == 11_173_962  # the standard ResNet-18 (CIFAR stem)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(3, 3, 32, 32, generator=g), torch.randint(0, 10, (3,), generator=g)
    model.train()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert model.training  # BatchNorm ran in eval mode for the pass and the mode came back
    _accounted(model, kfac)
    assert len(kfac) == 21 and len(kfac.other_factors) == 20  # 20 conv + fc; 20 BatchNorms
    eigs = kfac.eig()
    assert all(torch.isfinite(e.eigenvalues()).all() for e in eigs.values())
    assert all(torch.isfinite(f.eig().eigenvalues()).all() for f in kfac.other_factors.values())


def test_tiny_gpt_with_tied_head_end_to_end():
    model = TinyGPT(vocab=11, dim=8, depth=2, heads=2, context=6).double()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (2, 6), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens[:, :-1], tokens[:, 1:]))
    _accounted(model, kfac)
    assert kfac.tied == {"head": ["weight is tok.weight"]}
    assert set(kfac.other_factors) == {"tok", "pos", "ln", *(f"blocks.{i}.ln{j}" for i in range(2) for j in (1, 2))}
    values, vectors = kfac.other_factors["tok"].eig().topk(4)
    assert vectors.shape == (4, 88) and torch.all(values[:-1] >= values[1:])
