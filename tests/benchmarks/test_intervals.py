"""Spread over seeds: the t-interval against scipy's own, and the agreement rule."""

import math

import numpy as np
import pytest
from scipy import stats

from benchmarks.intervals import agree, format_interval, mean_interval


def test_interval_matches_scipy_t_interval():
    values = [2.0, 3.5, 1.25, 4.0, 2.75]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    mean, half = mean_interval(values)
    assert mean == pytest.approx((low + high) / 2, rel=1e-12)
    assert half == pytest.approx((high - low) / 2, rel=1e-12)


def test_constant_and_single_values():
    assert mean_interval([9.0, 9.0, 9.0]) == (9.0, 0.0)
    assert format_interval([9.0, 9.0, 9.0]) == "9"
    mean, half = mean_interval([1.5])
    assert mean == 1.5 and math.isnan(half)
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


def test_agreement_is_within_the_combined_half_width():
    first = [1.0, 2.0, 3.0]  # mean 2, half-width 4.303 · 1/√3 = 2.484
    _, half = mean_interval(first)
    shift = math.hypot(half, half)
    assert agree(first, [v + 0.99 * shift for v in first])
    assert not agree(first, [v + 1.01 * shift for v in first])
