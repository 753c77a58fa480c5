"""Small real data sets that ship with scikit-learn (nothing is downloaded), as standardized tensors.

``load_tabular(name)`` gives a fixed shuffled train/test split of digits (1797 × 64, 10 classes), wine
(178 × 13, 3), breast_cancer (569 × 30, 2), iris (150 × 4, 3), or a seeded ``make_classification`` task
(``"synthetic"``). Features are standardized with the training split's mean and standard deviation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

TABULAR = ("digits", "wine", "breast_cancer", "iris", "synthetic")


@dataclass
class TabularSplit:
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    n_classes: int
    name: str

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]


def load_tabular(
    name: str,
    *,
    binary: bool = False,
    label_noise: float = 0.0,
    n_train: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    synthetic_options: dict | None = None,
) -> TabularSplit:
    """A seeded split of a bundled data set.

    Args:
        binary: relabel as ``y ≥ n_classes / 2`` (digits: 0–4 vs 5–9); BCE targets become float.
        label_noise: fraction of *training* labels replaced by uniformly drawn classes (1.0 = random labels).
        n_train: keep only the first ``n_train`` training samples (small training sets for overfitting).
        synthetic_options: keyword arguments of ``sklearn.datasets.make_classification`` for ``"synthetic"``.
    """
    from sklearn import datasets

    loaders = {"digits": datasets.load_digits, "wine": datasets.load_wine,
               "breast_cancer": datasets.load_breast_cancer, "iris": datasets.load_iris}
    if name == "synthetic":
        options = {"n_samples": 1000, "n_features": 20, "n_informative": 10, "n_classes": 3, "random_state": seed}
        X, y = datasets.make_classification(**{**options, **(synthetic_options or {})})
    elif name in loaders:
        X, y = loaders[name](return_X_y=True)
    else:
        raise ValueError(f"unknown data set {name!r}; choose from {TABULAR}")
    return split_tabular(X, y, name, binary=binary, label_noise=label_noise, n_train=n_train,
                         test_fraction=test_fraction, seed=seed, dtype=dtype)


def split_tabular(
    X: np.ndarray,
    y: np.ndarray,
    name: str,
    *,
    binary: bool = False,
    label_noise: float = 0.0,
    n_train: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> TabularSplit:
    """The seeded split of ``load_tabular`` for any features ``(n, d)`` and integer labels ``0..C−1`` ``(n,)`` (e.g.
    from a scikit-learn generator); the arguments as there."""
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must lie in [0, 1], got {label_noise!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    X, y = X[order].astype(np.float64), y[order]
    n_classes = int(y.max()) + 1
    if binary:
        y, n_classes = (y >= n_classes / 2).astype(np.int64), 2
    n_test = int(round(test_fraction * len(X)))
    X_train, y_train, X_test, y_test = X[n_test:], y[n_test:].copy(), X[:n_test], y[:n_test]
    if n_train is not None:
        X_train, y_train = X_train[:n_train], y_train[:n_train]
    if label_noise > 0:
        flip = rng.random(len(y_train)) < label_noise
        y_train[flip] = rng.integers(0, n_classes, flip.sum())
    mean, std = X_train.mean(0), X_train.std(0) + 1e-6
    label_dtype = dtype if binary else torch.long

    def tensors(X_part, y_part):
        return torch.as_tensor((X_part - mean) / std, dtype=dtype), torch.as_tensor(y_part).to(label_dtype)

    return TabularSplit(*tensors(X_train, y_train), *tensors(X_test, y_test), n_classes, name)
