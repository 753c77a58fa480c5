"""The outlier statistic: planted spectra, a dense float64 Hessian, eigen results, and the two nulls."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.analyses.outliers import MarchenkoPastur, count_outliers, find_outliers
from kfac_hessian.eigen import eigen_pairs

from ..conftest import classification_data, mlp


def planted(n_outliers: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bulk = 0.01 + torch.rand(500, generator=g) * 0.09  # bulk within [0.01, 0.1]
    return bulk, 5 + torch.rand(n_outliers, generator=g) * 10


@pytest.mark.parametrize("n_outliers", [0, 1, 9])
def test_planted_outliers(n_outliers):
    bulk, outliers = planted(n_outliers, n_outliers)
    spectrum = torch.cat([bulk, outliers])[torch.randperm(500 + n_outliers, generator=torch.Generator().manual_seed(0))]
    result = find_outliers(spectrum)
    assert result.count == count_outliers(spectrum) == n_outliers
    assert result.bulk_edge == pytest.approx(float(bulk.max()) if n_outliers else float(spectrum.max()))
    if n_outliers:
        assert result.gap_position == n_outliers
        assert result.gap_ratio == pytest.approx(float(outliers.min() / bulk.max()))
    assert result.n_negative == 0 and result.most_negative is None and result.null is None


def test_a_gap_below_the_threshold_is_reported_not_counted():
    values = torch.tensor([3.0, 1.6, 1.0, 0.95, 0.9])  # ratios 1.875, 1.6, 1.05, 1.06
    result = find_outliers(values, min_ratio=2.0)
    assert result.count == 0 and result.gap_position == 1 and result.gap_ratio == pytest.approx(3.0 / 1.6)
    assert result.runner_up_position == 2 and result.runner_up_ratio == pytest.approx(1.6)
    assert find_outliers(values, min_ratio=1.8).count == 1  # the same gap, a looser criterion
    assert result.bulk_edge == 3.0 and "≥ 2" in result.criterion and result.to_dict()["criterion"] == result.criterion


def test_hessian_with_negative_eigenvalues_against_dense_reference():
    """A tanh network's whole-model Hessian (float64, torch.func.hessian) is indefinite: the negative eigenvalues are
    reported, and the statistic of the dense eigen result equals the one computed by hand from eigvalsh."""
    model = mlp(nn.Tanh, widths=(5, 6, 3))
    X, y = classification_data(n=30)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]

    def loss(flat):
        pieces = dict(zip(names, (f.reshape(s) for f, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        return nn.functional.cross_entropy(torch.func.functional_call(model, pieces, (X,)), y)

    hessian = torch.func.hessian(loss)(torch.cat([params[n].flatten() for n in names]))
    reference = torch.linalg.eigvalsh(hessian).flip(0)
    result = find_outliers(eigen_pairs(hessian))
    floor = 1e-8 * float(reference.abs().max())
    assert reference.min() < -floor  # the test needs an indefinite Hessian
    assert result.n_negative == int((reference < -floor).sum())
    assert result.most_negative == pytest.approx(float(reference.min()), rel=1e-10)
    positive = reference[reference > 1e-8 * reference[0]][:51]
    ratios = positive[:-1] / positive[1:]
    assert result.gap_position == int(ratios.argmax()) + 1
    assert result.gap_ratio == pytest.approx(float(ratios.max()), rel=1e-10)
    assert result.count == (result.gap_position if ratios.max() >= 2.0 else 0)
    assert result.n_values == reference.numel() and result.n_searched == positive.numel()


def test_a_lanczos_result_and_a_spectrum_null():
    """A truncated spectrum (Lanczos top-k) is searched as given; a null spectrum's edge is its largest eigenvalue."""
    bulk, outliers = planted(3, 1)
    op = eigen_pairs(torch.diag(torch.cat([outliers, bulk]).double()))
    top = kh.lanczos(op, 10, seed=0)
    result = find_outliers(top, null=bulk)
    assert result.count == 3 and result.n_values == 10
    assert result.null.kind == "spectrum" and result.null.edge == pytest.approx(float(bulk.max()))
    assert result.null.count_above == 3 and result.null.null_outliers.count == 0


def test_marchenko_pastur_null_on_a_gram_spectrum():
    """Noise alone stays below the fitted Marchenko–Pastur edge; a planted spike (well above the BBP threshold
    σ²(1 + √γ)) stands above it, and the fitted σ² leaves out the spike."""
    n, d = 4000, 40
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, d, generator=g)
    pure = torch.linalg.eigvalsh(noise.T @ noise / n)
    assert find_outliers(pure, null=MarchenkoPastur(n)).null.count_above == 0
    spike = torch.zeros(d)
    spike[0] = 1.0
    spiked = noise + 2.0 * torch.randn(n, 1, generator=g) * spike  # variance 1 + 4 along e_0
    values = torch.linalg.eigvalsh(spiked.T @ spiked / n)
    result = find_outliers(values, null=MarchenkoPastur(n))
    assert result.null.kind == "marchenko-pastur" and result.null.count_above == 1
    edge = (1 + math.sqrt(d / n)) ** 2
    assert result.null.edge == pytest.approx(edge, rel=0.05)  # σ² = 1 fitted from the bulk
    assert MarchenkoPastur(n, variance=1.0).edge(values) == pytest.approx(edge)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="min_ratio"):
        find_outliers(torch.ones(3), min_ratio=1.0)
    with pytest.raises(ValueError, match="search"):
        find_outliers(torch.ones(3), search=0)
    with pytest.raises(TypeError, match="eigen result"):
        find_outliers([1.0, 2.0])
    with pytest.raises(ValueError, match="n_samples"):
        MarchenkoPastur(0)
