"""The local-Hessian study's spread over seeds: geometric-mean intervals for conditions, and the replicate count."""

import math

import numpy as np
import pytest
from scipy import stats

from benchmarks.local_hessian_study import CONDITION_KEYS, KEYS, VARIANTS, agreement, cell_values, summarize


def _rows(seeds, shift=0.0, key_shifted="test_acc"):
    """Rows for every variant: conditions 10^(3 + small jitter), other metrics 0.5 + jitter (+ shift on one key)."""
    rows = []
    for seed in seeds:
        jitter = 0.01 * ((seed * 7) % 5)
        for variant in VARIANTS:
            row = {"variant": variant, "seed": seed}
            for key in KEYS:
                row[key] = 10 ** (3 + jitter) if key in CONDITION_KEYS else 0.5 + jitter
            row[key_shifted] += shift if variant == "default" else 0.0
            row["init_weight"] = math.inf if variant == "default" else row["init_weight"]
            rows.append(row)
    return rows


def test_condition_cell_is_the_geometric_mean_with_its_t_interval_factor():
    conditions = [2.0e4, 8.0e4, 3.0e5, 5.0e4, 1.2e5]
    logs = np.log10(conditions)
    low, high = stats.t.interval(0.95, len(logs) - 1, loc=logs.mean(), scale=stats.sem(logs))
    rows = [{"variant": "default", "init_input": c} for c in conditions]
    text = summarize(cell_values(rows, "default", "init_input"), log_scale=True)
    assert text == f"{10 ** ((low + high) / 2):.3g} ×/÷ {10 ** ((high - low) / 2):.2g}"


def test_plain_cell_and_singular_cells():
    values = [0.97, 0.96, 0.98, 0.975, 0.965]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert summarize(values, log_scale=False) == f"{(low + high) / 2:.3g} ± {(high - low) / 2:.2g}"
    assert summarize([math.inf] * 3, log_scale=True) == "inf"
    assert summarize([math.inf, 10.0, 20.0], log_scale=True) == "inf in 1 of 3 seeds"


def test_agreement_counts_finite_cells_and_names_a_shifted_one():
    first, same = _rows(range(5)), _rows(range(5, 10))
    agreeing, compared, disagreeing = agreement(first, same)
    # the default variant's init_weight is infinite in every seed of both runs: not compared
    assert (agreeing, compared, disagreeing) == (len(VARIANTS) * len(KEYS) - 1, len(VARIANTS) * len(KEYS) - 1, [])
    agreeing, compared, disagreeing = agreement(first, _rows(range(5, 10), shift=1.0))
    assert disagreeing == ["default test_acc"] and agreeing == compared - 1
    partly_singular = _rows(range(5, 10))
    partly_singular[0]["trained_input"] = math.inf
    assert agreement(first, partly_singular)[2] == ["default trained_input"]


def test_cell_values_take_log10_of_conditions_only():
    rows = [{"variant": "residual", "init_input": 100.0, "test_acc": 0.9}]
    assert cell_values(rows, "residual", "init_input") == [pytest.approx(2.0)]
    assert cell_values(rows, "residual", "test_acc") == [0.9]
