"""Divergences used by the PAC-Bayes bound: binary KL, its inverse, and the Gaussian posterior/prior KL.

Conventions (``docs/bounds.md``): the prior is ``P = N(w₀, λ I)``, the posterior ``Q = N(w, Q_b diag(s²) Q_bᵀ)``
with ``Q_b`` orthonormal, over ``d`` parameters. Because ``P`` is isotropic, ``KL(Q‖P)`` does not depend on
``Q_b``:

    KL(Q‖P) = ½ [ Σ s²/λ + ‖w − w₀‖²/λ − d + d·ln λ − Σ ln s² ].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def binary_kl(q: float, p: float) -> float:
    """``kl(q‖p) = q ln(q/p) + (1−q) ln((1−q)/(1−p))`` for Bernoulli parameters, with ``0 ln 0 = 0``."""
    for name, value in (("q", q), ("p", p)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    total = 0.0
    for a, b in ((q, p), (1.0 - q, 1.0 - p)):
        if a > 0.0:
            if b == 0.0:
                return math.inf
            total += a * math.log(a / b)
    return max(total, 0.0)


def kl_inverse(q: float, c: float, tol: float = 1e-12) -> float:
    """``kl⁻¹(q, c) = sup{p ∈ [q, 1] : kl(q‖p) ≤ c}`` (upper inverse of the binary KL).

    ``q = 0`` has the closed form ``1 − e^{−c}``; otherwise bisection on ``[q, 1]``, where ``kl(q‖·)`` is
    increasing. The returned value is the upper end of the final bracket, so it never lies below the true
    supremum (a bound stays a bound) and exceeds it by at most ``tol``.
    """
    if not 0.0 <= q <= 1.0 or math.isnan(q):
        raise ValueError(f"q must lie in [0, 1], got {q!r}")
    if math.isnan(c) or c < 0.0:
        raise ValueError(f"c must be non-negative, got {c!r}")
    if q == 1.0 or math.isinf(c):
        return 1.0
    if q == 0.0:
        return -math.expm1(-c)
    lo, hi = q, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # the bracket is one float wide
            break
        if binary_kl(q, mid) <= c:
            lo = mid
        else:
            hi = mid
    return hi


def gaussian_kl(log_std: Tensor, squared_distance: Tensor, log_prior_variance: Tensor) -> Tensor:
    """``KL(N(w, Q_b diag(s²) Q_bᵀ) ‖ N(w₀, λ I))`` from ``ln s`` (all ``d`` coordinates, any shape),
    ``‖w − w₀‖²`` and ``ln λ``; differentiable in all three."""
    d = log_std.numel()
    prior_variance = log_prior_variance.exp()
    return 0.5 * (
        (2 * log_std).exp().sum() / prior_variance
        + squared_distance / prior_variance
        - d
        + d * log_prior_variance
        - 2 * log_std.sum()
    )


def prior_union_cost(log_prior_variance: Tensor | float, scale_max: float, precision: float) -> Tensor | float:
    """``2 ln(b ln(c/λ))``: the price of choosing ``λ = c·exp(−j/b)`` from a countable grid (``j ≥ 1``)."""
    if isinstance(log_prior_variance, Tensor):
        return 2 * torch.log(precision * (math.log(scale_max) - log_prior_variance))
    return 2 * math.log(precision * (math.log(scale_max) - log_prior_variance))


def confidence_cost(n_train: int, delta: float) -> float:
    """``ln(π² m / (6δ))``: the confidence term of the bound for ``m`` training samples."""
    return math.log(math.pi**2 * n_train / (6 * delta))
