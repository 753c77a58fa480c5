"""Spread over seeds: the mean and the half-width of its 95 % t-interval, and how two runs are compared.

``mean_interval(values)`` is ``(x̄, t_{0.975, n−1} · s / √n)`` with ``s`` the sample standard deviation (``n − 1`` in
the denominator): a 95 % confidence interval of the mean over independent seeds, under approximately normal
per-seed values. Two runs on disjoint seeds agree when the difference of their means lies within the combined
half-width ``√(h₁² + h₂²)``; ``count_agreement`` applies that rule to every cell of a study and its re-run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from scipy import stats


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its two-sided ``level`` t-interval (half-width ``nan`` for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * _std(values, mean) / math.sqrt(n)


def _std(values: Sequence[float], mean: float) -> float:
    """Sample standard deviation (``n − 1`` in the denominator)."""
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


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


class Agreement(NamedTuple):
    """Cells of a re-run on new seeds that agree with the first run, cells compared, names of those that do not."""

    agreeing: int
    compared: int
    disagreeing: list[str]

    def sentence(self) -> str:
        """``"k of n cells agree"``, naming the cells that do not."""
        names = f": {', '.join(self.disagreeing)} do not" if self.disagreeing else ""
        return f"{self.agreeing} of {self.compared} cells agree{names}"


def count_agreement(cells: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> Agreement:
    """``agree`` on every named cell ``(first run's values, re-run's values)``, in the mapping's order.

    A cell infinite in every value of both runs (e.g. the condition of a singular matrix) agrees trivially and is not
    counted; a cell with a non-finite value in only some seeds has no mean to compare and counts as a disagreement.
    """
    compared, disagreeing = 0, []
    for name, (first, second) in cells.items():
        values = [*first, *second]
        if all(math.isinf(v) for v in values):
            continue
        compared += 1
        if not (all(math.isfinite(v) for v in values) and agree(first, second)):
            disagreeing.append(name)
    return Agreement(compared - len(disagreeing), compared, disagreeing)


def chance_disagreement(n1: int, n2: int, level: float = 0.95) -> float:
    """Probability that runs of ``n1`` and ``n2`` seeds do not ``agree`` although their true means are equal.

    Per-seed values normal with one common variance: for ``n1 = n2 = n`` the rule ``|x̄₁ − x̄₂| ≤ √(h₁² + h₂²)`` is
    ``|T| ≤ t_{n−1}`` with ``T`` Student-t on ``2n − 2`` degrees of freedom (exact; for ``n1 ≠ n2`` the pooled
    approximation). 2.4 % for 5 vs 5 seeds, 3.6 % for 10 vs 10: below the 5 % of one interval, since a 95 % interval
    on each side is wider than one on the difference.
    """
    q1, q2 = (float(stats.t.ppf(0.5 + level / 2, n - 1)) for n in (n1, n2))
    threshold = math.hypot(q1 / math.sqrt(n1), q2 / math.sqrt(n2)) / math.sqrt(1 / n1 + 1 / n2)
    return 2 * float(stats.t.sf(threshold, n1 + n2 - 2))


def expected_disagreements(cells: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> float:
    """How many of the finite ``cells`` disagree by chance alone, on average: the sum of their chance rates."""
    return sum(chance_disagreement(len(a), len(b)) for a, b in cells.values()
               if all(math.isfinite(v) for v in (*a, *b)))


def separation(first: Sequence[float], second: Sequence[float]) -> tuple[float, float]:
    """``|x̄₁ − x̄₂|`` in units of the combined half-width ``√(h₁² + h₂²)`` (> 1: the runs disagree) and of the pooled
    per-seed standard deviation ``√((s₁² + s₂²)/2)`` (< 1: a difference smaller than the seed-to-seed spread)."""
    (m1, h1), (m2, h2) = mean_interval(first), mean_interval(second)
    pooled = math.sqrt((_std(first, m1) ** 2 + _std(second, m2) ** 2) / 2)
    difference = abs(m1 - m2)
    return difference / math.hypot(h1, h2), difference / pooled


def disagreement_table(cells: Mapping[str, tuple[Sequence[float], Sequence[float]]], names: Sequence[str],
                       formatter: Callable[[Sequence[float]], str] = format_interval) -> list[str]:
    """Markdown table of the named cells of a first run and its re-run: both intervals, their ``separation`` and the
    two-sided p-value of Welch's t-test of equal means."""
    lines = ["| cell | first run | re-run | \\|Δ\\| ÷ combined half-width | \\|Δ\\| ÷ per-seed s.d. | Welch p |",
             "|---|---|---|---|---|---|"]
    for name in names:
        first, second = cells[name]
        in_half_widths, in_deviations = separation(first, second)
        p_value = float(stats.ttest_ind(first, second, equal_var=False).pvalue)
        lines.append(f"| {name} | {formatter(first)} | {formatter(second)} | {in_half_widths:.2f} "
                     f"| {in_deviations:.2f} | {p_value:.2g} |")
    return lines


def agreement_notes(cells: Mapping[str, tuple[Sequence[float], Sequence[float]]], counted: Agreement,
                    formatter: Callable[[Sequence[float]], str] = format_interval) -> list[str]:
    """Markdown lines after a study's "k of n cells agree": how many disagree by chance alone, and the table of the
    cells that do not agree (``disagreement_table``) with how to read it."""
    bonferroni = 0.05 / max(counted.compared, 1)
    lines = [f"By chance alone ≈ {expected_disagreements(cells):.1f} of the {counted.compared} cells would disagree "
             "(equal true means; `benchmarks.intervals.chance_disagreement`: 2.4 % of the cells over 5 vs 5 seeds, "
             "3.6 % over 10 vs 10); the cells share their trained networks, so their disagreements are not "
             "independent and their count spreads more than a binomial one."]
    if counted.disagreeing:
        lines += ["", "Cells that do not agree: both runs, the difference in combined half-widths (> 1 is the "
                  "disagreement), in per-seed standard deviations (the effect against the seed-to-seed spread) and "
                  f"Welch's p of the one cell — above 0.05 / {counted.compared} = {bonferroni:.1g} (Bonferroni over "
                  "the cells compared), a difference chance gives among this many cells.", "",
                  *disagreement_table(cells, counted.disagreeing, formatter)]
    return lines
