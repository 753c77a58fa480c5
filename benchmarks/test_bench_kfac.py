"""pytest-benchmark cases: ``python -m pytest benchmarks --benchmark-enable``.

compute_kfac + eig() on the MLP 784-1024-1024-10 (N=2048) and the ResNet-style CNN (N=128), next to the
floor (one forward + backward over the same data), so the ratio can be read from one run.
"""

from __future__ import annotations

import pytest
import torch

import kfac_hessian as kh
from benchmarks.models import workload

SIZES = {"mlp": 2048, "cnn": 128}


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def problem(request):
    torch.set_default_dtype(torch.float32)
    return workload(request.param, SIZES[request.param])


def test_floor_gradient_pass(benchmark, problem):
    model, loss_fn, data = problem

    def gradient():
        for X, y in data:
            torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))

    benchmark(gradient)


@pytest.mark.parametrize("curvature", ["ggn", "mc", "empirical"])
def test_compute_kfac(benchmark, problem, curvature):
    model, loss_fn, data = problem
    kfac = benchmark(lambda: kh.compute_kfac(model, loss_fn, data, curvature=curvature, seed=0))
    assert len(kfac) > 0


def test_eig_all_layers(benchmark, problem):
    model, loss_fn, data = problem
    kfac = kh.compute_kfac(model, loss_fn, data, curvature="mc", seed=0)
    eigs = benchmark(kfac.eig)
    assert set(eigs) == set(kfac)


def test_covariance_count_of_compare_matches_a_hand_count():
    """The counted floor of compare.py: rows × width² / 2 per factor (bias in A's width; conv rows = locations)."""
    from .compare import covariance_multiply_adds

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 5, bias=False))
    data = [(torch.randn(4, 2, 4, 4), torch.zeros(4)), (torch.randn(1, 2, 4, 4), torch.zeros(1))]
    a, g = covariance_multiply_adds(model, data)
    # conv: 5 samples × 4 locations, width 2·9 + 1; linear: 5 rows, width 12, 5 outputs
    assert a == 5 * 4 * 19**2 / 2 + 5 * 12**2 / 2
    assert g == 5 * 4 * 3**2 / 2 + 5 * 5**2 / 2
