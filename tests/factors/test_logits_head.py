"""The analytic cross-entropy head G against compute_kfac's ggn columns and the loss Hessian of torch.autograd
(float64, a tiny linear head)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.factors.logits_head import CrossEntropyHeadFactor, cross_entropy_head_factor

from ..conftest import Transpose
from ..references import rel_err


def _head(d: int = 4, classes: int = 7, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, classes)).double()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_analytic_head_g_equals_the_ggn_columns_g(reduction):
    model, loss = _head(), nn.CrossEntropyLoss(reduction=reduction)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 7, (5,), generator=g)
    columns_g = kh.compute_kfac(model, loss, (X, y), curvature="ggn")["0"].G
    analytic = cross_entropy_head_factor(model(X), loss)
    assert rel_err(analytic.to_dense(), columns_g) <= 1e-10
    # independently: the loss Hessian w.r.t. the logits, summed over the samples (the head's Jacobian is I)
    logits = model(X).detach()
    hessian = torch.autograd.functional.hessian(lambda z: loss(z, y), logits)  # (N, C, N, C)
    assert rel_err(analytic.to_dense(), torch.einsum("ncnd->cd", hessian)) <= 1e-10


def test_sequence_logits_over_batches():
    """(N, C, T) logits in two batches: every position is a row; G equals the columns' G of the whole data."""
    model = nn.Sequential(_head(), Transpose())
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(4, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 7, (4, 3), generator=g)
    loss = nn.CrossEntropyLoss()
    columns_g = kh.compute_kfac(model, loss, [(X[:1], y[:1]), (X[1:], y[1:])], curvature="ggn")["0.0"].G
    analytic = cross_entropy_head_factor([model(X[:1]), model(X[1:])], loss)
    assert analytic.num_rows == 12 and rel_err(analytic.to_dense(), columns_g) <= 1e-10


def test_products_trace_and_lanczos_top_k_against_the_dense_matrix():
    g = torch.Generator().manual_seed(3)
    factor = cross_entropy_head_factor(torch.randn(6, 530, generator=g, dtype=torch.float64) * 3,
                                       nn.CrossEntropyLoss())  # V = 530 > the Lanczos dense limit: a Krylov run
    dense = factor.to_dense()
    v = torch.randn(530, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(factor @ v, dense @ v, atol=1e-15)
    assert float(factor.trace()) == pytest.approx(float(torch.trace(dense)), rel=1e-12)
    result = factor.topk(3, tol=1e-10)
    expected = torch.linalg.eigvalsh(dense).flip(0)[:3]
    assert result.converged and result.method != "dense"
    values, vectors = result
    assert torch.allclose(values, expected, rtol=1e-8, atol=0)
    assert torch.allclose(vectors @ dense @ vectors.T, torch.diag(expected), atol=1e-8 * float(expected[0]))
    assert "analytic" in factor.structure() and "rank-≤6" in factor.structure()


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="cross-entropy"):
        cross_entropy_head_factor(torch.randn(2, 3), nn.MSELoss())
    with pytest.raises(ValueError, match="floating-point"):
        cross_entropy_head_factor(torch.ones(2, dtype=torch.long), nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="positions per sample"):
        cross_entropy_head_factor([torch.randn(2, 3, 4), torch.randn(2, 3, 5)], nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="rows"):
        CrossEntropyHeadFactor(torch.rand(3), 1.0)
