from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from benchmarks.alignment import (
    align_vectors,
    match_hidden_units,
    permute_hidden_units,
    public_order_index,
    rescale_hidden_units,
)
from tests.conftest import classification_data, mlp
from tests.references import dense_hessian


def random_perms(model: nn.Sequential, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = [n for n, m in model.named_children() if isinstance(m, nn.Linear)][:-1]
    return {n: torch.randperm(model.get_submodule(n).out_features, generator=g) for n in hidden}


@pytest.fixture
def problem():
    model = mlp(widths=(5, 6, 4, 3), seed=2)
    X, y = classification_data(n=40, d=5, classes=3)
    return model, X, y


def test_permuted_copy_computes_the_same_function_and_is_aligned_back_exactly(problem):
    model, X, _ = problem
    perms = random_perms(model)
    permuted = permute_hidden_units(model, perms)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), permuted.parameters()))
    torch.testing.assert_close(permuted(X), model(X), rtol=1e-12, atol=1e-12)
    found = match_hidden_units(model, permuted, X)
    for name, perm in perms.items():
        assert torch.equal(perm[found[name]], torch.arange(len(perm)))  # found = perm⁻¹
    restored = permute_hidden_units(permuted, found)
    for (name, a), b in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("layer", ["0", "2", "4"])
def test_public_order_index_permutes_the_dense_hessian_block(problem, layer):
    model, X, y = problem
    perms = random_perms(model)
    permuted = permute_hidden_units(model, perms)
    loss_fn = nn.CrossEntropyLoss()
    H = dense_hessian(model, loss_fn, X, y, [layer])
    H_permuted = dense_hessian(permuted, loss_fn, X, y, [layer])
    index = public_order_index(model, layer, perms)
    torch.testing.assert_close(H_permuted, H[index][:, index], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer", ["0", "2", "4"])
def test_exact_overlap_with_a_permuted_copy_is_one_after_alignment(problem, layer):
    model, X, y = problem
    loss_fn = nn.CrossEntropyLoss()
    permuted = permute_hidden_units(model, random_perms(model))
    perms = match_hidden_units(model, permuted, X)
    k = 3
    _, vectors = kh.lanczos(kh.layer_operator(model, loss_fn, (X, y), layer), k, seed=0)
    _, vectors_permuted = kh.lanczos(kh.layer_operator(permuted, loss_fn, (X, y), layer), k, seed=0)
    aligned = align_vectors(vectors_permuted, permuted, layer, perms)
    assert kh.eigenspace_overlap(vectors, aligned) == pytest.approx(1.0, abs=1e-10)
    assert kh.eigenspace_overlap(vectors, vectors_permuted) < 1 - 1e-3  # unaligned: the units are shuffled


def test_rescaled_relu_units_keep_the_function_but_not_the_block(problem):
    model, X, y = problem
    g = torch.Generator().manual_seed(5)
    scales = {"0": torch.rand(6, generator=g) + 0.5, "2": torch.rand(4, generator=g) + 0.5}
    rescaled = rescale_hidden_units(model, scales)
    torch.testing.assert_close(rescaled(X), model(X), rtol=1e-12, atol=1e-12)
    loss_fn = nn.CrossEntropyLoss()
    H, H_rescaled = (dense_hessian(m, loss_fn, X, y, ["2"]) for m in (model, rescaled))
    # W' = W · α_out / α_in entrywise (b' = b · α_out), so the loss in W' has the Hessian D H D, D = diag(α_in / α_out)
    d_in = 6
    factor = torch.cat([(1 / scales["2"])[:, None] * scales["0"][None, :], (1 / scales["2"])[:, None]], 1)
    factor = torch.cat([factor[:, :d_in].flatten(), factor[:, d_in]])
    torch.testing.assert_close(H_rescaled, factor[:, None] * H * factor[None, :], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(H_rescaled, H)
    with pytest.raises(ValueError, match="positively homogeneous"):
        rescale_hidden_units(mlp(activation=nn.Tanh, widths=(5, 6, 4, 3)), scales)


def test_refuses_what_it_cannot_align(problem):
    model, X, _ = problem
    with pytest.raises(NotImplementedError, match="element-wise"):
        match_hidden_units(nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)), model, X)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_hidden_units(model, {"0": torch.tensor([0, 0, 1, 2, 3, 4])})
    with pytest.raises(ValueError, match="hidden Linear layer"):
        public_order_index(model, "4", {"4": torch.arange(3)})
    with pytest.raises(ValueError, match="different layers"):
        match_hidden_units(model, mlp(widths=(5, 6, 3), seed=0), X)
