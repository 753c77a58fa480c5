"""The demo analysis: a small MLP trained on scikit-learn's bundled digits (1797 images, 8×8, 10 classes).

Everything ships with the packages: no data or weights are downloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class DigitsProblem:
    model: nn.Module
    loss_fn: nn.Module
    train: list[tuple[torch.Tensor, torch.Tensor]]
    test: tuple[torch.Tensor, torch.Tensor]
    init_state: dict
    train_accuracy: float
    test_accuracy: float
    seconds: float


def load_digits_tensors(n_samples: int | None = None, dtype=torch.float32):
    """Standardized digits features and labels (a fixed shuffle), optionally the first ``n_samples``."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    if n_samples is not None:
        X, y = X[:n_samples], y[:n_samples]
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    return torch.as_tensor(X, dtype=dtype), torch.as_tensor(y, dtype=torch.long)


def relu_mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (layers named "0", "2", ...)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def digits_mlp(hidden: tuple[int, ...] = (64, 32)) -> nn.Sequential:
    """The built-in architecture: ReLU MLP 64 → hidden → 10 (layers named "0", "2", ...)."""
    return relu_mlp((64, *hidden, 10))


def digits_mlp_description(hidden: tuple[int, ...] = (64, 32)) -> str:
    return "ReLU MLP " + "-".join(map(str, (64, *hidden, 10)))


def train_classifier(
    model: nn.Module,
    loss_fn: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
    optimizer: str = "adam",
) -> float:
    """Minibatch training in place (Adam, or SGD with momentum 0.9); returns the seconds it took.

    Shuffles with a private generator seeded by ``seed``; leaves every ``.grad`` unset afterwards.
    """
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=generator).split(batch_size):
            opt.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def train_digits_mlp(
    hidden: tuple[int, ...] = (64, 32),
    epochs: int = 60,
    seed: int = 0,
    n_samples: int | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    dtype=torch.float32,
) -> DigitsProblem:
    """Train a ReLU MLP 64 → hidden → 10 with Adam; the data is split 80/20 into train and test."""
    X, y = load_digits_tensors(n_samples, dtype)
    X, y = X.to(device), y.to(device)
    n_train = int(0.8 * len(X))
    torch.manual_seed(seed)
    model = digits_mlp(hidden).to(device, dtype)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss_fn = nn.CrossEntropyLoss()
    Xtr, ytr = X[:n_train], y[:n_train]
    seconds = train_classifier(model, loss_fn, Xtr, ytr, epochs, batch_size=batch_size, seed=seed)
    with torch.no_grad():
        train_acc = float((model(Xtr).argmax(1) == ytr).float().mean())
        test_acc = float((model(X[n_train:]).argmax(1) == y[n_train:]).float().mean())
    train = list(zip(Xtr.split(512), ytr.split(512)))
    return DigitsProblem(model, loss_fn, train, (X[n_train:], y[n_train:]), init_state, train_acc, test_acc, seconds)
