"""The scale-amended SGD study's spread over seeds: t-interval cells and the replicate count."""

import numpy as np
from scipy import stats

from benchmarks.scale_amended_sgd import OPTIMIZERS, agreement, cell_values, summarize


def _runs(seeds, lrs, shift=0.0):
    """Runs for both optimizers at every lr; the scale-amended test accuracy at the first lr moved by ``shift``."""
    runs = []
    for seed in seeds:
        jitter = 0.002 * ((seed * 3) % 5)
        for lr in lrs:
            for name in OPTIMIZERS:
                moved = shift if (name == "scale-amended" and lr == lrs[0]) else 0.0
                runs.append({"optimizer": name, "lr": lr, "seed": seed, "train_loss": 0.01 + jitter,
                             "test_acc": 0.98 - jitter + moved, "seconds": 1.0 + seed})
    return runs


def test_cell_is_mean_and_half_width_of_the_t_interval():
    values = [0.9879, 0.9833, 0.9901, 0.9855, 0.9870]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert summarize(values, 4) == f"{(low + high) / 2:.4f} ± {(high - low) / 2:.4f}"


def test_agreement_names_the_shifted_cell_and_ignores_seconds():
    lrs = [0.01, 0.5]
    first = _runs(range(5), lrs)
    assert cell_values(first, 0.5, "sgd", "test_acc") == [r["test_acc"] for r in first
                                                         if r["lr"] == 0.5 and r["optimizer"] == "sgd"]
    cells = len(lrs) * len(OPTIMIZERS) * 2
    # seconds differ between the runs (1–5 vs 6–10) but are not a compared cell
    assert agreement(first, _runs(range(5, 10), lrs), lrs) == (cells, cells, [])
    assert agreement(first, _runs(range(5, 10), lrs, shift=-0.2), lrs) == (
        cells - 1, cells, ["lr 0.01 scale-amended test_acc"])
