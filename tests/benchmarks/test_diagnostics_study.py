from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kfac_hessian as kh
from benchmarks.diagnostics_study import DATASETS, REGIMES, Bootstrap, kfac_metrics, load, top_k_condition


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
