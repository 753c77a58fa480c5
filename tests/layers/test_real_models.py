"""Models nobody here wrote — transformers' GPT-2, BERT, Llama, ViT, ConvNeXt, MobileNetV2 and ResNet built from tiny
configs — and the in-project CNN families: every parameter covered, and the exact blocks exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from benchmarks.reference_models import ConvNeXtish, MobileNetish, ResNet18
from kfac_hessian.blocks import DenseBlocks, KroneckerBlock

from ..conftest import transformers_problem
from ..references import dense_ggn, rel_err

FAMILIES = ["gpt2", "bert", "llama", "vit", "convnext", "mobilenet_v2", "resnet"]


def _covered(model: nn.Module, kfac: kh.KFAC) -> None:
    total = sum(p.numel() for p in model.parameters())
    assert kfac.total_params == total and kfac.covered_params() == total and not kfac.skipped, kfac.summary()
    assert f"covered {total} of {total} trainable parameters (100.0 %)" in kfac.summary()
    for block in kfac.values():
        assert torch.isfinite(block.eig().eigenvalues).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_of_a_transformers_model_is_covered(family):
    model, inputs, targets, output = transformers_problem(family)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (inputs, targets), output=output)
    _covered(model, kfac)
    kinds = {type(b).__name__ for b in kfac.values()}
    assert "KroneckerBlock" in kinds
    if family == "gpt2":  # transformers' Conv1D layers are Kronecker blocks with transposed weights
        assert kfac["transformer.h.0.attn.c_attn"].layout.transposed
        assert kfac.tied == {"lm_head": ["weight is transformer.wte.weight"]}


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_one_token_blocks_are_the_exact_ggn_blocks(family):
    """One sample, one position: every block's decoupling is exact (tied parameters aside, whose exact block is that
    of all their uses). Attention over one key has constant weights, so its query/key blocks are zero: the error is
    measured against the largest block. Llama's RMSNorm computes in float32, hence its looser tolerance."""
    model, inputs, targets, output = transformers_problem(family, n=1, length=1)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (inputs, targets), output=output)
    tied = {n for n in kfac.tied} | {"transformer.wte"}
    names = [n for n in kfac if n not in tied]
    dense = {n: dense_ggn(model, nn.CrossEntropyLoss(), inputs, targets, kfac.parameter_names[n], output=output)
             for n in names}
    scale = max(float(d.norm()) for d in dense.values())
    tolerance = 1e-6 if family == "llama" else 1e-10
    for name in names:
        assert float((kfac[name].to_dense() - dense[name]).norm()) <= tolerance * scale, name


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_per_sample_and_normalization_blocks_are_exact(family):
    """One output position per sample: the exact blocks (free parameters, overridden LayerNorms, normalization
    layers) equal the dense GGN blocks with several samples."""
    model, inputs, targets, output = transformers_problem(family, n=2)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (inputs, targets), output=output)
    exact = [n for n, b in kfac.items() if isinstance(b, DenseBlocks)]
    assert exact
    for name in exact[:6]:
        dense = dense_ggn(model, nn.CrossEntropyLoss(), inputs, targets, kfac.parameter_names[name], output=output)
        assert rel_err(kfac[name].to_dense(), dense) < 1e-9, name


@pytest.mark.parametrize(
    "make", [lambda: ResNet18(width=4), lambda: MobileNetish(width=4), lambda: ConvNeXtish(widths=(4, 8))])
def test_in_project_cnn_families(make):
    model = make().double()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    _covered(model, kfac)
    grouped = [b for b in kfac.values() if isinstance(b, KroneckerBlock) and b.layout.groups > 1]
    assert bool(grouped) == (not isinstance(model, ResNet18))  # depthwise convolutions in MobileNet and ConvNeXt


def test_wav2vec2_with_its_weight_normed_position_convolution():
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        num_labels=3)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForSequenceClassification(config).double().eval()
    X, y = torch.randn(2, 400, dtype=torch.float64), torch.tensor([0, 2])
    with pytest.warns(RuntimeWarning, match="masked_spec_embed"):  # used only for masking in training
        kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert kfac.covered_trainable_params == kfac.trainable_params == sum(p.numel() for p in model.parameters())
    name = "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0"  # weight_norm's g
    assert kfac[name].status == "exact GGN block"
    assert rel_err(kfac[name].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])) < 1e-10
