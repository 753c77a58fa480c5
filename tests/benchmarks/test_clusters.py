"""The Gaussian-cluster generator: shapes, balance, determinism, and separability that follows its knob."""

import pytest
import torch

from benchmarks.clusters import gaussian_clusters, nearest_mean_accuracy


def test_shapes_and_class_balance():
    data = gaussian_clusters(5, clusters_per_class=3, dim=7, n_train=103, n_test=47, seed=0)
    assert data.X_train.shape == (103, 7) and data.X_test.shape == (47, 7)
    assert data.means.shape == (15, 7) and data.n_features == 7
    counts = torch.bincount(torch.cat([data.y_train, data.y_test]), minlength=5)
    assert counts.tolist() == [30, 30, 30, 30, 30]  # 150 samples split evenly over 5 classes


def test_every_cluster_is_used_evenly_within_its_class():
    data = gaussian_clusters(2, clusters_per_class=4, dim=30, separation=20.0, n_train=400, n_test=0, seed=1)
    # at this separation every sample's nearest mean is its own cluster's: cluster sizes can be read off
    nearest = torch.cdist(data.X_train, data.means).argmin(dim=1)
    assert torch.equal(nearest // 4, data.y_train)
    assert torch.bincount(nearest, minlength=8).tolist() == [50] * 8


def test_same_seed_same_data_other_seed_other_data():
    first, again, other = (gaussian_clusters(3, 2, seed=s) for s in (4, 4, 5))
    assert torch.equal(first.X_train, again.X_train) and torch.equal(first.y_test, again.y_test)
    assert torch.equal(first.means, again.means)
    assert not torch.allclose(first.means, other.means)
    state = torch.get_rng_state()
    gaussian_clusters(3, 2, seed=4)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_means_have_the_requested_norm():
    data = gaussian_clusters(4, 2, dim=9, separation=3.5, seed=2)
    assert torch.allclose(data.means.norm(dim=1), torch.full((8,), 3.5, dtype=torch.float64))


def test_separability_increases_with_the_knob():
    accuracies = []
    for separation in (0.0, 1.0, 2.0, 4.0, 8.0):
        data = gaussian_clusters(4, 2, dim=10, separation=separation, n_train=4000, n_test=0, seed=3)
        accuracies.append(nearest_mean_accuracy(data.X_train, data.y_train, data.means, 2))
    assert accuracies[0] == pytest.approx(0.25, abs=0.04)  # coincident means: chance level for 4 classes
    assert all(b > a + 0.02 for a, b in zip(accuracies[:-1], accuracies[1:]))
    assert accuracies[-1] > 0.99


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="n_classes"):
        gaussian_clusters(1)
    with pytest.raises(ValueError, match="separation"):
        gaussian_clusters(3, separation=-1.0)
    with pytest.raises(ValueError, match="n_train"):
        gaussian_clusters(10, n_train=5)
