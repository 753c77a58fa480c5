"""The nearest Kronecker product: against the SVD of the rearranged dense float64 GGN block (Van Loan–Pitsianis), and
never further from the block than KFAC's ``G ⊗ A`` — on every Kronecker kind."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.blocks import KroneckerBlock

from ..conftest import TinyCNN, batches, classification_data, mlp
from ..references import check_factor_spectra, dense_ggn, nearest_kronecker_error


def _errors(model, loss_fn, X, y, names, iterations, **options):
    data = batches(X, y, [len(X) - len(X) // 3, len(X) // 3])
    kfac = kh.compute_kfac(model, loss_fn, data, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # few iterations: not converged, by design here
        fit = kh.compute_kronecker_fit(model, loss_fn, data, kfac=kfac, iterations=iterations, tol=0.0,
                                       per_position=options.get("per_position", False))
    rows = {}
    for name in names:
        block = fit[name]
        assert isinstance(block, KroneckerBlock), name
        H = dense_ggn(model, loss_fn, X, y, kfac.parameter_names[name])
        check_factor_spectra(block, block.to_dense())
        optimum = nearest_kronecker_error(H, block.layout, block.a_is_diagonal)
        rows[name] = (float((kfac[name].to_dense() - H).norm()), float((block.to_dense() - H).norm()), optimum)
        # the factors keep KFAC's scale split: tr A as KFAC's
        def a_trace(A):
            return A.sum() if A.dim() == 1 else A.diagonal(dim1=-2, dim2=-1).sum()

        assert torch.allclose(a_trace(block.A), a_trace(kfac[name].A), rtol=1e-10)
    return kfac, fit, rows


def test_one_pass_is_never_worse_than_kfac_and_the_iteration_reaches_the_optimum():
    X, y = classification_data(n=9)
    model = mlp(nn.Tanh).double()
    X = X.double()
    _, _, one = _errors(model, nn.CrossEntropyLoss(), X, y, ["0", "2"], iterations=1)
    _, _, many = _errors(model, nn.CrossEntropyLoss(), X, y, ["0", "2"], iterations=60)
    for name in ("0", "2"):
        kfac_error, fit_error, optimum = one[name]
        assert optimum <= fit_error <= kfac_error * (1 + 1e-12), (name, one[name])
        assert many[name][1] <= fit_error * (1 + 1e-12)
        assert abs(many[name][1] - optimum) <= 1e-8 * optimum, (name, many[name])


def test_convolutions_with_weight_sharing():
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(7, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g)
    _, _, rows = _errors(TinyCNN().double(), nn.CrossEntropyLoss(), X, y, ["conv1", "conv2", "fc"], iterations=60)
    for name, (kfac_error, fit_error, optimum) in rows.items():
        assert fit_error <= kfac_error and abs(fit_error - optimum) <= 1e-7 * optimum, (name, rows[name])
    assert rows["conv1"][1] < 0.9 * rows["conv1"][0]  # where KFAC-expand misses the coherence, the fit gains
    narrow = nn.Sequential(nn.Conv1d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(14, 3)).double()
    X1, y1 = torch.randn(6, 1, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    _, _, rows = _errors(narrow, nn.CrossEntropyLoss(), X1, y1, ["0"], iterations=60)  # more locations than width
    assert abs(rows["0"][1] - rows["0"][2]) <= 1e-7 * rows["0"][2] and rows["0"][1] <= rows["0"][0]


def test_every_kronecker_kind_with_per_position_columns():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..conftest import KroneckerKinds as _Kinds

    g = torch.Generator().manual_seed(3)
    tokens, labels = torch.randint(0, 6, (5, 3), generator=g), torch.randint(0, 3, (5, 3), generator=g)
    tokens[0, 0] = 0
    with sdpa_kernel([SDPBackend.MATH]):
        _, _, rows = _errors(_Kinds().double().eval(), nn.CrossEntropyLoss(), tokens, labels,
                             ["embed", "attn", "conv", "proj"], iterations=80, per_position=True)
    for name, (kfac_error, fit_error, optimum) in rows.items():
        assert fit_error <= kfac_error * (1 + 1e-12) and abs(fit_error - optimum) <= 1e-6 * optimum, (name, rows[name])


def test_convergence_warning_and_arguments():
    X, y = classification_data(n=9)
    model = mlp(nn.Tanh).double()
    X = X.double()
    with pytest.warns(RuntimeWarning, match="after 2 passes the fit still changed"):
        kh.compute_kronecker_fit(model, nn.CrossEntropyLoss(), (X, y), iterations=2, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged within the default iterations and tolerance: no warning
        kh.compute_kronecker_fit(model, nn.CrossEntropyLoss(), (X, y), iterations=50, tol=1e-6)
    for bad, message in ((dict(iterations=0), "positive integer"), (dict(curvature="mc"), "needs a seed"),
                         (dict(layers=["0"], kfac=kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))),
                          "configure compute_kfac")):
        with pytest.raises(ValueError, match=message):
            kh.compute_kronecker_fit(model, nn.CrossEntropyLoss(), (X, y), **bad)
