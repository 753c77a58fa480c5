"""The PAC-Bayes study's spread: cells against scipy's t-interval, paired differences against a hand-built pairing."""

import argparse

import numpy as np
import pytest
from scipy import stats

from benchmarks.pac_bayes_study import BASES, interval_cell, paired_differences, render


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
