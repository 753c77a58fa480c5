"""The columns backpropagated from the output: sampled labels (mc) and true labels (empirical) against their
definitions, per-position columns and random position signs against the exact per-position blocks, and when
columns are streamed one per pass."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import PerPosition, batches, binary_data, classification_data, mlp, regression_data
from ..references import EXACT, rel_err


def test_mc_converges_to_ggn_within_derived_error():
    """Last layer, CE: G_mc's entries are means of m i.i.d. draws; their exact variance comes from enumerating
    labels."""
    model = mlp(nn.Tanh)
    X, y = classification_data(n=8)
    m = 400
    ggn = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["2"])["2"].G
    mc = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["2"], curvature="mc", mc_samples=m,
                         seed=0)["2"].G
    with torch.no_grad():
        p = model(X).softmax(1)
    variance = torch.zeros_like(ggn)
    for p_n in p:
        draws = p_n[None, :] - torch.eye(3)  # g for each sampled class c
        outer = draws[:, :, None] * draws[:, None, :]
        variance += (p_n[:, None, None] * outer**2).sum(0) - ((p_n[:, None, None] * outer).sum(0)) ** 2
    variance = variance / (len(X) ** 2 * m)
    z2 = ((mc - ggn) ** 2 / variance).mean()
    assert z2 < 4.0  # E[z²] = 1 per entry
    assert rel_err(mc, ggn) < 0.2


@pytest.mark.parametrize("loss_fn, make_data", [(nn.MSELoss(), regression_data), (nn.BCEWithLogitsLoss(), binary_data)])
def test_mc_expectation_matches_ggn_for_regression_losses(loss_fn, make_data):
    model = mlp(nn.Tanh)
    X, y = make_data(n=6)
    ggn = kh.compute_kfac(model, loss_fn, (X, y), layers=["2"])["2"].G
    mc = kh.compute_kfac(model, loss_fn, (X, y), layers=["2"], curvature="mc", mc_samples=4000, seed=1)["2"].G
    assert rel_err(mc, ggn) < 6 / math.sqrt(4000) * 3


def test_empirical_fisher_per_sample_definition():
    """G = (1/N) Σ g_n g_nᵀ with g_n = ∂ℓ_n/∂z, ℓ_n = loss_fn on sample n alone (autograd per sample)."""
    model = mlp(nn.Tanh)
    X, y = regression_data(n=6)
    loss_fn = nn.MSELoss()
    kfac = kh.compute_kfac(model, loss_fn, batches(X, y, [4, 2]), curvature="empirical")
    reference = torch.zeros(3, 3)
    for x_n, y_n in zip(X, y):
        z = model[:3](x_n[None]).detach().requires_grad_()
        (g,) = torch.autograd.grad(loss_fn(model[3:](z), y_n[None]), z)
        reference += g.T @ g / len(X)
    assert rel_err(kfac["2"].G, reference) < EXACT


def test_per_position_columns_remove_cross_position_terms():
    import warnings

    from benchmarks.reference_models import TinyGPT

    from ..references import dense_ggn

    torch.manual_seed(0)
    model = TinyGPT(9, dim=8, depth=1, heads=2, context=5).double()
    tokens = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(1))
    data = (tokens[:, :-1], tokens[:, 1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exact reference may switch attention kernels
        joint = kh.compute_kfac(model, nn.CrossEntropyLoss(), data, position_signs=0)
        exact = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(*data, [2, 1]), per_position=True)
        for name in ("ln", "blocks.0.ln1", "blocks.0.ln2"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]):
                reference = dense_ggn(model, nn.CrossEntropyLoss(), *data, [name])
            assert rel_err(exact[name].to_dense(), reference) < EXACT
            assert rel_err(joint[name].to_dense(), reference) > 0.1  # joint columns: cross terms
    # a per-position network has no cross terms: both ways agree
    model = PerPosition()
    X = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (4, 3), generator=torch.Generator().manual_seed(3))
    a = kh.compute_kfac(model.double(), nn.CrossEntropyLoss(), (X.double(), y))
    b = kh.compute_kfac(model.double(), nn.CrossEntropyLoss(), (X.double(), y), per_position=True, column_chunk=4)
    for name in a:
        assert rel_err(a[name].G, b[name].G) < EXACT and rel_err(a[name].A, b[name].A) < EXACT
    with pytest.raises(ValueError, match="per_position"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), (X.double(), y), curvature="mc", per_position=True)


def test_position_signs_estimate_the_per_position_blocks():
    """Random signs per (sample, position): the cross-position products vanish in expectation, so the estimate
    approaches the per-position (exact) blocks as 1/√R — and is exact for every draw where there are no cross terms."""
    import warnings

    from benchmarks.reference_models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(9, dim=8, depth=1, heads=2, context=5).double()
    tokens = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(1))
    data = (tokens[:, :-1], tokens[:, 1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        joint = kh.compute_kfac(model, nn.CrossEntropyLoss(), data, position_signs=0)
        exact = kh.compute_kfac(model, nn.CrossEntropyLoss(), data, per_position=True)
        few = kh.compute_kfac(model, nn.CrossEntropyLoss(), data, position_signs=4, seed=0)
        default = kh.compute_kfac(model, nn.CrossEntropyLoss(), data)  # one draw, seeded with 0
        assert all(torch.equal(default[n].to_dense(), kh.compute_kfac(
            model, nn.CrossEntropyLoss(), data, position_signs=1, seed=0)[n].to_dense()) for n in ("ln", "tok"))
        many = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(*data, [2, 1]), position_signs=256, seed=0)
        again = kh.compute_kfac(model, nn.CrossEntropyLoss(), data, position_signs=4, seed=0)
    for name in ("ln", "blocks.0.ln1", "tok"):
        err = {label: rel_err(r[name].to_dense(), exact[name].to_dense()) for label, r in
               (("joint", joint), ("few", few), ("many", many))}
        assert err["many"] < 0.06 and err["many"] < err["few"] < err["joint"] / 3, (name, err)
        assert torch.equal(few[name].to_dense(), again[name].to_dense())  # seeded
    for name in ("blocks.0.q", "head"):  # position-local layers: no cross terms, every draw is exact
        assert rel_err(few[name].to_dense(), exact[name].to_dense()) < EXACT
    # one output position per sample: no signs to draw, the default blocks
    model = mlp(nn.Tanh)
    X, y = classification_data()
    a = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    b = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), position_signs=3, seed=0)
    assert all(torch.equal(a[name].G, b[name].G) for name in a)
    with pytest.warns(RuntimeWarning, match="joint loss-Hessian columns over 5 output positions"):
        kh.compute_kfac(TinyGPT(9, dim=8, depth=1, heads=2, context=5).double(), nn.CrossEntropyLoss(), data,
                        position_signs=0)
    for bad, message in ((dict(position_signs=-1), "non-negative integer"), (dict(position_signs=True), "integer"),
                         (dict(position_signs=2, per_position=True), "pick one"),
                         (dict(position_signs=2, curvature="mc"), "apply to curvature='ggn'")):
        with pytest.raises(ValueError, match=message):
            kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), **bad)


def test_when_gradients_are_streamed_one_column_per_pass():
    from kfac_hessian.factors.columns import one_column_per_pass as _one_column_per_pass

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on it
    assert _one_column_per_pass(None, cpu, "ggn", 1) and _one_column_per_pass(1, cuda, "ggn", 1)
    assert not _one_column_per_pass(None, cuda, "ggn", 1) and not _one_column_per_pass(4, cpu, "mc", 4)
    assert _one_column_per_pass(None, cuda, "empirical", 1) and _one_column_per_pass(None, cuda, "mc", 1)
    assert not _one_column_per_pass(None, cuda, "mc", 2)


def test_column_chunks_per_position_and_with_sign_draws():
    """Per position: column ``k`` at position ``t`` alone (zeros elsewhere), all ``K·T`` of them in chunks; with ``R``
    sign draws: ``K·R`` columns of the same magnitude ``|c|/√R``, one sign per (sample, position)."""
    from kfac_hessian.factors.columns import DenseColumns, column_chunks

    K, N, C, T = 2, 3, 4, 5
    columns = torch.randn(K, N, C, T, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    count, chunks = column_chunks(DenseColumns(columns), columns.shape[1:], 3, per_position=True)
    chunks = list(chunks)
    assert count == len(chunks) == math.ceil(K * T / 3) and all(len(c) <= 3 for c in chunks)
    split = torch.cat(chunks).reshape(K, T, N, C, T)  # (column, position, *output)
    for t in range(T):
        expected = torch.zeros_like(columns)
        expected[..., t] = columns[..., t]
        assert torch.equal(split[:, t], expected)
    assert torch.equal(split.sum(1), columns)
    R = 3
    count, chunks = column_chunks(DenseColumns(columns), columns.shape[1:], 4, position_signs=R,
                                  generator=torch.Generator().manual_seed(1))
    draws = torch.cat(list(chunks))
    assert count == math.ceil(K * R / 4) and draws.shape == (K * R, N, C, T)
    draws = draws.reshape(R, K, N, C, T)  # draw-major
    assert torch.allclose(draws.abs(), columns.abs().expand(R, -1, -1, -1, -1) / math.sqrt(R), atol=1e-15)
    signs = draws / (columns / math.sqrt(R))
    assert torch.allclose(signs, signs[:, :, :, :1, :].expand_as(signs), atol=1e-12)  # one sign across the C axis
    again = torch.cat(list(column_chunks(DenseColumns(columns), columns.shape[1:], 4, position_signs=R,
                                         generator=torch.Generator().manual_seed(1))[1]))
    assert torch.equal(again.reshape(R, K, N, C, T), draws)  # the generator decides the signs
    flat = columns[:, :, :, 0]  # one position per sample: the columns as they are
    count, chunks = column_chunks(DenseColumns(flat), flat.shape[1:], 2, per_position=True, position_signs=R)
    assert count == 1 and torch.equal(next(chunks), flat)


def _householder_columns(f: torch.Tensor) -> torch.Tensor:
    """The dense reference: ``S = (diag(√p) − p √pᵀ) Q`` with ``Q`` the first ``C − 1`` columns of the Householder
    reflection that maps ``e_C`` to ``−√p``, formed as a matrix per (sample, position): ``(C − 1, N, C, T)``."""
    p = f.softmax(1).movedim(1, -1)  # (N, T, C)
    sqrt_p, C = p.sqrt(), p.shape[-1]
    w = sqrt_p.clone()
    w[..., -1] += 1
    H = torch.eye(C, dtype=f.dtype) - 2 * w[..., :, None] * w[..., None, :] / (w * w).sum(-1)[..., None, None]
    S = (torch.diag_embed(sqrt_p) - p[..., :, None] * sqrt_p[..., None, :]) @ H[..., :, :-1]  # (N, T, C, C − 1)
    return S.permute(3, 0, 2, 1)


def test_lazy_ggn_columns_equal_the_dense_square_root_in_every_chunking():
    """Columns computed a chunk at a time from S's closed form equal the dense Householder square root (float64, ≤
    1e-13), every chunking gives the same columns, and S Sᵀ is the loss Hessian diag(p) − p pᵀ per position."""
    from kfac_hessian.factors.columns import column_chunks, output_columns
    from kfac_hessian.losses import loss_spec

    f = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # (N, C, T)
    spec = loss_spec(nn.CrossEntropyLoss())
    dense = _householder_columns(f)
    for size in (1, 3, None):
        count, chunks = column_chunks(output_columns(spec, "ggn", f, None, 1, None), f.shape, size)
        lazy = torch.cat(list(chunks))
        assert count == math.ceil(6 / (size or 6)) and (lazy - dense).abs().max() < 1e-13
    for n in range(3):
        for t in range(4):
            p = f[n, :, t].softmax(0)
            s = dense[:, n, :, t]
            assert (s.T @ s - (torch.diag(p) - torch.outer(p, p))).abs().max() < 1e-14


def test_chunked_ggn_factors_equal_the_dense_ggn():
    """A model whose output is the logits of a 7-class sequence model: factors from the lazy columns, one per pass
    and in vectorized chunks of 4, equal each other and the dense float64 GGN (per position: no cross terms)."""
    model = PerPosition(c=7).double()
    X = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(3))
    from ..references import dense_ggn

    one = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), column_chunk=1, per_position=True)
    four = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), column_chunk=4, per_position=True)
    for name in one:
        assert (one[name].G - four[name].G).abs().max() <= 1e-12 * one[name].G.abs().max()
    x1 = X[:1, :1]  # one sample, one position: G ⊗ A is the GGN block exactly
    single = kh.compute_kfac(model, nn.CrossEntropyLoss(), (x1, y[:1, :1]), column_chunk=4)
    for name in single:
        reference = dense_ggn(model, nn.CrossEntropyLoss(), x1, y[:1, :1], [name])
        assert rel_err(single[name].to_dense(), reference) < 1e-12


def test_random_sign_combinations_are_unbiased():
    """column_signs: E[s sᵀ] = I makes the combinations' outer products average to Σ_k c_k c_kᵀ = Λ. Exactly, over
    all 2^K sign vectors (one sample, one position); and through compute_kfac, the last layer's G (whose output
    gradients are the combinations themselves) is within the derived standard error of the exact G."""
    from kfac_hessian.losses import HessianSqrt, loss_spec

    f = torch.randn(1, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    root = HessianSqrt(loss_spec(nn.CrossEntropyLoss()), f)
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * root.rank)  # (2^K, K)
    combined = root.apply(signs[:, None, :])[:, 0]  # (2^K, C)
    p = f[0].softmax(0)
    assert (combined.T @ combined / len(signs) - (torch.diag(p) - torch.outer(p, p))).abs().max() < 1e-14
    # statistical: the head's G over R draws; Var of a Rademacher quadratic form sᵀMs is 2 Σ_{k≠l} M_kl²
    model = PerPosition(c=5).double()
    X = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.randint(0, 5, (3, 2), generator=torch.Generator().manual_seed(6))
    R = 200
    exact = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), per_position=True, layers=["fc2"])["fc2"].G
    estimate = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), column_signs=R, seed=0, layers=["fc2"],
                               column_chunk=64)["fc2"].G
    with torch.no_grad():
        logits = model(X)  # (N, C, T)
    scale = 1 / (3 * 2)
    variance = torch.zeros_like(exact)
    for n in range(3):
        for t in range(2):
            a = HessianSqrt(loss_spec(nn.CrossEntropyLoss()), logits[n : n + 1, :, t]).columns(
                torch.arange(4))[:, 0]  # (K, C): a[:, i] = the i-th output's coefficients
            M = (a[:, :, None, None] * a[None, None, :, :]).permute(1, 3, 0, 2)  # (i, j, k, l) = a_ki a_lj
            M = (M + M.transpose(2, 3)) / 2  # the symmetric matrix of the same quadratic form
            off = M - torch.diag_embed(torch.diagonal(M, dim1=2, dim2=3))
            variance += 2 * (off**2).sum((2, 3)) * scale**2 / R
    z2 = ((estimate - exact) ** 2 / variance.clamp_min(1e-300)).mean()
    assert z2 < 4.0 and rel_err(estimate, exact) < 0.3  # E[z²] = 1 per entry
