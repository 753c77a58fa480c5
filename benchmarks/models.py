"""Benchmark workloads: the in-project reference models on random inputs."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.reference_models import ResNetish, SequenceMLP, relu_mlp


def workload(name: str, n: int, seed: int = 0):
    """``(model, loss_fn, batches)`` for "mlp" (784-1024-1024-10), "cnn" (ResNetish) or "seq" (SequenceMLP on
    (N, 32, 256) sequences, per-position labels), batches of 512 (64 sequences for "seq")."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "seq":
        X, y = torch.randn(n, 32, 256, generator=g), torch.randint(0, 10, (n, 32), generator=g)
        return SequenceMLP(), nn.CrossEntropyLoss(), list(zip(X.split(64), y.split(64)))
    if name == "mlp":
        model, X = relu_mlp((784, 1024, 1024, 10)), torch.randn(n, 784, generator=g)
    else:
        model, X = ResNetish(), torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), list(zip(X.split(512), y.split(512)))
