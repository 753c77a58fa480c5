from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks.datasets import load_tabular
from kfac_hessian.bounds import PosteriorBasis, binary_kl, pac_bayes_bound
from kfac_hessian.demo import train_classifier

from ..conftest import batches, classification_data, mlp

SMALL = {"epochs": 3, "n_samples": 20, "lr": 1e-2}


@pytest.fixture
def problem():
    model = mlp(nn.Tanh, widths=(4, 3, 2), seed=2)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    X, y = classification_data(n=12, d=4, classes=2)
    return model, init_state, nn.CrossEntropyLoss(), batches(X, y, [5, 7]), (X, y)


@pytest.mark.parametrize("basis", ["identity", "kronecker", "exact-layerwise", "iterative"])
def test_kl_equals_torch_distributions_with_the_dense_covariance(problem, basis):
    model, init_state, loss, data, _ = problem
    result = pac_bayes_bound(model, init_state, loss, data, basis, refresh_every=1, **SMALL)
    Q = result.posterior_basis.to_dense()
    variances = torch.cat([(2 * s).exp().flatten() for s in result.posterior_log_std])
    mean = torch.cat([result.posterior_mean[n].flatten() for n in result.posterior_basis.parameter_shapes])
    prior_mean = torch.cat([init_state[n].flatten() for n in result.posterior_basis.parameter_shapes])
    posterior = torch.distributions.MultivariateNormal(mean, Q @ torch.diag(variances) @ Q.T)
    prior = torch.distributions.MultivariateNormal(prior_mean, result.prior_variance * torch.eye(len(mean)))
    assert result.kl == pytest.approx(torch.distributions.kl_divergence(posterior, prior).item(), rel=1e-9)
    assert result.distance == pytest.approx((mean - prior_mean).norm().item(), rel=1e-12)


def test_bound_assembly(problem):
    model, init_state, loss, data, (X, y) = problem
    r = pac_bayes_bound(model, init_state, loss, data, "kronecker", delta=0.05, delta_prime=0.02, **SMALL)
    c, b = r.settings["prior_variance_max"], r.settings["precision"]
    assert r.prior_index >= 1 and r.prior_variance == pytest.approx(c * math.exp(-r.prior_index / b), rel=1e-12)
    # ê_B and the bound are the upper kl-inverses: kl(ê‖ê_B) = ln(2/δ')/n, kl(ê_B‖bound) = (KL + costs)/(m − 1).
    assert binary_kl(r.train_error, r.train_error_bound) == pytest.approx(math.log(2 / 0.02) / 20, rel=1e-6)
    budget = (r.kl + 2 * math.log(r.prior_index) + math.log(math.pi**2 * 12 / (6 * 0.05))) / 11
    assert r.bound == 1.0 or binary_kl(r.train_error_bound, r.bound) == pytest.approx(budget, rel=1e-6)
    assert r.train_error <= r.train_error_bound <= r.bound <= 1.0
    with torch.no_grad():
        deterministic = (model(X).argmax(1) != y).double().mean().item()
    assert r.n_train == 12 and r.n_params == sum(p.numel() for p in model.parameters())
    zero_epochs = pac_bayes_bound(model, init_state, loss, data, "identity", epochs=0, n_samples=5)
    assert zero_epochs.mean_train_error == pytest.approx(deterministic, abs=1e-15)
    assert set(r.to_dict()) >= {"bound", "kl", "train_error", "settings", "history"}
    assert not any(k.startswith("posterior_") for k in r.to_dict())


def test_seeded_and_model_untouched(problem):
    model, init_state, loss, data, _ = problem
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = torch.random.get_rng_state()
    a = pac_bayes_bound(model, init_state, loss, data, "kronecker", seed=3, **SMALL)
    b = pac_bayes_bound(model, init_state, loss, data, "kronecker", seed=3, **SMALL)
    c = pac_bayes_bound(model, init_state, loss, data, "kronecker", seed=4, **SMALL)
    assert a.bound == b.bound and a.kl == b.kl and a.train_error == b.train_error
    assert a.kl != c.kl
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training and torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[2].weight.grad is None
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad
    with pytest.raises(ValueError, match="one error in"):
        pac_bayes_bound(model, init_state, loss, data, error_fn=lambda out, t: out, **SMALL)
    assert model.training and torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))


