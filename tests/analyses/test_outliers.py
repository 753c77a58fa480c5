"""The outlier statistic: planted spectra, a dense float64 Hessian, eigen results, and the two nulls."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.analyses.outliers import MarchenkoPastur, count_outliers, find_outliers, unseen_spectrum
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
    assert result.n_negative == 0 and result.most_negative is None
    assert find_outliers(spectrum, null=None).null is None


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


def wishart(n: int, P: int, variance: float, spikes: tuple[float, ...], seed: int) -> torch.Tensor:
    """Eigenvalues of ``XᵀX/n``, ``X`` of ``n`` rows drawn from ``N(0, σ²·diag(1 + ℓ_1, …, 1 + ℓ_s, 1, …, 1))``."""
    scale = torch.ones(P, dtype=torch.float64)
    scale[: len(spikes)] += torch.tensor(spikes, dtype=torch.float64)
    X = torch.randn(n, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    X = X * (variance * scale).sqrt()
    return torch.linalg.eigvalsh(X.T @ X / n)


def tracy_widom_scale(n: int, P: int, variance: float) -> float:
    """The scale of the largest eigenvalue's fluctuation about the upper edge (Johnstone 2001), ``∝ n^(-2/3)``."""
    return variance * (math.sqrt(n - 1) + math.sqrt(P)) * (1 / math.sqrt(n - 1) + 1 / math.sqrt(P)) ** (1 / 3) / n


def test_default_null_fits_variance_and_aspect_ratio_of_a_spiked_wishart_spectrum():
    """Against the simulated truth: the default null fits σ² and γ = P/n of XᵀX/n with planted spikes. Tolerances
    from the known fluctuations: the bulk mean tr(W)/P has standard deviation σ²·√(2/(nP)) (a χ² sum), plus one
    eigenvalue near the edge left in or out (edge/P each, up to 3); the largest bulk eigenvalue fluctuates about the
    edge on the Tracy–Widom scale s ∝ n^(-2/3), so the fitted edge is asked to lie within s of the true one and γ
    within the change of γ that moves the edge by s."""
    n, P, variance = 2000, 400, 2.0
    gamma = P / n
    edge = variance * (1 + math.sqrt(gamma)) ** 2
    s = tracy_widom_scale(n, P, variance)
    values = wishart(n, P, variance, spikes=(3 * math.sqrt(gamma), 2 * math.sqrt(gamma), 0.5 * math.sqrt(gamma)),
                     seed=0)
    null = find_outliers(values).null
    assert null.kind == "marchenko-pastur"
    assert null.variance == pytest.approx(variance, abs=4 * variance * math.sqrt(2 / (n * P)) + 3 * edge / P)
    assert null.edge == pytest.approx(edge, abs=s)
    d_edge_d_gamma = variance * (1 + math.sqrt(gamma)) / math.sqrt(gamma)
    assert null.aspect_ratio == pytest.approx(gamma, abs=s / d_edge_d_gamma)


def test_only_spikes_above_the_bbp_threshold_stand_above_the_fitted_edge():
    """Baik–Ben Arous–Péché: a population spike σ²(1 + ℓ) separates from the bulk only when ℓ > √γ, and then its
    sample eigenvalue tends to σ²(1 + ℓ)(1 + γ/ℓ) with Gaussian fluctuations of order n^(-1/2); below the threshold
    the top eigenvalue stays within Tracy–Widom scales s of the edge. Planted: ℓ = 3√γ and 2√γ (above), 0.5√γ
    (below)."""
    n, P, variance = 2000, 400, 2.0
    gamma = P / n
    above, below = (3 * math.sqrt(gamma), 2 * math.sqrt(gamma)), 0.5 * math.sqrt(gamma)
    values = wishart(n, P, variance, spikes=(*above, below), seed=1).flip(0)
    edge = variance * (1 + math.sqrt(gamma)) ** 2
    s = tracy_widom_scale(n, P, variance)
    for value, spike in zip(values, above):
        population = variance * (1 + spike)
        limit = population * (1 + gamma / spike)
        assert float(value) == pytest.approx(limit, abs=5 * population * math.sqrt(2 / n))
        assert float(value) > edge + 10 * s  # separated, far beyond the Tracy–Widom scale
    assert abs(float(values[2]) - edge) < 4 * s  # the sub-threshold spike does not separate
    result = find_outliers(values)
    assert result.null.count_above == len(above)


