"""Hutchinson and SLQ against the dense trace and moments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import classification_data, mlp


@pytest.fixture(scope="module")
def op_and_dense():
    op = kh.layer_operator(mlp(nn.Tanh, widths=(6, 8, 3)), nn.CrossEntropyLoss(), classification_data(n=20, d=6), "0",
                           "ggn")
    return op, op.to_dense()


def test_hutchinson_within_three_standard_errors(op_and_dense):
    op, dense = op_and_dense
    estimate = kh.hutchinson_trace(op, n_probes=300, seed=0, chunk=128)
    assert estimate.n_probes == 300
    assert abs(estimate.value - float(torch.trace(dense))) < 3 * estimate.stderr


def test_slq_integrates_to_p_and_moments_match(op_and_dense):
    op, dense = op_and_dense
    slq = kh.slq_density(op, n_probes=30, n_iter=25, seed=0)
    assert torch.trapezoid(slq.density, slq.grid) == pytest.approx(op.shape[0], rel=1e-4)
    for power, exact in ((1, torch.trace(dense)), (2, torch.trace(dense @ dense))):
        m = slq.moment(power)
        assert abs(m.value - float(exact)) < 3 * m.stderr


def test_slq_nodes_are_the_spectrum_when_krylov_space_is_full():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    values = torch.tensor([0.5, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])

    class Dense:
        shape, dtype, device = (12, 12), torch.float64, torch.device("cpu")

        def __matmul__(self, x):
            return Q @ torch.diag(values) @ Q.T @ x

    slq = kh.slq_density(Dense(), n_probes=4, n_iter=12, seed=0)
    # distinct eigenvalues appear as nodes with positive weight; quadrature of degree < 2m is exact
    m3 = slq.moment(3)
    assert m3.value == pytest.approx(float((values**3).sum()), rel=0.5)  # a stochastic trace: loose
    for probe in range(4):
        used = slq.weights[probe] > 1e-12
        distinct = torch.unique(values)
        assert all(torch.isclose(slq.nodes[probe][used], d).any() for d in distinct)


def test_log_density_reports_nonpositive_mass(op_and_dense):
    op, _ = op_and_dense
    slq = kh.slq_density(op, n_probes=5, n_iter=30, seed=0, log=True)
    total = float(torch.trapezoid(slq.density, slq.grid)) + slq.nonpositive_weight
    assert total == pytest.approx(op.shape[0], rel=1e-3)
