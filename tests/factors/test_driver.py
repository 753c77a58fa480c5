"""compute_kfac against dense float64 references: exact cases, the general case, scaling, bad input, side effects."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.blocks import KroneckerBlock
from kfac_hessian.losses import hessian_sqrt_columns, loss_spec

from ..conftest import PerPosition, TinyCNN, batches, binary_data, classification_data, mlp, regression_data
from ..references import dense_ggn, dense_hessian, naive_kfac_sequential, public_kron, rel_err

EXACT = 1e-10


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize(
    "loss_fn, make_data",
    [(nn.CrossEntropyLoss(), classification_data), (nn.MSELoss(), regression_data), (nn.BCEWithLogitsLoss(), binary_data)],
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
    X, y = {"CrossEntropyLoss": classification_data, "MSELoss": regression_data}.get(type(loss_fn).__name__, binary_data)()
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


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def test_sequence_deep_linear_expand_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), Transpose())
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(5, 6, 4, generator=g), torch.randn(5, 2, 6, generator=g)
    kfac = kh.compute_kfac(model, nn.MSELoss(), batches(X, y, [3, 2]))
    for name in ("0", "1"):
        assert rel_err(kfac[name].to_dense(), dense_hessian(model, nn.MSELoss(), X, y, [name])) < EXACT


def test_mc_converges_to_ggn_within_derived_error():
    """Last layer, CE: G_mc's entries are means of m i.i.d. draws; their exact variance comes from enumerating labels."""
    model = mlp(nn.Tanh)
    X, y = classification_data(n=8)
    m = 400
    ggn = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["2"])["2"].G
    mc = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), layers=["2"], curvature="mc", mc_samples=m, seed=0)["2"].G
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


def test_mc_seed_reproducible_and_global_rng_untouched():
    model = mlp(nn.Tanh)
    X, y = classification_data()
    state = torch.get_rng_state()
    a = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=7)
    b = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[n].G, b[n].G) for n in a)


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


def test_ggn_columns_square_to_loss_hessian():
    f = torch.randn(2, 4, 3)  # (N, C, T)
    cols = hessian_sqrt_columns(loss_spec(nn.CrossEntropyLoss()), f)
    for n in range(2):
        for t in range(3):
            s = cols[:, n, :, t]  # (column, row)
            p = f[n, :, t].softmax(0)
            assert torch.allclose(s.T @ s, torch.diag(p) - torch.outer(p, p), atol=1e-14)


def test_multiple_calls_contribute_as_locations():
    """A layer applied twice is the same as its input rows stacked: check against an explicit sequence model."""
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    head = nn.Linear(3, 2)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.head = shared, head

        def forward(self, x):
            return self.head(self.shared(x) + self.shared(x.flip(1)))

    X, y = torch.randn(5, 3), torch.randn(5, 2)
    kfac = kh.compute_kfac(Twice(), nn.MSELoss(), (X, y))
    rows = torch.cat([X, X.flip(1)])
    a_bar = torch.cat([rows, torch.ones(10, 1)], 1)
    assert rel_err(kfac["shared"].A, a_bar.T @ a_bar / 10) < EXACT
    # both calls backpropagate g = W_hᵀ √2 e_c (c < C = 2) per sample:
    # G = 1/(N C) · N · 2 calls · Σ_c 2 W_hᵀ e_c e_cᵀ W_h = (4/C) W_hᵀ W_h
    assert rel_err(kfac["shared"].G, 2 * head.weight.T @ head.weight) < EXACT


def test_cnn_runs_and_factor_shapes():
    model = TinyCNN().double()
    X, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert kfac["conv1"].A.shape == (2 * 9 + 1, 19) and kfac["conv1"].G.shape == (3, 3)
    assert kfac["conv2"].A.shape == (3 * 4, 12)
    assert kfac["conv1"].num_params == sum(p.numel() for p in model.conv1.parameters())


def test_matvec_equals_dense_and_accepts_parameter_tuples():
    model = mlp(nn.Tanh)
    X, y = classification_data()
    f = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["0"]
    v = torch.randn(f.num_params, 3)
    assert torch.allclose(f @ v, f.to_dense() @ v, atol=1e-13)
    assert torch.allclose(f @ v[:, 0], f.to_dense() @ v[:, 0], atol=1e-13)
    w, b = torch.randn_like(model[0].weight), torch.randn_like(model[0].bias)
    out_w, out_b = f @ (w, b)
    assert torch.allclose(torch.cat([out_w.flatten(), out_b]), f.to_dense() @ torch.cat([w.flatten(), b]), atol=1e-13)


def test_trace():
    f = kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), classification_data())["0"]
    assert math.isclose(float(f.trace()), float(torch.trace(f.to_dense())), rel_tol=1e-12)


