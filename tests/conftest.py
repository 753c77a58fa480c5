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
