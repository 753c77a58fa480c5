"""Tiny float64 models and data sets shared by the tests (everything seeded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_default_dtype(torch.float64)


def batches(X: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split into batches of the given sizes (uneven last batch on purpose)."""
    assert sum(sizes) == len(X)
    return list(zip(X.split(sizes), y.split(sizes)))


def mlp(activation: type[nn.Module] = nn.ReLU, widths=(5, 4, 3), bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2 and activation is not None:
            layers.append(activation())
    return nn.Sequential(*layers).double()


def classification_data(n: int = 11, d: int = 5, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def regression_data(n: int = 11, d: int = 5, out: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, out, generator=g)


def binary_data(n: int = 11, d: int = 5, out: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 2, (n, out), generator=g).double()


class PerPosition(nn.Module):
    """A per-position network on (N, T, d) whose logits come out as (N, C, T) for CrossEntropyLoss."""

    def __init__(self, d=4, h=5, c=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, c)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).transpose(1, 2)


class TinyCNN(nn.Module):
    def __init__(self, seed=0, classes=3):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 2, stride=2, bias=False)
        self.fc = nn.Linear(2 * 2 * 2, classes)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(h.flatten(1))


class NormCNN(TinyCNN):
    """TinyCNN with a GroupNorm after the first convolution (a normalization block; no vmap rule for its
    double backward)."""

    def __init__(self, seed=0, classes=3):
        super().__init__(seed, classes)
        self.norm = nn.GroupNorm(1, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.fc(h.flatten(1))


def psd(d: int, *batch: int, seed: int = 0) -> torch.Tensor:
    """A seeded random ``(*batch, d, d)`` positive definite float64 matrix (``X Xᵀ / 2d`` of a ``d × 2d`` ``X``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, d, 2 * d, generator=g, dtype=torch.float64)
    return x @ x.transpose(-1, -2) / (2 * d)


class Transpose(nn.Module):
    """Swaps axes 1 and 2: ``(N, T, C)`` outputs presented as ``(N, C, T)``."""

    def forward(self, x):
        return x.transpose(1, 2)


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D, written out (the kind recognises the class by its name and ``nf``)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class KroneckerKinds(nn.Module):
    """An embedding (diagonal A), self-attention, a grouped convolution and transformers' Conv1D on sequences."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(6, 4, padding_idx=0)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.conv = nn.Conv1d(4, 4, 3, padding=1, groups=2)
        self.proj = Conv1D(3, 4)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2).contiguous()
        return self.proj(h).transpose(1, 2)


@pytest.fixture
def relu_mlp():
    return mlp(nn.ReLU)


@pytest.fixture
def tanh_mlp():
    return mlp(nn.Tanh)


@pytest.fixture
def cls_data():
    X, y = classification_data()
    return X, y, batches(X, y, [4, 4, 3])


def transformers_problem(family: str, n: int = 3, length: int = 5, seed: int = 0):
    """A tiny ``transformers`` model built from a config (nothing downloaded), float64 and in eval mode, with one
    batch: ``(model, inputs, targets, output)`` — ``output`` the selector ``compute_kfac`` needs, or ``None``."""
    transformers = pytest.importorskip("transformers")
    import kfac_hessian as kh

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, 40, (n, length), generator=g)
    images = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    text = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=12)
        problem = transformers.GPT2LMHeadModel(config), {"input_ids": tokens}, tokens, kh.sequence_logits
    elif family == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**text, max_position_embeddings=12,
                                                                                   num_labels=3))
        problem = model, {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}, labels, None
    elif family == "llama":
        config = transformers.LlamaConfig(**text, num_key_value_heads=1, max_position_embeddings=16)
        problem = transformers.LlamaForCausalLM(config), {"input_ids": tokens}, tokens, kh.sequence_logits
    elif family == "vit":
        config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16,
                                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3)
        problem = transformers.ViTForImageClassification(config), images, labels, None
    elif family == "convnext":
        config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                             num_labels=3, image_size=16)
        problem = transformers.ConvNextForImageClassification(config), images, labels, None
    elif family == "mobilenet_v2":
        config = transformers.MobileNetV2Config(num_channels=3, image_size=16, depth_multiplier=0.25, num_labels=3)
        problem = transformers.MobileNetV2ForImageClassification(config), images, labels, None
    elif family == "resnet":
        config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                           num_labels=3)
        problem = transformers.ResNetForImageClassification(config), images, labels, None
    else:
        raise ValueError(family)
    model, inputs, targets, output = problem
    return model.double().eval(), inputs, targets, output


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * x**3)))


class OldStyleGeLU(torch.autograd.Function):
    """An old-style Function (no ``setup_context``, as BLOOM's ``GeLUFunction``): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return tanh_gelu(x)

    @staticmethod
    def backward(ctx, g):  # written with differentiable ops: plain autograd can take its derivative again
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * (x + 0.044715 * x**3))
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.79788456 * (1 + 3 * 0.044715 * x * x))


class FunctionScaled(nn.Module):
    """``gelu(x · scale)`` with a parameter no layer kind claims, through ``OldStyleGeLU`` (``plain=False``) or the
    same formula in plain torch ops (``plain=True``: the reference torch.func can differentiate)."""

    def __init__(self, width: int = 4, plain: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.6, 1.4, width))
        self.plain = plain

    def forward(self, x):
        return tanh_gelu(x * self.scale) if self.plain else OldStyleGeLU.apply(x * self.scale)


def on_two_gloo_ranks(work) -> list[dict]:
    """``work(rank)`` (a module-level function returning a dict of tensors) run in two spawned processes joined in a
    gloo process group; each rank's dict, in rank order."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_gloo_rank, args=(work, out_dir), nprocs=2, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=True) for rank in range(2)]


def _gloo_rank(rank: int, work, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(work(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
