"""Every block says what it is with respect to its target (``factors.labels``): exact only where it equals the target
(checked against the dense float64 GGN here), an estimate with its draws, biased, or an approximation."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import classification_data
from ..references import EXACT, dense_ggn, rel_err


class _NormedSequence(nn.Module):
    """(N, T, d) → LayerNorm → Linear, logits (N, C, T): the LayerNorm block has cross-position terms."""

    def __init__(self, d=4, c=3):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.norm, self.fc2 = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, c)

    def forward(self, x):
        return self.fc2(self.norm(torch.tanh(self.fc1(x)).cumsum(1))).transpose(1, 2)


def _sequence_data(n=3, t=4, d=4, c=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, t, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n, t), generator=g)


def _mlp_with_norm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()


def test_one_position_per_sample_exact_blocks_are_the_dense_ggn():
    model = _mlp_with_norm()
    X, y = classification_data()
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X.double(), y))
    assert kfac["1"].status == "exact GGN block"
    assert rel_err(kfac["1"].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X.double(), y, ["1"])) < EXACT
    assert kfac["0"].status == "approximation of the GGN block (Kronecker factorization)"
    assert kfac["0"].describe().endswith(" — " + kfac["0"].status)


def test_monte_carlo_and_empirical_blocks():
    model = _mlp_with_norm()
    X, y = classification_data()
    mc = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X.double(), y), curvature="mc", seed=0, mc_samples=3)
    assert mc["1"].status == "GGN block, estimate: 3 Monte-Carlo label draws per sample"
    assert mc["0"].status.endswith("; estimate: 3 Monte-Carlo label draws per sample")
    signs = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X.double(), y), column_signs=1)
    assert signs["1"].status == "GGN block, estimate: 1 random-sign combination of the loss-Hessian columns per sample"
    empirical = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X.double(), y), curvature="empirical")
    assert empirical["1"].status == "exact empirical Fisher block"


@pytest.mark.parametrize(("options", "status", "exact"), [
    ({}, "GGN block, estimate: 1 random-sign draw per output position (4 positions)", False),
    ({"position_signs": 3}, "GGN block, estimate: 3 random-sign draws per output position (4 positions)", False),
    ({"position_signs": 0}, "GGN block, biased: joint columns add cross-position products (4 positions)", False),
    ({"per_position": True}, "exact GGN block", True),
    ({"column_signs": 2}, "GGN block, estimate: 2 random-sign combinations of the loss-Hessian columns per sample "
                          "(4 positions)", False),
])
def test_sequence_outputs(options, status, exact):
    model = _NormedSequence().double()
    X, y = _sequence_data()
    with pytest.warns(RuntimeWarning) if options.get("position_signs") == 0 else contextlib.nullcontext():
        kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), **options)
    assert kfac["norm"].status == status
    error = rel_err(kfac["norm"].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["norm"]))
    assert (error < EXACT) == exact  # what says exact is exact; what does not, is not here


def test_ekfac_and_fit_blocks_and_persistence(tmp_path):
    model = _mlp_with_norm()
    X, y = classification_data()
    data = (X.double(), y)
    ekfac = kh.compute_ekfac(model, nn.CrossEntropyLoss(), data)
    assert ekfac["0"].status == "approximation of the GGN block" and ekfac["1"].status == "exact GGN block"
    fit = kh.compute_kronecker_fit(model, nn.CrossEntropyLoss(), data, iterations=1)
    assert fit["0"].status == "approximation of the GGN block (nearest Kronecker product)"
    fit.save(tmp_path / "fit.pt")
    loaded = kh.KFAC.load(tmp_path / "fit.pt")
    assert {n: b.status for n, b in loaded.items()} == {n: b.status for n, b in fit.items()}
    assert fit.to(dtype=torch.float32)["0"].status == fit["0"].status

