from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import kfac_hessian as kh
from benchmarks.diagnostics_study import (
    CHECKPOINTS,
    DATASETS,
    DRAW_SHIFT,
    KEYS,
    OUTLIER_KEYS,
    RANDOM_STATE,
    REGIMES,
    TOP_K,
    Bootstrap,
    _rho,
    agreement_lines,
    cells_agree,
    exact_metrics,
    interval_cells,
    kfac_metrics,
    load,
    top_k_condition,
)
from kfac_hessian.analyses.outliers import find_outliers


def test_condition_number_leaves_out_round_off_eigenvalues():
    # a cross-entropy G has the null direction 1 (softmax gradients sum to zero): G ⊗ A is singular, and its smallest
    # computed eigenvalues are round-off
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 4)).double()
    X, y = torch.randn(50, 3, dtype=torch.float64), torch.randint(0, 4, (50,))
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="ggn", dtype=torch.float64)
    eig = kfac["2"].eig()
    dense = torch.linalg.eigvalsh(kfac["2"].to_dense()).flip(0)  # independent: the formed (12, 12) matrix
    true_rank = 3 * 3  # rank(G) = C − 1 = 3 times rank(A) = width 3 (2 hidden units + bias)
    assert float(dense[true_rank - 1]) > 1e-6 * float(dense[0]) and float(dense[true_rank]) < 1e-12 * float(dense[0])
    assert top_k_condition(dense, 12) == pytest.approx(float(dense[0] / dense[true_rank - 1]), rel=1e-10)
    metrics = kfac_metrics(eig)
    assert metrics["top_k_condition"] == pytest.approx(float(dense[0] / dense[true_rank - 1]), rel=1e-8)
    assert metrics["naive_top_k_condition"] > 1e12  # λ₁/λ₁₀ with λ₁₀ a round-off value


def test_bootstrap_resamples_whole_data_sets():
    # two data sets whose runs all have gap 0 and 1: resampling data sets gives means in {0, 1/2, 1} only
    runs = [{"dataset": "a", "gap": 0.0, "x": float(i)} for i in range(6)]
    runs += [{"dataset": "b", "gap": 1.0, "x": float(i)} for i in range(6)]
    boot = Bootstrap(runs, resamples=200)
    means = [np.mean([r["gap"] for i in draw for r in boot.by_dataset[boot.names[i]]]) for draw in boot.draws]
    assert set(np.round(means, 12)) <= {0.0, 0.5, 1.0}
    value, low, high = boot.interval(lambda sample: float(np.mean([r["gap"] for r in sample])))
    assert value == 0.5 and low == 0.0 and high == 1.0


def test_at_least_twenty_distinct_data_sets_in_at_least_five_generator_families():
    assert len(DATASETS) >= 20 and len({d.name for d in DATASETS}) == len(DATASETS)
    generated = [d for d in DATASETS if d.family != "bundled"]
    assert len({d.family for d in generated}) >= 5
    assert len({(d.family, tuple(sorted(d.parameters.items()))) for d in generated}) == len(generated)
    first, again = load(generated[0], REGIMES["well"], seed=0), load(generated[0], REGIMES["well"], seed=0)
    assert torch.equal(first.X_train, again.X_train)  # one fixed draw per set


def test_exact_outliers_are_those_of_the_dense_hessian_blocks_top_ten():
    """The exact top-10's outlier statistic (Lanczos on the layer operator) equals ``find_outliers`` of the top-10 of
    the dense float64 Hessian block (torch.func.hessian of the loss in that layer's weight and bias)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    X = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2))
    weight, bias = model[0].weight.detach(), model[0].bias.detach()

    def loss(flat):
        W, b = flat[: weight.numel()].view_as(weight), flat[weight.numel():]
        return nn.functional.cross_entropy(torch.relu(X @ W.T + b) @ model[2].weight.detach().T + model[2].bias, y)

    dense = torch.func.hessian(loss)(torch.cat([weight.flatten(), bias]))
    reference = find_outliers(torch.linalg.eigvalsh(dense).flip(0)[:TOP_K], search=TOP_K - 1, null=None)
    metrics = exact_metrics(model, (X, y), "0", seed=0)
    assert dense.shape[0] > TOP_K  # a truncated spectrum: the null needs the Hutchinson rest
    assert metrics["exact_outliers"] == reference.count
    assert metrics["exact_gap_position"] == reference.gap_position
    assert metrics["exact_gap_ratio"] == pytest.approx(reference.gap_ratio, rel=1e-5)
    assert 0 <= metrics["exact_outliers_above_null"] <= TOP_K


def _rows(shift: float) -> list[dict]:
    """Synthetic rows for four data sets: every metric the tables read, ``shift`` added to the gaps."""
    rng = np.random.default_rng(0)
    rows = []
    for name in ("iris", "wine", "moons-0", "blobs-0"):
        for regime in REGIMES:
            for checkpoint in CHECKPOINTS:
                row = {"dataset": name, "regime": regime, "checkpoint": checkpoint, "classes": 3,
                       "train_acc": 1.0, "test_acc": 0.9, "gap": 0.1 + shift + 0.01 * rng.standard_normal()}
                for key in (*KEYS, *OUTLIER_KEYS, *(f"{p}.kfac_over_exact_top_eigenvalue" for p in ("first", "last")),
                            *(f"{p}.naive_top_k_condition" for p in ("first", "last"))):
                    row[key] = float(rng.uniform(1, 2))
                rows.append(row)
    return rows


def test_rerun_agreement_applies_the_combined_half_width_rule_to_every_cell_with_an_interval():
    rows = _rows(0.0)
    cells = interval_cells(rows, resamples=20)
    # identical runs agree in every cell compared
    text = "\n".join(agreement_lines(cells, cells, (0, 1)))
    compared = sum(cells_agree(a, a) is not None for table in cells.values() for a in table.values())
    assert f"**{compared} of {compared} cells agree.**" in text and compared > 100
    # the rule itself: |x̄₁ − x̄₂| against √(h₁² + h₂²), h half the interval's width
    assert cells_agree((0.0, -1.0, 1.0), (1.4, 0.4, 2.4)) and not cells_agree((0.0, -1.0, 1.0), (1.5, 1.0, 2.0))
    assert cells_agree((math.nan, 0.0, 1.0), (0.0, 0.0, 1.0)) is None
    # a gap shifted far beyond its interval disagrees in the gap row of the regime table
    shifted = interval_cells(_rows(1.0), resamples=20)
    assert all(not cells_agree(cells["regime"]["gap", g], shifted["regime"]["gap", g]) for g in REGIMES)
    assert all(cells_agree(cells["regime"]["train_acc", g], shifted["regime"]["train_acc", g]) for g in REGIMES)


def test_a_seed_shift_draws_every_generated_set_anew():
    generated = [d for d in DATASETS if d.family != "bundled"]
    states = set(RANDOM_STATE.values())
    assert all(RANDOM_STATE[d.name] + DRAW_SHIFT not in states for d in generated)  # no other set's draw
    first, shifted = load(generated[0], REGIMES["well"], seed=0), load(generated[0], REGIMES["well"], 1, seed_shift=1)
    assert not torch.equal(first.X_train[:5], shifted.X_train[:5])


def test_rank_correlation_is_spearmans_with_ties():
    rng = np.random.default_rng(3)
    x, gap = rng.integers(0, 5, 40).astype(float), rng.standard_normal(40)  # many ties in x
    runs = [{"x": a, "gap": b} for a, b in zip(x, gap)]
    assert _rho(runs, "x") == pytest.approx(float(spearmanr(x, gap)[0]), rel=1e-12)
