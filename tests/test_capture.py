"""No side effects on the user's model, also when a call raises half-way; non-finite values are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from .conftest import TinyCNN, mlp


def snapshot(model: nn.Module):
    return {
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    }


def assert_same(before, model):
    after = snapshot(model)
    assert after["modes"] == before["modes"] and after["flags"] == before["flags"] and after["hooks"] == before["hooks"]
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(after["params"], before["params"]))


def prepared(model: nn.Module) -> nn.Module:
    """A model with some state to disturb: grads set, one parameter frozen, eval mode on one module."""
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])
    params[-1].requires_grad_(False)
    list(model.modules())[1].eval()
    return model


class FailAfter(nn.Module):
    """Wraps a model and raises on the k-th forward call (a failure half-way through the data)."""

    def __init__(self, inner: nn.Module, k: int):
        super().__init__()
        self.inner, self.k, self.calls = inner, k, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.k:
            raise RuntimeError("boom")
        return self.inner(x)


def calls(model, X, y):
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    loss = nn.CrossEntropyLoss()
    return [
        lambda: kh.compute_kfac(model, loss, data),
        lambda: kh.compute_kfac(model, loss, data, curvature="mc", seed=0),
        lambda: kh.compute_kfac(model, loss, data, curvature="empirical", approx="reduce"),
        lambda: kh.layer_operator(model, loss, data, None, kind="hessian") @ torch.ones(
            sum(p.numel() for p in model.parameters() if p.requires_grad)),
        lambda: kh.layer_operator(model, loss, data, None, kind="ggn") @ torch.ones(
            sum(p.numel() for p in model.parameters() if p.requires_grad)),
    ]


@pytest.mark.parametrize("make_model, make_input",
                         [(mlp, lambda: torch.randn(7, 5)), (TinyCNN, lambda: torch.randn(7, 2, 4, 4))])
@pytest.mark.parametrize("fail_at", [None, 1, 2])
def test_no_side_effects(make_model, make_input, fail_at):
    inner = prepared(make_model().double())
    X, y = make_input(), torch.randint(0, 3, (7,))
    for call_index in range(5):
        model = inner if fail_at is None else FailAfter(inner, fail_at)
        before = snapshot(inner)
        if fail_at is None:
            calls(model, X, y)[call_index]()
        else:
            with pytest.raises(RuntimeError, match="boom"):
                calls(model, X, y)[call_index]()
        assert_same(before, inner)


@pytest.mark.parametrize("make_model, make_input",
                         [(mlp, lambda: torch.randn(7, 5)), (TinyCNN, lambda: torch.randn(7, 2, 4, 4))])
@pytest.mark.parametrize("fail_at", [None, 2, 4, 7])
def test_no_side_effects_of_the_per_sample_passes(make_model, make_input, fail_at):
    """EKFAC and the Kronecker fit run further passes after compute_kfac's (calls 1–4: the sample-axis probe's two runs
    on the first batch, then the two batches): a failure in any of them — in the probe (2), the first pass (4), the
    second (7) — leaves the model as it was."""
    inner = prepared(make_model().double())
    X, y = make_input(), torch.randint(0, 3, (7,))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    for method in (kh.compute_ekfac, kh.compute_kronecker_fit):
        model = inner if fail_at is None else FailAfter(inner, fail_at)
        before = snapshot(inner)
        if fail_at is None:
            method(model, nn.CrossEntropyLoss(), data)
        else:
            with pytest.raises(RuntimeError, match="boom"):
                method(model, nn.CrossEntropyLoss(), data)
        assert_same(before, inner)


def test_recorder_hands_over_output_gradients_inside_the_backward():
    """``on_gradient`` receives d(loss)/d(layer output) — also for an output the model overwrites in place — and the
    recorder keeps no reference to the outputs; the hooks go with the context."""
    from kfac_hessian.capture import LayerRecorder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).double()
    X = torch.randn(6, 5, dtype=torch.float64)
    received = {}
    with LayerRecorder({"0": model[0], "2": model[2]},
                       lambda name, i, leaf, g: received.setdefault(name, g.clone())) as rec:
        out = model(X)
        assert all(call.outputs is None for calls in rec.calls.values() for call in calls)
        torch.autograd.grad(out.square().sum(), rec.anchors)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    z0 = X @ model[0].weight.T + model[0].bias  # reference: the same function written with explicit outputs
    z0.requires_grad_()
    z2 = torch.relu(z0) @ model[2].weight.T + model[2].bias
    reference = torch.autograd.grad(z2.square().sum(), [z0, z2])
    assert torch.allclose(received["0"], reference[0], atol=1e-14)
    assert torch.allclose(received["2"], reference[1], atol=1e-14)
