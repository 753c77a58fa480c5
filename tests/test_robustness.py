"""The robustness contract (docs/robustness.md): rows not covered next to the code they test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.blocks import KroneckerEigen
from kfac_hessian.layout import BlockLayout
from kfac_hessian.spectra import symmetric_eig

from .conftest import batches, mlp
from .references import dense_ggn, naive_kfac_sequential, rel_err


def test_float32_eigh_failure_is_retried_in_float64(monkeypatch):
    calls = []
    original = torch.linalg.eigh

    def flaky(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated convergence failure")
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    m = torch.randn(2, 5, 5, dtype=torch.float32)
    m = m @ m.transpose(1, 2)
    values, vectors, _ = symmetric_eig(m, vectors=True)
    assert calls == [torch.float32, torch.float64]
    assert values.dtype == torch.float32 and vectors.dtype == torch.float32
    assert torch.allclose(values, torch.linalg.eigvalsh(m.double()).flip(-1).float(), rtol=1e-5)


def test_rank_deficient_factors_more_parameters_than_samples():
    """3 samples, 6 inputs: A has rank ≤ 3; eigenvalues are clamped at 0, never negative, never NaN."""
    model = mlp(nn.ReLU, widths=(6, 8, 3))
    X, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    e = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["0"].eig()
    values = e.eigenvalues()
    assert torch.isfinite(values).all() and (values >= 0).all()
    assert (e.a_values[4:] < 1e-12 * e.a_values[0]).all()  # rank ≤ 3 (+ the bias direction)


def test_density_of_a_layer_with_1e8_products_in_bounded_memory():
    g = torch.Generator().manual_seed(0)
    a_values = torch.rand(10_000, generator=g, dtype=torch.float64).sort(descending=True).values
    g_values = torch.rand(10_000, generator=g, dtype=torch.float64).sort(descending=True).values
    e = KroneckerEigen(BlockLayout(10_000, 10_000, False), a_values=a_values[None], g_values=g_values[None])
    d = e.density(bins=50, log=True, chunk=2**22)  # 24 chunks of ≤ 4M products, never 1e8 at once
    assert float(d.counts.sum()) + d.n_zero == 10**8
    # log10(μλ) = log10 μ + log10 λ: its mean is the sum of the factor means, exact to binning
    mean = float((d.centers * d.counts).sum() / d.counts.sum())
    expected = float(g_values.log10().mean() + a_values.log10().mean())
    assert abs(mean - expected) < float(d.edges[1] - d.edges[0])


def test_load_refuses_other_format_versions(tmp_path):
    torch.save({"format": "kfac_hessian.KFAC/99", "meta": {}, "skipped": {}, "layers": {}}, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match="reads 'kfac_hessian.KFAC/2'"):
        kh.KFAC.load(tmp_path / "v99.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file written by KFAC.save"):
        kh.KFAC.load(tmp_path / "other.pt")


def test_same_seed_bit_identical_factors_on_cpu():
    model = mlp(nn.Tanh)
    X, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    runs = [kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(X, y, [5, 4]), curvature="mc", mc_samples=2, seed=3) for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name].A, runs[1][name].A) and torch.equal(runs[0][name].G, runs[1][name].G)


RANDOM_CASES = 12


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_randomized_shapes_batches_reductions_against_dense(case):
    """Hypothesis-style: random widths, depth, bias, batch split, loss and reduction (seeded, bounded)."""
    rng = np.random.default_rng(case)
    widths = tuple(int(w) for w in rng.integers(1, 6, size=rng.integers(2, 5)))
    widths = (widths[0], *widths[1:-1], max(2, widths[-1]))
    bias = bool(rng.integers(2))
    reduction = ["mean", "sum"][rng.integers(2)]
    loss_fn = [nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss][rng.integers(3)](reduction=reduction)
    n = int(rng.integers(1, 12))
    sizes = [int(s) for s in np.diff(np.sort(np.concatenate([[0, n], rng.integers(0, n + 1, size=2)]))) if s > 0]
    model = mlp(nn.Tanh, widths=widths, bias=bias, seed=case)
    g = torch.Generator().manual_seed(case)
    X = torch.randn(n, widths[0], generator=g)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = torch.randint(0, widths[-1], (n,), generator=g)
    elif isinstance(loss_fn, nn.MSELoss):
        y = torch.randn(n, widths[-1], generator=g)
    else:
        y = torch.randint(0, 2, (n, widths[-1]), generator=g).double()
    kfac = kh.compute_kfac(model, loss_fn, batches(X, y, sizes))
    linear_indices = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    for index in linear_indices:
        A, G = naive_kfac_sequential(model, loss_fn, X, y, index)
        f = kfac[str(index)]
        assert rel_err(f.A, A) < 1e-10
        assert (f.G - G).norm() <= 1e-10 * max(float(G.norm()), 1e-300)
    if n == 1:  # one sample: the Kronecker block is the GGN block
        for index in linear_indices:
            expected = dense_ggn(model, loss_fn, X, y, [str(index)])
            assert (kfac[str(index)].to_dense() - expected).norm() <= 1e-10 * max(float(expected.norm()), 1e-300)
