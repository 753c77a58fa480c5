"""Closed-form loss pieces against autograd / torch.func on the summed PyTorch loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian

from kfac_hessian.losses import (
    HessianSqrt,
    check_batch,
    counted_terms,
    hessian_sqrt_columns,
    hessian_vector_product,
    loss_spec,
    output_gradient,
    sample_output_gradients,
    summed_loss,
    terms_per_sample,
)

CASES = [
    (nn.CrossEntropyLoss(), (3, 4), lambda g: torch.randint(0, 4, (3,), generator=g)),
    (nn.CrossEntropyLoss(), (2, 4, 3), lambda g: torch.randint(0, 4, (2, 3), generator=g)),
    (nn.MSELoss(), (3, 4), lambda g: torch.randn(3, 4, generator=g)),
    (nn.MSELoss(), (2, 3, 2, 2), lambda g: torch.randn(2, 3, 2, 2, generator=g)),
    (nn.MSELoss(), (5,), lambda g: torch.randn(5, generator=g)),
    (nn.BCEWithLogitsLoss(), (3, 4), lambda g: torch.randint(0, 2, (3, 4), generator=g).double()),
]


@pytest.mark.parametrize("loss_fn, shape, make_target", CASES)
def test_gradient_and_hessian_pieces_match_autograd(loss_fn, shape, make_target):
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(shape, generator=g), make_target(g)
    spec = loss_spec(loss_fn)
    check_batch(spec, f, y)
    total = lambda out: summed_loss(spec, out, y)  # noqa: E731
    assert torch.allclose(total(f), type(loss_fn)(reduction="sum")(f, y))
    (grad,) = torch.autograd.grad(total(f.requires_grad_()), f)
    f = f.detach()
    assert torch.allclose(output_gradient(spec, f, y), grad, atol=1e-14)
    H = hessian(total)(f).reshape(f.numel(), f.numel())
    cols = hessian_sqrt_columns(spec, f).reshape(-1, f.numel())
    # columns are applied at all positions jointly: S Sᵀ equals H on the (position, position) diagonal blocks
    SS = cols.T @ cols
    positions = torch.arange(f.numel()).reshape(f.shape if f.dim() > 1 else (f.shape[0], 1))
    same_position = positions.movedim(1, -1).reshape(-1, positions.shape[1]) if f.dim() > 1 else positions
    mask = torch.zeros(f.numel(), f.numel(), dtype=torch.bool)
    for group in same_position:
        mask[group[:, None], group[None, :]] = True
    assert torch.allclose(SS[mask], H[mask], atol=1e-13)
    assert torch.allclose(H[~mask], torch.zeros(()), atol=1e-13)  # terms do not couple positions
    U = torch.randn(2, *f.shape, generator=g)
    assert torch.allclose(hessian_vector_product(spec, f, U).reshape(2, -1), U.reshape(2, -1) @ H, atol=1e-13)


@pytest.mark.parametrize("loss_fn, shape, make_target", CASES)
def test_sampled_gradients_have_the_loss_hessian_as_second_moment(loss_fn, shape, make_target):
    g = torch.Generator().manual_seed(1)
    f = torch.randn(shape, generator=g)
    spec = loss_spec(loss_fn)
    m = 20000
    samples = sample_output_gradients(spec, f, m, g).reshape(m, -1)
    y = make_target(torch.Generator().manual_seed(0))  # the loss Hessian does not depend on the labels
    H = hessian(lambda out: summed_loss(spec, out, y))(f).reshape(f.numel(), -1)
    second = samples.T @ samples / m
    diag = H.diagonal()
    # standard error of a mean of m draws is below sqrt(E[g⁴]/m); entries of g are bounded by 2·sqrt(max Λ)+2
    bound = 5 * (2 + 2 * diag.max().sqrt()) ** 2 / m**0.5
    assert (second - H).abs().max() < bound


def test_terms_per_sample():
    assert terms_per_sample(loss_spec(nn.CrossEntropyLoss()), torch.zeros(2, 5, 3, 4)) == 12
    assert terms_per_sample(loss_spec(nn.MSELoss()), torch.zeros(2, 5, 3)) == 15


@pytest.mark.parametrize(
    "loss_fn, error, match",
    [
        (nn.NLLLoss(), TypeError, "unsupported loss NLLLoss"),
        (lambda f, y: f.sum(), TypeError, "unsupported loss"),
        (nn.MSELoss(reduction="none"), ValueError, "reduction='none'"),
        (nn.CrossEntropyLoss(weight=torch.ones(3)), ValueError, "class weights"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), ValueError, "label_smoothing"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), ValueError, "pos_weight"),
    ],
)
def test_unsupported_losses(loss_fn, error, match):
    with pytest.raises(error, match=match):
        loss_spec(loss_fn)


@pytest.mark.parametrize(
    "loss_fn, output, target, match",
    [
        (nn.CrossEntropyLoss(), torch.zeros(3, 4), torch.zeros(3, 4), "class indices"),
        (nn.CrossEntropyLoss(), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), r"expected \(3,\)"),
        (nn.CrossEntropyLoss(), torch.zeros(3, 4), torch.tensor([0, 1, 4]), r"lie in \[0, 4\)"),
        (nn.CrossEntropyLoss(), torch.zeros(3, 4), torch.tensor([-100, -100, -100]), "no counted target"),
        (nn.CrossEntropyLoss(), torch.zeros(3, 4), torch.tensor([0, -1, -100]), r"or equal ignore_index=-100"),
        (nn.MSELoss(), torch.zeros(3, 4), torch.zeros(3, 1), "must match exactly"),
        (nn.MSELoss(), torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.long), "floating point"),
        (nn.CrossEntropyLoss(), torch.zeros(3), torch.zeros(3, dtype=torch.long), r"\(N, C\)"),
    ],
)
def test_bad_targets(loss_fn, output, target, match):
    with pytest.raises(ValueError, match=match):
        check_batch(loss_spec(loss_fn), output, target)


def test_ggn_columns_square_to_loss_hessian():
    f = torch.randn(2, 4, 3)  # (N, C, T)
    cols = hessian_sqrt_columns(loss_spec(nn.CrossEntropyLoss()), f)
    for n in range(2):
        for t in range(3):
            s = cols[:, n, :, t]  # (column, row)
            p = f[n, :, t].softmax(0)
            assert torch.allclose(s.T @ s, torch.diag(p) - torch.outer(p, p), atol=1e-14)


IGNORED = [(-100, torch.tensor([[2, -100, 0], [-100, -100, 3]])),  # transformers' labels
           (0, torch.tensor([[2, 0, 1], [0, 0, 3]]))]  # an ignore_index that is also a class


@pytest.mark.parametrize("ignore_index, y", IGNORED)
def test_ignored_targets_have_no_terms(ignore_index, y):
    """With targets equal to ``ignore_index`` every piece equals torch.func's of the summed loss that PyTorch
    computes: no term, so zero gradient, zero Hessian rows, zero square-root columns at those positions."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss(ignore_index=ignore_index)
    spec = loss_spec(loss_fn)
    check_batch(spec, f, y)
    ignored = (y == ignore_index).unsqueeze(1).expand_as(f)
    total = lambda out: summed_loss(spec, out, y)  # noqa: E731
    assert torch.allclose(total(f), nn.CrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(f, y))
    assert counted_terms(spec, f, y) == int((y != ignore_index).sum())
    assert torch.allclose(loss_fn(f, y), total(f) / counted_terms(spec, f, y))
    leaf = f.clone().requires_grad_()
    (grad,) = torch.autograd.grad(total(leaf), leaf)
    assert torch.allclose(output_gradient(spec, f, y), grad, atol=1e-14)
    H = hessian(total)(f).reshape(f.numel(), f.numel())
    cols = hessian_sqrt_columns(spec, f, y)
    assert cols[:, ignored].abs().max() == 0
    flat = cols.reshape(len(cols), -1)
    same_position = torch.arange(f.numel()).reshape(f.shape).movedim(1, -1).reshape(-1, f.shape[1])
    for group in same_position:  # terms do not couple positions: S Sᵀ = H on each position's block
        block = group[:, None], group[None, :]
        assert torch.allclose((flat.T @ flat)[block], H[block], atol=1e-13)
    U = torch.randn(2, *f.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(hessian_vector_product(spec, f, U, y).reshape(2, -1), U.reshape(2, -1) @ H, atol=1e-13)
    signs = HessianSqrt(spec, f, y).apply(torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64))
    assert signs[:, ignored].abs().max() == 0
    # Monte-Carlo labels: the same draws as without ignored targets, zeroed where the term is absent
    drawn = sample_output_gradients(spec, f, 7, torch.Generator().manual_seed(3), y)
    every = sample_output_gradients(spec, f, 7, torch.Generator().manual_seed(3))
    assert drawn[:, ignored].abs().max() == 0 and torch.equal(drawn[:, ~ignored], every[:, ~ignored])


def test_data_without_a_counted_target_is_refused():
    spec = loss_spec(nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="no counted loss term"):
        spec.scale(4, 0.0)
    assert spec.scale(4, 2.5) == 1 / 10  # τ = Z/N need not be an integer: the mean over Z = 10 counted targets
