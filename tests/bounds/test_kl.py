import math

import numpy as np
import pytest
import torch

from kfac_hessian.bounds import binary_kl, gaussian_kl, kl_inverse


def _kl_grid(q: float, p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(q > 0, q * np.log(q / p), 0.0)
        b = np.where(q < 1, (1 - q) * np.log((1 - q) / (1 - p)), 0.0)
    return a + b


def test_binary_kl_matches_formula_and_edges():
    assert binary_kl(0.3, 0.3) == 0.0
    assert binary_kl(0.2, 0.6) == pytest.approx(0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4), rel=1e-15)
    assert binary_kl(0.0, 0.25) == pytest.approx(-math.log(0.75), rel=1e-15)
    assert binary_kl(1.0, 0.25) == pytest.approx(-math.log(0.25), rel=1e-15)
    assert binary_kl(0.5, 1.0) == math.inf
    with pytest.raises(ValueError, match="q must lie"):
        binary_kl(1.5, 0.5)


@pytest.mark.parametrize("q", [0.0, 1e-4, 0.01, 0.1, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("c", [0.0, 1e-6, 0.01, 0.3, 2.0, 40.0])
def test_kl_inverse_equals_brute_force_grid(q, c):
    grid = np.linspace(0.0, 1.0, 2_000_001)[:-1]  # p = 1 excluded: kl(q‖1) = ∞ unless q = 1
    feasible = grid[(grid >= q) & (_kl_grid(q, grid) <= c)]
    brute = max(q, feasible.max(initial=q))
    value = kl_inverse(q, c)
    assert brute <= value <= brute + 1e-6 + 1e-12  # never below the supremum, within one grid step above
    if value < 1:  # the returned point brackets the supremum to 1e-12 from above (kl evaluated to ~1e-16)
        assert binary_kl(q, value) >= c - 1e-15
        assert binary_kl(q, max(q, value - 1e-12)) <= c + 1e-15


def test_kl_inverse_edges_and_errors():
    assert kl_inverse(0.0, 3.0) == pytest.approx(1 - math.exp(-3.0), rel=1e-15)
    assert kl_inverse(0.2, math.inf) == 1.0
    assert kl_inverse(0.2, 1e6) == pytest.approx(1.0, abs=1e-12)
    for q, c in ((-0.1, 1.0), (1.1, 1.0), (float("nan"), 1.0), (0.5, -1.0), (0.5, float("nan"))):
        with pytest.raises(ValueError):
            kl_inverse(q, c)


def test_gaussian_kl_equals_torch_distributions_isotropic_basis():
    g = torch.Generator().manual_seed(0)
    d = 7
    mean, prior_mean = torch.randn(d, generator=g), torch.randn(d, generator=g)
    log_std, log_prior_var = 0.3 * torch.randn(d, generator=g), torch.tensor(-1.3)
    ours = gaussian_kl(log_std, ((mean - prior_mean) ** 2).sum(), log_prior_var)
    q = torch.distributions.MultivariateNormal(mean, torch.diag((2 * log_std).exp()))
    p = torch.distributions.MultivariateNormal(prior_mean, log_prior_var.exp() * torch.eye(d))
    assert ours.item() == pytest.approx(torch.distributions.kl_divergence(q, p).item(), rel=1e-12)
