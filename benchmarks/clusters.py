"""Gaussian-cluster classification data with controlled structure (the data of Sagun et al. 2017's experiments).

``C`` classes, each a mixture of ``K`` Gaussian clusters in ``R^d``. Every cluster mean is ``separation · u`` with
``u`` drawn uniformly on the unit sphere; every sample is its cluster's mean plus standard normal noise
``N(0, I_d)``. So ``separation`` is the ratio of a mean's norm to the noise per direction: two independent means
lie about ``separation · √2`` apart (for ``d`` ≫ 1 their directions are nearly orthogonal), and the nearest-mean
error between two clusters is about ``Φ(−separation / √2)`` — the separability knob. Samples are split evenly over
the classes (the first ``n mod C`` classes get one more) and, within a class, round-robin over its clusters.

What makes two generated sets distinct: the ``seed`` alone draws the means (directions) and the samples; the same
settings and seed give bit-identical tensors, another seed gives other means and samples. Changing ``separation``
with the seed fixed rescales the same mean directions and keeps the same noise draws, so sets that differ only in
``separation`` are directly comparable. Training and test samples come from one draw and share the means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClusterData:
    """A generated training/test split; ``means`` is ``(C·K, d)``, cluster ``j`` belongs to class ``j // K``."""

    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    means: Tensor
    n_classes: int
    clusters_per_class: int

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]


def gaussian_clusters(
    n_classes: int,
    clusters_per_class: int = 1,
    dim: int = 10,
    separation: float = 2.0,
    n_train: int = 500,
    n_test: int = 500,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> ClusterData:
    """Draw ``n_train + n_test`` samples of ``n_classes × clusters_per_class`` Gaussian clusters (module docstring).

    The samples are shuffled (with the same private generator) before the split, so both splits are balanced up
    to the shuffle; the global RNG is untouched.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be ≥ 2 (a classification task), got {n_classes}")
    if clusters_per_class < 1 or dim < 1:
        raise ValueError(f"clusters_per_class and dim must be ≥ 1, got {clusters_per_class} and {dim}")
    if separation < 0:
        raise ValueError(f"separation must be ≥ 0 (0: all clusters at the origin), got {separation}")
    if n_train < n_classes or n_test < 0:
        raise ValueError(f"need n_train ≥ n_classes ({n_classes}) and n_test ≥ 0, got {n_train} and {n_test}")
    generator = torch.Generator().manual_seed(seed)
    n_clusters = n_classes * clusters_per_class
    directions = torch.randn(n_clusters, dim, generator=generator, dtype=torch.float64)
    means = separation * directions / directions.norm(dim=1, keepdim=True)
    n = n_train + n_test
    labels = torch.arange(n) % n_classes  # even split over the classes
    cluster = labels * clusters_per_class + (torch.arange(n) // n_classes) % clusters_per_class
    X = means[cluster] + torch.randn(n, dim, generator=generator, dtype=torch.float64)
    order = torch.randperm(n, generator=generator)
    X, labels = X[order].to(dtype), labels[order]
    return ClusterData(X[:n_train], labels[:n_train], X[n_train:], labels[n_train:], means.to(dtype), n_classes,
                       clusters_per_class)


def nearest_mean_accuracy(X: Tensor, y: Tensor, means: Tensor, clusters_per_class: int) -> float:
    """Accuracy of assigning each sample the class of its nearest cluster mean (cluster ``j`` → class ``j // K``).

    With the generating means this is close to the Bayes-optimal accuracy of equal-weight isotropic clusters:
    a direct measure of how separable the generated data is.
    """
    nearest = torch.cdist(X.double(), means.double()).argmin(dim=1)
    return float((nearest // clusters_per_class == y).double().mean())
