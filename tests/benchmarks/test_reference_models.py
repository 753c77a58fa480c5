"""The reference architectures run end to end, every parameter accounted for."""

from __future__ import annotations

import torch
from torch import nn

import kfac_hessian as kh
from benchmarks.reference_models import ResNet18, TinyGPT
from kfac_hessian.blocks import DenseBlocks


def _accounted(model: nn.Module, kfac) -> None:
    unique = sum(p.numel() for p in model.parameters())
    assert kfac.total_params == unique and kfac.covered_params() == unique and not kfac.skipped
    assert f"covered {unique} of {unique} trainable parameters (100.0 %)" in kfac.summary()
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
    kinds = [type(b).__name__ for b in kfac.values()]
    assert kinds.count("KroneckerBlock") == 21 and kinds.count("DenseBlocks") == 20  # 20 conv + fc; 20 BatchNorms
    eigs = kfac.eig()
    assert all(torch.isfinite(e.eigenvalues).all() for e in eigs.values())


def test_tiny_gpt_with_tied_head_end_to_end():
    model = TinyGPT(vocab=11, dim=8, depth=2, heads=2, context=6).double()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (2, 6), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens[:, :-1], tokens[:, 1:]))
    _accounted(model, kfac)
    assert kfac.tied == {"head": ["weight is tok.weight"]}
    dense = {n for n, b in kfac.items() if isinstance(b, DenseBlocks)}
    assert dense == {"ln", *(f"blocks.{i}.ln{j}" for i in range(2) for j in (1, 2))}
    assert kfac["tok"].a_is_diagonal and kfac["pos"].a_is_diagonal  # the positions, called unbatched, are expanded
    values, vectors = kfac["tok"].eig().topk(4)
    assert vectors.shape == (4, 88) and torch.all(values[:-1] >= values[1:])
