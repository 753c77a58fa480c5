"""The pass over the data: several calls of a module as locations, in-place operations on layer outputs, column
chunking, seeds (sampled labels, dropout) with the global RNG untouched, low precision and autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.blocks import KroneckerBlock

from ..conftest import TinyCNN, batches, classification_data, mlp
from ..references import EXACT, dense_ggn, rel_err


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
        lam = hessian(lambda f, n=n: nn.functional.cross_entropy(f, y[n : n + 1]))(logits).reshape(3, 3)
        for call in range(2):
            def f(e, call=call, x=x):
                perturb = [torch.zeros(1, 4), torch.zeros(1, 4)]
                perturb[call] = e
                return functional_call(model, params, (x,), {"perturb": tuple(perturb)}).reshape(3)
            J = jacrev(f)(torch.zeros(1, 4)).reshape(3, 4)
            G_ref += J.T @ lam @ J / 6
    assert rel_err(kfac["shared"].A, A_ref) < EXACT
    assert rel_err(kfac["shared"].G, G_ref) < EXACT


def _inplace_mlp() -> nn.Sequential:
    """An MLP whose activations (ReLU(inplace=True), ``mul_``) overwrite the layer outputs they act on."""

    class Halve(nn.Module):
        def forward(self, x):
            return x.mul_(0.5)

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), Halve(), nn.Tanh(),
                         nn.Linear(4, 3)).double()


@pytest.mark.parametrize("column_chunk", [1, 100])  # streamed inside the backward / all columns captured together
def test_in_place_operations_on_layer_outputs(column_chunk):
    """G is built from gradients w.r.t. the layer *output*, also when the model overwrites that output in place."""
    model = _inplace_mlp()
    X, y = classification_data(n=1)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), column_chunk=column_chunk)
    for name in ("0", "2", "5"):
        assert rel_err(kfac[name].to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), X, y, [name])) < EXACT


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


def test_mc_seed_reproducible_and_global_rng_untouched():
    model = mlp(nn.Tanh)
    X, y = classification_data()
    state = torch.get_rng_state()
    a = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=7)
    b = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[n].G, b[n].G) for n in a)


def test_same_seed_bit_identical_factors_on_cpu():
    model = mlp(nn.Tanh)
    X, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    runs = [kh.compute_kfac(model, nn.CrossEntropyLoss(), batches(X, y, [5, 4]), curvature="mc", mc_samples=2, seed=3)
            for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name].A, runs[1][name].A) and torch.equal(runs[0][name].G, runs[1][name].G)


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
    assert bf16_block.eig().eigenvalues.dtype == torch.float32  # decomposed in float32
