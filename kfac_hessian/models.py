"""Reference architectures built in-project (no torchvision, no downloads): the demo's MLP, the benchmarks'
ResNet-style CNN and sequence model, a ResNet-18-style CNN with BatchNorm, and a small GPT-style decoder."""

from __future__ import annotations

import torch
from torch import nn


def relu_mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (layers named "0", "2", ...)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if (stride != 1 or c_in != c_out) else nn.Identity()

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.skip(x))


class ResNetish(nn.Module):
    """A small ResNet-style CNN for 32×32×3 inputs: stem, three residual blocks, average pooling, head
    without normalization layers (the benchmarks' fixed workload; ResNet18 below has BatchNorm)."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(_Block(width, width, 1), _Block(width, 2 * width, 2), _Block(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        return self.head(h.mean((2, 3)))


class SequenceMLP(nn.Module):
    """A transformer-style stack of position-wise ``nn.Linear`` blocks on ``(N, T, d)`` sequences with
    residual connections; logits come out as ``(N, C, T)`` for a per-position cross-entropy."""

    def __init__(self, d: int = 256, depth: int = 2, classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(depth))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).transpose(1, 2)


class _BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a (1×1 conv-BN) shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 layout for 32×32 inputs (CIFAR stem: 3×3 conv, no max-pool): 4 stages × 2 basic blocks,
    BatchNorm after every convolution, AdaptiveAvgPool, linear head. ``width=64`` is the standard 11.2M
    parameters; smaller widths keep the layout for tests."""

    def __init__(self, width: int = 64, classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**i
            stages.append(nn.Sequential(_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        h = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


class _DecoderBlock(nn.Module):
    """Pre-LN transformer block: causal multi-head attention with nn.Linear projections, then a GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, e = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).reshape(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, e))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small GPT-style decoder: token and positional embeddings, pre-LN blocks, final LayerNorm, and an LM
    head whose weight *is* the token embedding's (tied). Logits come out as ``(N, vocab, T)`` for a
    per-position cross-entropy."""

    def __init__(self, vocab: int, dim: int = 64, depth: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(_DecoderBlock(dim, heads) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.blocks(self.tok(tokens) + self.pos(positions.unsqueeze(0)))
        return self.head(self.ln(h)).transpose(1, 2)
