"""Spread over seeds: the t-interval against scipy's own, the agreement rule and its count over a study's cells."""

import math

import numpy as np
import pytest
from scipy import stats

from benchmarks.intervals import (
    Agreement,
    agree,
    chance_disagreement,
    count_agreement,
    disagreement_table,
    expected_disagreements,
    format_interval,
    mean_interval,
    separation,
)


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


def test_count_agreement_applies_agree_to_each_cell_and_skips_cells_infinite_in_both_runs():
    first = [1.0, 2.0, 3.0]
    _, half = mean_interval(first)
    shift = math.hypot(half, half)
    cells = {"near": (first, [v + 0.5 * shift for v in first]), "far": (first, [v + 2 * shift for v in first]),
             "singular": ([math.inf] * 3, [math.inf] * 3), "partly singular": (first, [1.0, math.inf, 3.0]),
             "same": (first, first)}
    counted = count_agreement(cells)
    assert counted == Agreement(agreeing=2, compared=4, disagreeing=["far", "partly singular"])
    assert counted.sentence() == "2 of 4 cells agree: far, partly singular do not"
    assert count_agreement({"same": (first, first)}).sentence() == "1 of 1 cells agree"


def test_separation_in_half_widths_and_in_standard_deviations():
    first, second = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]
    (m1, h1), (m2, h2) = mean_interval(first), mean_interval(second)
    pooled = math.sqrt((np.var(first, ddof=1) + np.var(second, ddof=1)) / 2)
    in_half_widths, in_deviations = separation(first, second)
    assert in_half_widths == pytest.approx(abs(m1 - m2) / math.hypot(h1, h2), rel=1e-12)
    assert in_deviations == pytest.approx(abs(m1 - m2) / pooled, rel=1e-12)
    assert (in_half_widths > 1) is not agree(first, second)
    # Welch's t-test by hand: t = Δ / √(s₁²/n₁ + s₂²/n₂), Welch–Satterthwaite degrees of freedom
    v1, v2 = np.var(first, ddof=1) / len(first), np.var(second, ddof=1) / len(second)
    dof = (v1 + v2) ** 2 / (v1 ** 2 / (len(first) - 1) + v2 ** 2 / (len(second) - 1))
    p_value = 2 * stats.t.sf(abs(m1 - m2) / math.sqrt(v1 + v2), dof)
    row = disagreement_table({"cell": (first, second)}, ["cell"])[2]
    assert row == (f"| cell | {format_interval(first)} | {format_interval(second)} | {in_half_widths:.2f} "
                   f"| {in_deviations:.2f} | {p_value:.2g} |")


@pytest.mark.parametrize("n", [5, 10])
def test_chance_disagreement_matches_simulated_runs_with_equal_means(n):
    # the agree rule on 200 000 simulated pairs of runs (vectorized): the disagreeing fraction vs the t formula
    draws = np.random.default_rng(n).standard_normal((2, 200_000, n))
    means, halves = draws.mean(-1), stats.t.ppf(0.975, n - 1) * draws.std(-1, ddof=1) / math.sqrt(n)
    simulated = np.mean(np.abs(means[0] - means[1]) > np.hypot(halves[0], halves[1]))
    assert chance_disagreement(n, n) == pytest.approx(simulated, abs=2e-3)  # 6 standard errors of the simulation
    cells = {"a": ([0.0] * n, [1.0] * n), "b": ([0.0] * n, [1.0] * n), "singular": ([math.inf] * n, [1.0] * n)}
    assert expected_disagreements(cells) == pytest.approx(2 * chance_disagreement(n, n), rel=1e-12)