def test_to_dense_refuses_large_layers():
    f = kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), classification_data())["0"]
    with pytest.raises(ValueError, match="eig"):
        f.to_dense(max_params=10)


def test_save_load_round_trip(tmp_path):
    kfac = kh.compute_kfac(TinyCNN().double(), nn.CrossEntropyLoss(), (torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])))
    kfac.save(tmp_path / "k.pt")
    loaded = kh.KFAC.load(tmp_path / "k.pt")
    assert loaded.layer_names == kfac.layer_names and loaded.curvature == kfac.curvature
    for name in kfac:
        assert torch.equal(loaded[name].A, kfac[name].A) and torch.equal(loaded[name].G, kfac[name].G)
        assert loaded[name].layout == kfac[name].layout


def test_load_refuses_pickled_code(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(pickle.UnpicklingError):
        kh.KFAC.load(path)
    assert "pwned" not in capsys.readouterr().out


def test_to_dtype_and_summary():
    kfac = kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), classification_data(), dtype=torch.float32)
    assert kfac["0"].A.dtype == torch.float32
    assert kfac.to(dtype=torch.float64)["0"].G.dtype == torch.float64
    assert "0: Kronecker G ⊗ A, A (6, 6), G (4, 4), P=24" in kfac.summary()
    assert "covered 39 of 39 parameters" in kfac.summary()


# ---- layer selection -------------------------------------------------------------------------------------


def test_modules_without_a_kind_get_exact_per_sample_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 3))
    X, y = classification_data(d=4)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert kfac.layer_names == ["0", "1.weight", "2"] and not kfac.skipped
    assert "1.weight: parameter of PReLU (no layer kind claims it): exact dense block" in kfac.summary()
    assert "covered 36 of 36 parameters (100.0 %)" in kfac.summary()
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


@pytest.mark.parametrize("curvature", ["ggn", "mc"])
def test_column_chunking_does_not_change_factors(curvature):
    model = TinyCNN().double()
    X, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 1])
    runs = [
        kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature=curvature, mc_samples=3, seed=0, column_chunk=c)
        for c in (1, 2, 100)  # one per pass, batched in pairs, all batched
    ]
    for name in runs[0]:
        for other in runs[1:]:
            assert rel_err(other[name].G, runs[0][name].G) < EXACT


