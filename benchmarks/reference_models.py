"""Reference architectures built in-project for the benchmarks and tests (no torchvision, no downloads): the demo's
MLP (``relu_mlp``, from ``kfac_hessian.demo``), the benchmarks' ResNet-style CNN and sequence model, a ResNet-18-style
CNN with BatchNorm, a small GPT-style decoder, and the MobileNetV2- and ConvNeXt-style CNN families (depthwise
convolutions, channels-first LayerNorm, layer scale)."""

from __future__ import annotations

import torch
from torch import nn

from kfac_hessian.demo import relu_mlp

__all__ = ["ConvNeXtish", "MobileNetish", "ResNet18", "ResNetish", "SequenceMLP", "TinyGPT", "relu_mlp"]


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.skip = (nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if (stride != 1 or c_in != c_out)
                     else nn.Identity())

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.skip(x))


class ResNetish(nn.Module):
    """A small ResNet-style CNN for 32×32×3 inputs: stem, three residual blocks, average pooling, head
    without normalization layers (the benchmarks' fixed workload; ResNet18 below has BatchNorm)."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(_Block(width, width, 1), _Block(width, 2 * width, 2),
                                    _Block(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        return self.head(h.mean((2, 3)))


class SequenceMLP(nn.Module):
    """A transformer-style stack of position-wise ``nn.Linear`` blocks on ``(N, T, d)`` sequences with
    residual connections; logits come out as ``(N, C, T)`` for a per-position cross-entropy."""

    def __init__(self, d: int = 256, depth: int = 2, classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(depth))
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


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expansion conv-BN-ReLU6, 3×3 depthwise conv-BN-ReLU6, 1×1 projection conv-BN, and the
    identity shortcut when the shape allows."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.residual = stride == 1 and c_in == c_out
        self.layers = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        out = self.layers(x)
        return x + out if self.residual else out


class MobileNetish(nn.Module):
    """A MobileNetV2-style CNN: stem conv-BN-ReLU6, inverted residual blocks with depthwise 3×3 convolutions
    (``groups`` = channels), a 1×1 head conv, average pooling and a linear classifier."""

    def __init__(self, width: int = 16, classes: int = 10, in_channels: int = 3, expansion: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(
            _InvertedResidual(width, width, 1, expansion), _InvertedResidual(width, 2 * width, 2, expansion),
            _InvertedResidual(2 * width, 2 * width, 1, expansion),
        )
        self.head = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU6())
        self.classifier = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.classifier(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``(N, C, H, W)`` inputs (timm's ``LayerNorm2d``): its own ``forward`` permutes to
    channels-last and back, so it is *not* an ``nn.LayerNorm`` to the layer kinds (it gets exact per-sample blocks)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7×7 conv, channels-last LayerNorm, pointwise MLP (``nn.Linear`` 4×, GELU), a learned
    layer scale ``γ`` (a free parameter), and the residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        return x + (self.gamma * self.mlp(h)).permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    """A ConvNeXt-style CNN: patchify stem (4×4 stride 4) with a channels-first ``LayerNorm2d``, stages of ConvNeXt
    blocks separated by ``LayerNorm2d`` + 2×2 stride-2 downsampling convolutions, pooled ``LayerNorm`` and a head."""

    def __init__(self, widths: tuple[int, ...] = (16, 32), depths: tuple[int, ...] = (1, 1), classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 4, stride=4), LayerNorm2d(widths[0]))
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            down = [] if i == 0 else [LayerNorm2d(widths[i - 1]), nn.Conv2d(widths[i - 1], width, 2, stride=2)]
            stages.append(nn.Sequential(*down, *(_ConvNeXtBlock(width) for _ in range(depth))))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(widths[-1])
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        return self.head(self.norm(self.stages(self.stem(x)).mean((2, 3))))
