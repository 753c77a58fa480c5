"""The whole-model spectrum against the dense float64 Hessian and GGN of a tiny model (torch.func)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.analyses.outliers import find_outliers
from kfac_hessian.analyses.overlap import eigenspace_overlap
from kfac_hessian.exact import model_spectrum

from ..conftest import classification_data, mlp
from ..references import dense_ggn, dense_hessian


@pytest.fixture(scope="module")
def problem():
    return mlp(nn.Tanh, widths=(3, 4, 3)), nn.CrossEntropyLoss(), classification_data(n=20, d=3)


# the Hessian through the Krylov path (blocks of 4 vectors per pass over the data), the GGN through Lanczos' dense
# fallback (P = 31)
@pytest.mark.parametrize(("curvature", "dense_limit"), [("hessian", 0), ("ggn", 512)])
def test_top_k_and_density_match_the_dense_matrix(problem, curvature, dense_limit):
    model, loss_fn, (X, y) = problem
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = (dense_hessian if curvature == "hessian" else dense_ggn)(model, loss_fn, X, y, [""])
    exact = torch.linalg.eigvalsh(reference).flip(0)
    P, k, n_probes = reference.shape[0], 3, 4
    result = model_spectrum(model, loss_fn, (X, y), k=k, curvature=curvature, n_probes=n_probes, n_iter=10,
                            tol=1e-10, dense_limit=dense_limit, block_size=4)
    assert result.top.method == ("block-lanczos" if dense_limit < P else "dense") and result.num_params == P
    assert torch.allclose(result.eigenvalues, exact[:k], rtol=1e-8, atol=1e-8 * float(exact.abs().max()))
    values, vectors = result.topk(3)
    reference_vectors = torch.linalg.eigh(reference).eigenvectors.flip(1)[:, :3].T
    assert eigenspace_overlap(vectors, reference_vectors) == pytest.approx(1.0, abs=1e-8)
    # every probe's quadrature integrates to P: the broadened density does too (the grid spans the nodes ± 5σ)
    density = result.density
    integral = float(torch.trapezoid(density.density, density.grid))
    assert integral == pytest.approx(P, rel=1e-5)
    # first moment = the probes' Hutchinson estimate (exact for degree 1 < 2m): unbiased, with the Rademacher variance
    # 2 Σ_{i≠j} H_ij² per probe
    off_diagonal = reference - torch.diag(reference.diagonal())
    stderr = math.sqrt(2 * float(off_diagonal.pow(2).sum()) / n_probes)
    assert abs(result.trace().value - float(torch.trace(reference))) <= 5 * stderr
    # the nodes are Ritz values: inside [λ_P, λ_1]
    used = density.nodes[density.weights > 0]
    slack = 1e-10 * float(exact.abs().max())
    assert float(used.max()) <= float(exact[0]) + slack and float(used.min()) >= float(exact[-1]) - slack
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_analyses_take_the_spectrum(problem, tmp_path):
    model, loss_fn, (X, y) = problem
    result = model_spectrum(model, loss_fn, (X, y), k=8, n_probes=2, n_iter=5, smallest=2, log=True)
    assert find_outliers(result).n_values == 8
    with pytest.raises(ValueError, match="exceeds the 8 eigenpairs"):
        result.topk(9)
    pytest.importorskip("matplotlib")
    assert result.plot(tmp_path / "spectrum.png").stat().st_size > 0


def test_a_subset_of_layers_and_bad_input(problem):
    model, loss_fn, (X, y) = problem
    result = model_spectrum(model, loss_fn, (X, y), k=3, layers=["2"], n_probes=2, n_iter=5, smallest=2)
    reference = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, y, ["2"])).flip(0)
    assert result.param_names == ["2.weight", "2.bias"]
    assert torch.allclose(result.eigenvalues, reference[:3], atol=1e-12)
    assert torch.allclose(result.bottom.eigenvalues, reference[-2:], atol=1e-12)  # descending too
    assert model_spectrum(model, loss_fn, (X, y), k=1, n_probes=1, n_iter=2).bottom is None
    with pytest.raises(ValueError, match="curvature"):
        model_spectrum(model, loss_fn, (X, y), curvature="fisher")
    with pytest.raises(ValueError, match="exceeds"):
        model_spectrum(model, loss_fn, (X, y), k=10_000)
    with pytest.raises(ValueError, match="smallest"):
        model_spectrum(model, loss_fn, (X, y), smallest=-1)
    assert kh.exact.ModelSpectrum is type(result)
