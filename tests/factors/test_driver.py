"""compute_kfac's exactness claims against dense float64 references: one sample is the GGN block, deep linear MSE
is the Hessian, the general case is the per-sample reference; batching, sum vs mean; which layers get blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import PerPosition, Transpose, batches, binary_data, classification_data, mlp, regression_data
from ..references import EXACT, dense_ggn, dense_hessian, naive_kfac_sequential, public_kron, rel_err


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize(
    "loss_fn, make_data",
    [(nn.CrossEntropyLoss(), classification_data), (nn.MSELoss(), regression_data),
     (nn.BCEWithLogitsLoss(), binary_data)],
)
def test_one_sample_equals_ggn_block(activation, loss_fn, make_data):
    model = mlp(activation)
    X, y = make_data(n=1)
    kfac = kh.compute_kfac(model, loss_fn, (X, y))
    for name in ("0", "2"):
        assert rel_err(kfac[name].to_dense(), dense_ggn(model, loss_fn, X, y, [name])) < EXACT


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_mse_equals_hessian(reduction):
    model = mlp(activation=None, widths=(4, 5, 3, 2))
    X, y = regression_data(n=9, d=4, out=2)
    loss_fn = nn.MSELoss(reduction=reduction)
    kfac = kh.compute_kfac(model, loss_fn, batches(X, y, [4, 4, 1]))
    for name in ("0", "1", "2"):
        assert rel_err(kfac[name].to_dense(), dense_hessian(model, loss_fn, X, y, [name])) < EXACT


def test_last_layer_mse_equals_hessian_with_nonlinear_body():
    model = mlp(nn.Tanh)
    X, y = regression_data()
    kfac = kh.compute_kfac(model, nn.MSELoss(), batches(X, y, [6, 5]))
    assert rel_err(kfac["2"].to_dense(), dense_hessian(model, nn.MSELoss(), X, y, ["2"])) < EXACT


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_general_case_equals_naive_per_sample_reference(bias, reduction):
    model = mlp(nn.Tanh, widths=(5, 4, 4, 3), bias=bias)
    X, y = classification_data()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    kfac = kh.compute_kfac(model, loss_fn, batches(X, y, [5, 5, 1]))
    for index, name in ((0, "0"), (2, "2"), (4, "4")):
        A, G = naive_kfac_sequential(model, loss_fn, X, y, index)
        assert rel_err(kfac[name].A, A) < EXACT and rel_err(kfac[name].G, G) < EXACT
        assert rel_err(kfac[name].to_dense(), public_kron(G, A, bias)) < EXACT


def test_batching_does_not_change_factors():
    model = mlp(nn.Tanh)
    X, y = classification_data(n=10)
    whole = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    split = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(X, y, [3, 3, 3, 1]))
    for name in whole:
        assert rel_err(split[name].A, whole[name].A) < EXACT and rel_err(split[name].G, whole[name].G) < EXACT


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(), nn.BCEWithLogitsLoss()])
def test_sum_is_n_tau_times_mean(loss_fn):
    model = mlp(nn.Tanh)
    X, y = {"CrossEntropyLoss": classification_data, "MSELoss": regression_data}.get(
        type(loss_fn).__name__, binary_data)()
    mean = kh.compute_kfac(model, loss_fn, (X, y))
    loss_fn_sum = type(loss_fn)(reduction="sum")
    total = kh.compute_kfac(model, loss_fn_sum, (X, y))
    tau = 1 if isinstance(loss_fn, nn.CrossEntropyLoss) else 3
    for name in mean:
        assert rel_err(total[name].to_dense(), len(X) * tau * mean[name].to_dense()) < EXACT


def test_sequence_cross_entropy_expand_equals_flattened_positions():
    """(N, C, T) outputs, per-position network: positions act as samples of one flat (N·T) problem."""
    model = PerPosition()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(4, 5, 4, generator=g), torch.randint(0, 3, (4, 5), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(X, y, [3, 1]))
    flat = nn.Sequential(model.fc1, nn.Tanh(), model.fc2)
    for index, name in ((0, "fc1"), (2, "fc2")):
        A, G = naive_kfac_sequential(flat, nn.CrossEntropyLoss(), X.reshape(-1, 4), y.reshape(-1), index)
        assert rel_err(kfac[name].A, A) < EXACT and rel_err(kfac[name].G, G) < EXACT


def test_sequence_deep_linear_expand_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), Transpose())
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(5, 6, 4, generator=g), torch.randn(5, 2, 6, generator=g)
    kfac = kh.compute_kfac(model, nn.MSELoss(), batches(X, y, [3, 2]))
    for name in ("0", "1"):
        assert rel_err(kfac[name].to_dense(), dense_hessian(model, nn.MSELoss(), X, y, [name])) < EXACT


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


# ---- layer selection -------------------------------------------------------------------------------------


def test_modules_without_a_kind_get_exact_per_sample_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 3))
    X, y = classification_data(d=4)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert kfac.layer_names == ["0", "1.weight", "2"] and not kfac.skipped
    assert ("1.weight: parameter of PReLU (no layer kind claims it): dense block (per-sample gradients) — exact GGN "
            "block") in kfac.summary()
    assert "covered 36 of 36 trainable parameters (100.0 %)" in kfac.summary()
    assert rel_err(kfac["1.weight"].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, ["1"])) < EXACT


def test_frozen_layers_skipped_by_default_but_computable_by_name():
    model = mlp(nn.Tanh)
    X, y = classification_data()
    for p in model[0].parameters():
        p.requires_grad_(False)
    assert "0" in kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y)).skipped
    frozen = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["0"])
    A, G = naive_kfac_sequential(model, nn.CrossEntropyLoss(), X, y, 0)
    assert rel_err(frozen["0"].A, A) < EXACT and rel_err(frozen["0"].G, G) < EXACT
    assert all(not p.requires_grad for p in model[0].parameters())


@pytest.mark.parametrize(
    "layers, message",
    [(["nope"], "no layer or parameter named 'nope'"), (["1"], r"module '1' \(Tanh\) has no parameters"),
     ([], "selects nothing"), (["0.weight"], "part of layer '0'")],
)
def test_bad_layer_names(layers, message):
    with pytest.raises(ValueError, match=message):
        kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), classification_data(), layers=layers)


class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.unused = mlp(nn.Tanh), nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def test_never_called_layer():
    model = WithUnusedLayer()
    X, y = classification_data()
    assert "unused" in kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y)).skipped
    with pytest.raises(ValueError, match="never called"):
        kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["unused"])
