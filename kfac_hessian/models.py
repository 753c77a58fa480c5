"""Reference architectures built in-project (no torchvision, no downloads): the demo's MLP and the
benchmarks' ResNet-style CNN."""

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
    (no BatchNorm: normalization layers are not factored yet)."""

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
