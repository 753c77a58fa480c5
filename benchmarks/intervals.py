"""Spread over seeds: the mean and the half-width of its 95 % t-interval, and how two runs are compared.

``mean_interval(values)`` is ``(x̄, t_{0.975, n−1} · s / √n)`` with ``s`` the sample standard deviation (``n − 1`` in
the denominator): a 95 % confidence interval of the mean over independent seeds, under approximately normal
per-seed values. Two runs on disjoint seeds agree when the difference of their means lies within the combined
half-width ``√(h₁² + h₂²)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its two-sided ``level`` t-interval (half-width ``nan`` for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)


def format_interval(values: Sequence[float], digits: int = 2) -> str:
    """``"x̄ ± h"`` with ``digits`` significant digits (``"x̄"`` alone for a zero-width interval)."""
    mean, half = mean_interval(values)
    if half == 0:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {half:.{digits}g}"


def agree(first: Sequence[float], second: Sequence[float]) -> bool:
    """Whether two runs on disjoint seeds agree: ``|x̄₁ − x̄₂| ≤ √(h₁² + h₂²)``."""
    (m1, h1), (m2, h2) = mean_interval(first), mean_interval(second)
    return abs(m1 - m2) <= math.hypot(h1, h2)
