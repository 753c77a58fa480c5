"""The PAC-Bayes study's spread: cells against scipy's t-interval, paired differences against a hand-built pairing,
and the re-run on new seeds."""

import argparse
import re

import numpy as np
import pytest
from scipy import stats

from benchmarks.intervals import agree, mean_interval
from benchmarks.pac_bayes_study import (
    BASES,
    agreement,
    interval_cell,
    paired_differences,
    render,
    replicate_seeds,
    seed_order,
)


def _rows(bounds: dict[str, list[float]]) -> list[dict]:
    return [
        {"task": "digits", "labels": "true", "seed": seed, "basis": basis, "bound": bound, "train_error": 0.1,
         "test_error": 0.2, "mean_test_error": 0.15, "kl": 30.0, "converged": True, "seconds": 1.0, "n_train": 10}
        for basis, values in bounds.items()
        for seed, bound in enumerate(values)
    ]


def test_interval_cell_is_scipy_t_interval_of_the_mean():
    values = [0.31, 0.35, 0.33, 0.36, 0.30]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert interval_cell(values) == f"{(low + high) / 2:.3f} ± {(high - low) / 2:.3f}"
    assert interval_cell([0.5]) == "0.500"


def test_paired_differences_match_seed_by_seed_subtraction():
    identity, kronecker = [0.40, 0.30, 0.50], [0.38, 0.29, 0.47]
    rows = _rows({"identity": identity, "kronecker": kronecker, "iterative": identity[:2]})
    diffs = paired_differences(rows, "kronecker")
    assert diffs[("digits", "true")] == pytest.approx(np.subtract(kronecker, identity).tolist(), abs=1e-15)
    # a basis missing a seed is compared only on the seeds both finished
    assert paired_differences(rows, "iterative")[("digits", "true")] == pytest.approx([0.0, 0.0], abs=1e-15)


def test_paired_interval_resolves_what_the_unpaired_ones_do_not():
    # seed-to-seed spread shared by both bases, constant gap 0.02: unpaired intervals overlap, the paired one is sharp
    identity = [0.30, 0.40, 0.35, 0.45, 0.32]
    rows = _rows({basis: [b - 0.02 * (basis == "iterative") for b in identity] for basis in BASES})
    args = argparse.Namespace(seeds=5, epochs=None, lr=0.01, n_samples=10, width=50, train_epochs=100)
    table = render(rows, args, n_seeds=5)
    iterative_row = next(line for line in table.splitlines() if "| iterative |" in line)
    assert "| -0.020 ± 0.000 |" in iterative_row
    shifted = np.subtract(identity, 0.02)
    half = stats.t.ppf(0.975, len(shifted) - 1) * stats.sem(shifted)
    assert f"**{shifted.mean():.3f} ± {half:.3f}**" in iterative_row  # unpaired: wide, overlapping identity's
    assert "seeds finished: 5 (0–4)" in table


def test_replicate_seeds_are_disjoint_and_alternate_with_the_first_runs():
    for seeds in (2, 5):
        order = seed_order(seeds, replicate=True)
        assert not set(range(seeds)) & set(replicate_seeds(seeds))
        assert sorted(order) == sorted([*range(seeds), *replicate_seeds(seeds)])  # every seed once
        assert order[::2] == list(range(seeds)) and order[1::2] == list(replicate_seeds(seeds))
        assert seed_order(seeds, replicate=False) == list(range(seeds))


def _metrics_rows(seeds, rng: np.random.Generator) -> list[dict]:
    """Every task, labels and basis with random metrics (a nonzero half-width in every cell)."""
    return [{"task": task, "labels": labels, "seed": seed, "basis": basis, "bound": rng.uniform(0.2, 0.8),
             "train_error": rng.uniform(0, 0.5), "test_error": rng.uniform(0, 0.5),
             "mean_test_error": rng.uniform(0, 0.5), "kl": rng.uniform(10, 100), "converged": True,
             "seconds": rng.uniform(1, 9), "n_train": 10}
            for seed in seeds for task in ("digits", "breast_cancer") for labels in ("true", "random")
            for basis in BASES]


def test_agreement_count_is_intervals_agree_on_the_rendered_cells():
    rng = np.random.default_rng(0)
    first, second = _metrics_rows(range(5), rng), _metrics_rows(replicate_seeds(5), rng)
    args = argparse.Namespace(seeds=5, epochs=None, lr=0.01, n_samples=10, width=50, train_epochs=100,
                              replicate=True)
    table = render(first, args, n_seeds=5)
    counted, cells = agreement(first, second)
    # every rendered interval but the seconds column is a compared cell (4 task-label groups × 4 bases)
    assert counted.compared == len(re.findall(r"\d ± \d", table)) - 4 * len(BASES)
    # shift one basis's bound in the re-run so that its paired difference lands just past the combined half-width
    name = "breast_cancer random iterative Δ vs identity"
    (m1, h1), (m2, h2) = mean_interval(cells[name][0]), mean_interval(cells[name][1])
    for row in second:
        if (row["task"], row["labels"], row["basis"]) == ("breast_cancer", "random", "iterative"):
            row["bound"] += m1 - m2 + 1.01 * np.hypot(h1, h2)
    counted, cells = agreement(first, second)
    assert not agree(*cells[name])
    assert counted.disagreeing == [n for n, (a, b) in cells.items() if not agree(a, b)]
    text = render(first, args, 5, second)
    assert f"**{counted.agreeing} of {counted.compared} cells agree**" in text
    assert "| breast_cancer random iterative |" in text and f"| {name} |" in text  # Δ table and disagreement list


def test_a_run_on_a_subset_of_bases_and_labels_says_so_in_its_command():
    rows = [r for r in _metrics_rows(range(3), np.random.default_rng(1))
            if r["labels"] == "true" and r["basis"] in ("identity", "iterative")]
    args = argparse.Namespace(seeds=3, epochs=None, lr=0.01, n_samples=10, width=50, train_epochs=100,
                              bases=["identity", "iterative"], labels=["true"], replicate=False)
    table = render(rows, args, n_seeds=3)
    assert "--n-samples 10 --bases identity iterative --labels true`" in table
    assert sum(line.startswith("| digits") or line.startswith("| breast_cancer") for line in table.splitlines()) == 4