def test_bad_input(problem):
    model, init_state, loss, data, (X, y) = problem
    with pytest.raises(ValueError, match="basis must be"):
        pac_bayes_bound(model, init_state, loss, data, "hessian")
    with pytest.raises(ValueError, match="lacks"):
        pac_bayes_bound(model, {"0.weight": init_state["0.weight"]}, loss, data)
    with pytest.raises(ValueError, match="shape"):
        pac_bayes_bound(model, {**init_state, "0.bias": torch.zeros(7)}, loss, data)
    with pytest.raises(ValueError, match="MSELoss"):
        pac_bayes_bound(model, init_state, nn.MSELoss(), data)
    for key, value in (("delta", 0.0), ("delta_prime", 1.0), ("n_samples", 0), ("epochs", -1), ("lr", 0.0)):
        with pytest.raises(ValueError, match=key):
            pac_bayes_bound(model, init_state, loss, data, **{key: value})
    with pytest.raises(ValueError, match="one-shot"):
        pac_bayes_bound(model, init_state, loss, iter(data))
    with pytest.raises(ValueError, match="two training samples"):
        pac_bayes_bound(model, init_state, loss, (X[:1], y[:1]))


def test_given_basis_is_used(problem):
    model, init_state, loss, data, _ = problem
    basis = PosteriorBasis.identity(model)
    assert pac_bayes_bound(model, init_state, loss, data, basis, **SMALL).posterior_basis is basis


def _digits_bound(label_noise: float, basis: str):
    split = load_tabular("digits", binary=True, label_noise=label_noise, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 1), nn.Flatten(0))
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = nn.BCEWithLogitsLoss()
    train_classifier(model, loss, split.X_train, split.y_train, 30, lr=0.05, batch_size=100, optimizer="sgd")
    data = list(zip(split.X_train.split(256), split.y_train.split(256)))
    return pac_bayes_bound(model, init_state, loss, data, basis, test_data=(split.X_test, split.y_test),
                           n_samples=100)


def test_digits_bound_is_non_vacuous_and_random_labels_are_not():
    true_labels = _digits_bound(0.0, "kronecker")
    # A sanity check, not a proof: the bound holds for the held-out error and says something (< 1).
    assert true_labels.test_error <= true_labels.bound < 1.0
    assert true_labels.mean_test_error <= true_labels.bound
    random_labels = _digits_bound(1.0, "kronecker")
    assert random_labels.bound > 0.5 > true_labels.bound  # no better than guessing
    assert random_labels.test_error <= random_labels.bound


def test_defaults_on_one_pair_give_a_non_vacuous_bound_and_a_short_run_is_warned_about():
    """The issue's case: one (X, y) pair (one step per epoch). The defaults run 2000 steps at lr 1e-2 (before: 100
    steps at 1e-3, bound 1.0 with no warning)."""
    split = load_tabular("digits", binary=True, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 1), nn.Flatten(0))
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = nn.BCEWithLogitsLoss()
    train_classifier(model, loss, split.X_train, split.y_train, 30, lr=0.05, batch_size=100, optimizer="sgd")
    result = pac_bayes_bound(model, init_state, loss, (split.X_train, split.y_train), "identity", n_samples=200)
    assert result.converged and result.settings["epochs"] == 2000 and result.bound < 0.5
    with pytest.warns(RuntimeWarning, match="had not converged after 100 epochs"):
        short = pac_bayes_bound(model, init_state, loss, (split.X_train, split.y_train), "identity", epochs=100,
                                lr=1e-3, n_samples=20)
    assert not short.converged
    assert "history" not in repr(result) and len(repr(result)) < 1200
