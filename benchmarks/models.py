"""Benchmark workloads (built in-project: no torchvision, no downloads)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(widths=(784, 1024, 1024, 10)) -> nn.Sequential:
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
    """A small ResNet-style CNN for 32×32×3 inputs (no BatchNorm: the core issue covers conv/linear)."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(_Block(width, width, 1), _Block(width, 2 * width, 2), _Block(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        return self.head(h.mean((2, 3)))


def workload(name: str, n: int, seed: int = 0):
    """``(model, loss_fn, batches)`` for "mlp" or "cnn", random inputs, ``n`` samples in batches of 512."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model, X = mlp(), torch.randn(n, 784, generator=g)
    else:
        model, X = ResNetish(), torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    batch = 512
    return model, nn.CrossEntropyLoss(), list(zip(X.split(batch), y.split(batch)))