def test_convolution_patches_unfolded_in_chunks_give_the_same_factors(monkeypatch):
    import kfac_hessian.limits as limits

    model = TinyCNN()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(7, 2, 4, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    whole = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    monkeypatch.setattr(limits, "WORK_BUFFER_ELEMENTS", 40)  # a few samples' patches per chunk (one conv1 sample: 288)
    chunked = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    for name in whole:
        assert torch.allclose(whole[name].A, chunked[name].A, atol=1e-14)
        assert torch.allclose(whole[name].G, chunked[name].G, atol=1e-14)


class _Tied(nn.Module):
    """One square Linear applied twice (shared weights), then a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.shared, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x, perturb=(0.0, 0.0)):
        h = torch.tanh(self.shared(x) + perturb[0])
        return self.head(torch.tanh(self.shared(h) + perturb[1]))


def test_module_called_twice_contributes_both_calls_as_locations():
    from torch.func import functional_call, hessian, jacrev

    model = _Tied().double()
    X, y = classification_data(n=6, d=4, classes=3)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(X, y, [4, 2]))
    # Reference, written out: rows are (sample, call); A = mean ā āᵀ over the 2N rows,
    # G = (1/N) Σ_{n, call} J_{n,call}ᵀ Λ_n J_{n,call}, J = ∂logits_n/∂z_{n,call} (torch.func).
    params = dict(model.named_parameters())
    A_ref, G_ref = torch.zeros(5, 5), torch.zeros(4, 4)
    for n in range(6):
        x = X[n : n + 1]
        h = torch.tanh(model.shared(x)).detach()
        for a in (x, h):
            a_bar = torch.cat([a[0], torch.ones(1)])
            A_ref += torch.outer(a_bar, a_bar) / 12
        logits = model(x).detach()
        lam = hessian(lambda f: nn.functional.cross_entropy(f, y[n : n + 1]))(logits).reshape(3, 3)
        for call in range(2):
            def f(e, call=call):
                perturb = [torch.zeros(1, 4), torch.zeros(1, 4)]
                perturb[call] = e
                return functional_call(model, params, (x,), {"perturb": tuple(perturb)}).reshape(3)
            J = jacrev(f)(torch.zeros(1, 4)).reshape(3, 4)
            G_ref += J.T @ lam @ J / 6
    assert rel_err(kfac["shared"].A, A_ref) < EXACT
    assert rel_err(kfac["shared"].G, G_ref) < EXACT


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


def _inplace_mlp() -> nn.Sequential:
    """An MLP whose activations (ReLU(inplace=True), ``mul_``) overwrite the layer outputs they act on."""

    class Halve(nn.Module):
        def forward(self, x):
            return x.mul_(0.5)

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), Halve(), nn.Tanh(), nn.Linear(4, 3)).double()


@pytest.mark.parametrize("column_chunk", [1, 100])  # streamed inside the backward / all columns captured together
def test_in_place_operations_on_layer_outputs(column_chunk):
    """G is built from gradients w.r.t. the layer *output*, also when the model overwrites that output in place."""
    model = _inplace_mlp()
    X, y = classification_data(n=1)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), column_chunk=column_chunk)
    for name in ("0", "2", "5"):
        assert rel_err(kfac[name].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])) < EXACT


class _CalledTwiceOnceUnused(nn.Module):
    """``shared`` is called twice; the second call's output never reaches the model output (zero gradient)."""

    def __init__(self, unused_call: bool):
        super().__init__()
        torch.manual_seed(5)
        self.shared, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.unused_call = unused_call

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        if self.unused_call:
            self.shared(2 * x)
        return self.head(h)


@pytest.mark.parametrize("column_chunk", [1, 100])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_a_call_without_influence_counts_as_zero_gradients(column_chunk, approx):
    X, y = classification_data(n=6, d=4, classes=3)
    with_call, without = (
        kh.compute_kfac(_CalledTwiceOnceUnused(u).double(), nn.CrossEntropyLoss(), batches(X, y, [4, 2]),
                        approx=approx, column_chunk=column_chunk)
        for u in (True, False)
    )
    # the unused call's input joins A as further locations; its (zero) gradients add nothing to G
    assert rel_err(with_call["shared"].G, without["shared"].G) < EXACT
    rows = torch.cat([torch.cat([X, torch.ones(6, 1)], 1), torch.cat([2 * X, torch.ones(6, 1)], 1)])
    if approx == "reduce":
        rows = (rows[:6] + rows[6:]) / 2
    assert rel_err(with_call["shared"].A, rows.T @ rows / len(rows)) < EXACT


def test_when_gradients_are_streamed_one_column_per_pass():
    from kfac_hessian.factors.columns import one_column_per_pass as _one_column_per_pass

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on it
    assert _one_column_per_pass(None, cpu, "ggn", 1) and _one_column_per_pass(1, cuda, "ggn", 1)
    assert not _one_column_per_pass(None, cuda, "ggn", 1) and not _one_column_per_pass(4, cpu, "mc", 4)
    assert _one_column_per_pass(None, cuda, "empirical", 1) and _one_column_per_pass(None, cuda, "mc", 1)
    assert not _one_column_per_pass(None, cuda, "mc", 2)


def test_seed_makes_a_model_with_dropout_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double().train()
    X, y = classification_data()
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match=r"dropout is active \(train mode\) in \['1'\].*reproducible with seed=3"):
        a = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=3)
    with pytest.warns(UserWarning, match="dropout is active"):
        b = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=3)
        c = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[n].A, b[n].A) and torch.equal(a[n].G, b[n].G) for n in a)
    assert not torch.equal(a["3"].A, c["3"].A)  # other dropout masks


def test_a_block_without_curvature_is_warned_about():
    model = mlp(nn.Tanh)
    with torch.no_grad():
        model[2].weight.zero_()  # a zero-initialised head: nothing reaches layer 0
    with pytest.warns(RuntimeWarning, match=r"blocks \['0'\] are exactly zero"):
        kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), classification_data())
    assert float(kfac["0"].trace()) == 0 and float(kfac["2"].trace()) > 0


def test_low_precision_models_and_autocast():
    """A bfloat16 model accumulates its blocks in float32 (eig needs it: LAPACK has no bfloat16), and a pass under
    torch.autocast keeps our sums out of it; both agree with float32 to bfloat16's precision."""
    def smooth_cnn():  # tanh: no ReLU kink for bfloat16 rounding to flip
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Tanh(),
                             nn.Flatten(), nn.Linear(8, 3)).float()

    model = smooth_cnn()
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float32), torch.randint(0, 3, (6,), generator=g)
    reference = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    low = kh.compute_kfac(smooth_cnn().to(torch.bfloat16), nn.CrossEntropyLoss(), (X.to(torch.bfloat16), y))
    assert all(b.dtype == torch.float32 for b in low.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    for kfac in (low, autocast):
        for name, block in kfac.items():
            assert block.dtype == torch.float32
            assert rel_err(block.to_dense(), reference[name].to_dense()) < 0.05, name
            assert torch.isfinite(block.eig().topk(3)[0]).all()
    bf16_block = KroneckerBlock(reference["5"].A.bfloat16(), reference["5"].G.bfloat16(), reference["5"].layout)
    assert bf16_block.eig().eigenvalues().dtype == torch.float32  # decomposed in float32
