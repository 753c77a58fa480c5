from __future__ import annotations

import pytest
import torch

from benchmarks.datasets import TABULAR, load_tabular


@pytest.mark.parametrize("name", TABULAR)
def test_splits_are_standardized_seeded_and_disjoint(name):
    split = load_tabular(name, dtype=torch.float64)
    assert len(split.X_test) == round(0.2 * (len(split.X_train) + len(split.X_test)))
    assert torch.allclose(split.X_train.mean(0), torch.zeros(split.n_features), atol=1e-10)
    assert split.y_train.dtype == torch.long and int(split.y_train.max()) < split.n_classes
    again = load_tabular(name, dtype=torch.float64)
    assert torch.equal(split.X_train, again.X_train) and torch.equal(split.y_test, again.y_test)
    train_rows = {tuple(r.tolist()) for r in split.X_train}
    assert not any(tuple(r.tolist()) in train_rows for r in split.X_test)


def test_binary_small_and_noisy_labels():
    clean = load_tabular("digits", binary=True)
    full = load_tabular("digits")
    assert clean.n_classes == 2 and clean.y_train.dtype == torch.float32
    assert torch.equal(clean.y_train, (full.y_train >= 5).float())  # 0–4 vs 5–9
    small = load_tabular("wine", n_train=30)
    assert len(small.X_train) == 30
    random = load_tabular("digits", label_noise=1.0)
    agreement = (random.y_train == full.y_train).float().mean().item()
    assert 0.05 < agreement < 0.2  # uniform relabelling keeps about 1/10 of the labels
    assert torch.equal(random.X_train, full.X_train) and torch.equal(random.y_test, full.y_test)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown data set"):
        load_tabular("mnist")
    with pytest.raises(ValueError, match="label_noise"):
        load_tabular("iris", label_noise=1.5)
    with pytest.raises(ValueError, match="test_fraction"):
        load_tabular("iris", test_fraction=1.0)
