from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from kfac_hessian.optim import ScaleAmendedSGD

from .conftest import classification_data


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()


def _loss(model, X, y):
    return nn.functional.cross_entropy(model(X), y)


def test_step_equals_hand_computed_step():
    model = _model()
    X, y = classification_data(n=8, d=3, classes=2)
    opt = ScaleAmendedSGD(model, lr=0.1, momentum=0.5, weight_decay=0.01)
    reference = copy.deepcopy(model)
    buffers = {}
    for step in range(2):
        opt.zero_grad()
        _loss(model, X, y).backward()
        # by hand: h_0 = mean(γ²/(running_var + ε)) · mean_n(‖x_n‖² + 1)/4, h_3 = mean_n(‖a_n‖² + 1)/5,
        # a = ReLU(BN(layer 0)) in train mode; the input power is averaged with ema 0.9 from the 2nd step on
        with torch.no_grad():
            hidden = reference[2](reference[1](reference[0](X)))  # train mode: updates running stats like model
        power0 = ((X**2).sum(1) + 1).mean() / 4
        power3 = ((hidden**2).sum(1) + 1).mean() / 5
        if step == 0:
            p0, p3 = power0, power3
        else:
            p0, p3 = 0.9 * p0 + 0.1 * power0, 0.9 * p3 + 0.1 * power3
        bn = reference[1]
        h = {"0": (bn.weight**2 / (bn.running_var + bn.eps)).mean() * p0, "3": p3}
        grads = torch.autograd.grad(_loss(reference, X, y), list(reference.parameters()))
        with torch.no_grad():
            for (name, p), g in zip(reference.named_parameters(), grads):
                scale = h.get(name.split(".")[0], 1.0)
                d = (g + 0.01 * p) / scale
                buffers[name] = d if step == 0 else 0.5 * buffers[name] + d
                p -= 0.1 * buffers[name]
        opt.step()
        # the reference ran two forward passes per step (running stats moved twice): undo by copying buffers
        reference.load_state_dict({**reference.state_dict(), **{k: v for k, v in model.state_dict().items()
                                                                 if "running" in k or "num_batches" in k}})
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-13)
    assert set(opt.block_scales()) == {"0", "3"}
    opt.remove_hooks()


def test_state_dict_round_trip_continues_identically():
    X, y = classification_data(n=8, d=3, classes=2)
    model = _model()
    opt = ScaleAmendedSGD(model, lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        _loss(model, X, y).backward()
        opt.step()
    clone = copy.deepcopy(model)
    with ScaleAmendedSGD(clone, lr=0.05, momentum=0.9) as restored:
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        assert restored.input_power == opt.input_power
        for o, m in ((opt, model), (restored, clone)):
            o.zero_grad()
            _loss(m, X, y).backward()
            o.step()
        for p, q in zip(model.parameters(), clone.parameters()):
            assert torch.equal(p, q)
    assert not restored._hooks


def test_without_batch_norm_and_plain_parameters():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    X, y = classification_data(n=6, d=3, classes=2)
    opt = ScaleAmendedSGD(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _loss(model, X, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert opt._batch_norm == {}
    # LayerNorm parameters (no block) take the plain SGD step
    assert torch.allclose(model[1].weight, before[2] - 0.1 * grads[2], atol=1e-15)
    h0 = ((X**2).sum(1) + 1).mean() / 4
    assert torch.allclose(model[0].weight, before[0] - 0.1 * grads[0] / h0, atol=1e-14)


def test_errors():
    model = _model()
    for kwargs, match in (({"lr": 0.0}, "lr"), ({"lr": 0.1, "momentum": 1.0}, "momentum"),
                          ({"lr": 0.1, "weight_decay": -1}, "weight_decay"), ({"lr": 0.1, "ema": 1.0}, "ema"),
                          ({"lr": 0.1, "batch_norm": {"0": "2"}}, "not a BatchNorm"),
                          ({"lr": 0.1, "batch_norm": {"1": "1"}}, "not one of"),
                          ({"lr": 0.1, "batch_norm": "yes"}, "batch_norm must")):
        with pytest.raises(ValueError, match=match):
            ScaleAmendedSGD(model, **kwargs)
    X, y = classification_data(n=8, d=3, classes=2)
    opt = ScaleAmendedSGD(model, lr=0.1)
    model.eval()
    _loss(model, X, y).backward()
    with pytest.raises(RuntimeError, match="train mode"):
        opt.step()


def test_parameters_instead_of_the_model_get_a_clear_message():
    from kfac_hessian.optim import ScaleAmendedSGD

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"takes the model itself.*not model.parameters\(\)"):
        ScaleAmendedSGD(model.parameters(), lr=0.1)