def test_marchenko_pastur_overrides_and_noise_alone():
    """``MarchenkoPastur(n)`` fixes γ = P/n and ``variance=`` fixes σ²; noise alone has nothing far above the edge."""
    n, P = 2000, 400
    pure = wishart(n, P, 1.0, spikes=(), seed=2)
    s = tracy_widom_scale(n, P, 1.0)
    fixed = find_outliers(pure, null=MarchenkoPastur(n)).null
    assert fixed.aspect_ratio == P / n and fixed.edge == pytest.approx((1 + math.sqrt(P / n)) ** 2, abs=s)
    both = find_outliers(pure, null=MarchenkoPastur(n, variance=1.0)).null
    assert both.variance == 1.0 and both.edge == pytest.approx((1 + math.sqrt(P / n)) ** 2, rel=1e-14)
    assert int((pure > fixed.edge + 4 * s).sum()) == 0 and find_outliers(pure).null.count_above <= 1


def test_default_null_on_a_truncated_spectrum_needs_the_unseen_moments():
    """A Lanczos top-k holds too few eigenvalues to fit a bulk: the default null is left out, an explicit one is
    refused; with ``unseen_spectrum`` (Hutchinson on the deflated operator) the fit matches the whole spectrum's.
    Hutchinson's Rademacher variance 2(‖B‖_F² − Σ B_ii²)/m, B the deflated matrix (and B² for the squares), sets the
    tolerance on the estimated power sums: 5 standard deviations."""
    n, P, probes = 600, 120, 64
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, P, generator=g, dtype=torch.float64)
    X[:, :2] *= 3.0  # two spikes
    matrix = X.T @ X / n
    reference = torch.linalg.eigvalsh(matrix).flip(0)
    top = kh.lanczos(eigen_pairs(matrix), 6, seed=0, tol=1e-10)
    assert find_outliers(top).null is None
    with pytest.raises(ValueError, match="unseen"):
        find_outliers(top, null=MarchenkoPastur())
    unseen = unseen_spectrum(eigen_pairs(matrix), top, probes=probes, seed=0)
    vectors = top.eigenvectors
    deflated = matrix - vectors.T @ torch.diag(top.eigenvalues) @ vectors
    square = deflated @ deflated
    assert unseen.count == P - 6
    for estimate, B, exact in ((unseen.total, deflated, reference[6:].sum()),
                               (unseen.total_of_squares, square, reference[6:].square().sum())):
        std = math.sqrt(2 * (B.square().sum() - B.diagonal().square().sum()) / probes)
        assert estimate == pytest.approx(float(exact), abs=5 * std)
    fitted, whole = find_outliers(top, unseen=unseen).null, find_outliers(reference).null
    assert fitted.count_above == whole.count_above == 2
    assert fitted.edge == pytest.approx(whole.edge, rel=0.05)


def test_default_null_does_not_apply_to_a_bulk_of_non_positive_mean():
    """A spectrum symmetric about zero (an indefinite Hessian at initialization, say) has bulk mean 0: no
    Marchenko–Pastur law has it, so the edge is nan and nothing is counted above it."""
    values = torch.linspace(-1.0, 1.0, 101, dtype=torch.float64)
    null = find_outliers(values).null
    assert math.isnan(null.edge) and null.count_above == 0 and math.isnan(null.aspect_ratio)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="min_ratio"):
        find_outliers(torch.ones(3), min_ratio=1.0)
    with pytest.raises(ValueError, match="search"):
        find_outliers(torch.ones(3), search=0)
    with pytest.raises(TypeError, match="eigen result"):
        find_outliers([1.0, 2.0])
    with pytest.raises(ValueError, match="n_samples"):
        MarchenkoPastur(0)
    with pytest.raises(ValueError, match="variance"):
        MarchenkoPastur(variance=0.0)
    with pytest.raises(ValueError, match="probes"):
        unseen_spectrum(eigen_pairs(torch.eye(3)), eigen_pairs(torch.eye(3)), probes=0)
