"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN): the unrolled forward computes the fused function; every part of the
block equals the dense GGN block of its parameters for one sample and one step with a non-zero initial state;
every trainable parameter is covered; packed sequences count their active steps only; the model is left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import kfac_hessian as kh
from kfac_hessian.blocks import BlockDiagonal
from kfac_hessian.layers import recurrent
from kfac_hessian.layers.base import PassSettings
from kfac_hessian.layers.recurrent import RecurrentKind, RecurrentSums, parts_of, unrolled_forward

from ..references import EXACT, dense_ggn, rel_err

VARIANTS = {
    "lstm": (nn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=2)),
    "lstm_no_bias": (nn.LSTM, dict(bias=False)),
    "gru": (nn.GRU, dict(num_layers=2, bidirectional=True)),
    "gru_no_bias": (nn.GRU, dict(bias=False)),
    "rnn_relu": (nn.RNN, dict(num_layers=2, nonlinearity="relu", bidirectional=True)),
    "rnn_tanh": (nn.RNN, dict()),
}


def _recurrent(variant: str, batch_first: bool = True, hidden: int = 3) -> nn.RNNBase:
    torch.manual_seed(0)
    cls, options = VARIANTS[variant]
    return cls(3, hidden, batch_first=batch_first, **options).double()


def _initial_state(module: nn.RNNBase, n: int, seed: int = 5):
    """A non-zero initial state (with h0 = 0 the W_hh blocks of one step are zero and prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    layers = module.num_layers * (2 if module.bidirectional else 1)
    h0 = torch.randn(layers, n, module.proj_size or module.hidden_size, generator=g, dtype=torch.float64)
    if module.mode != "LSTM":
        return h0
    return h0, torch.randn(layers, n, module.hidden_size, generator=g, dtype=torch.float64)


class _Sequence(nn.Module):
    """The recurrent layer's output sequence, from a non-zero initial state, through a linear head (one step)."""

    def __init__(self, rnn: nn.RNNBase, n: int):
        super().__init__()
        self.rnn, self.state = rnn, _initial_state(rnn, n)
        self.head = nn.Linear((rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x):
        return self.head(self.rnn(x, self.state)[0][:, -1])


def _leaves(result) -> list[torch.Tensor]:
    output, state = result
    output = output.data if isinstance(output, PackedSequence) else output
    return [output, *(state if isinstance(state, tuple) else (state,))]


def _identity(part, output, *inputs, active=None):
    return output


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_unrolled_forward_computes_the_fused_function(variant, batch_first):
    module = _recurrent(variant, batch_first)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    state = _initial_state(module, 2)
    unbatched = x[0] if batch_first else x[:, 0]
    unbatched_state = tuple(s[:, 0] for s in state) if isinstance(state, tuple) else state[:, 0]
    packed = pack_padded_sequence(x, torch.tensor([3, 5]), batch_first=batch_first, enforce_sorted=False)
    cases = [(x,), (x, state), (unbatched,), (unbatched, unbatched_state), (packed,), (packed, state)]
    forward = unrolled_forward(module, _identity)
    with torch.no_grad():
        for args in cases:
            for expected, got in zip(_leaves(module(*args)), _leaves(forward(*args)), strict=True):
                assert expected.shape == got.shape
                assert torch.allclose(expected, got, rtol=0, atol=1e-14)


@pytest.mark.parametrize("variant", ["lstm", "gru", "rnn_relu", "lstm_no_bias"])
def test_one_sample_one_step_every_part_equals_the_dense_ggn_block(variant):
    model = _Sequence(_recurrent(variant, hidden=4), n=1)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(X) + torch.randn(1, model(X).shape[1], generator=g, dtype=torch.float64)
    kfac = kh.compute_kfac(model, nn.MSELoss(), (X, y))
    block = kfac["rnn"]
    assert isinstance(block, BlockDiagonal) and kfac.parameter_names["rnn"] == [
        f"rnn.{n}" for n, _ in model.rnn.named_parameters()]
    assert "approximation" in block.status and "independent time steps" in block.describe()
    dense = dense_ggn(model, nn.MSELoss(), X, y, ["rnn"])
    for part in parts_of(model.rnn):
        exact = dense[part.index][:, part.index]
        assert exact.norm() > 1e-8 and rel_err(block.parts[part.name].to_dense(), exact) < EXACT, part.name
    # the hidden-side weights see the non-zero initial state: their block is not trivially zero
    hidden = [i for i, (n, _) in enumerate(model.rnn.named_parameters()) if n == "weight_hh_l0"][0]
    sizes = [p.numel() for p in model.rnn.parameters()]
    start = sum(sizes[:hidden])
    w_hh = slice(start, start + sizes[hidden])
    assert dense[w_hh, w_hh].norm() > 1e-8 and rel_err(block.to_dense()[w_hh, w_hh], dense[w_hh, w_hh]) < EXACT


def test_lstm_factors_are_the_step_input_moments_and_the_bias_block():
    """A over ā = [x; h0; 1; 1] (b_ih and b_hh: the constant 1 twice); G = the dense GGN block of bias_hh (ā's last
    entry is 1), an independent reference for each factor."""
    torch.manual_seed(0)
    model = _Sequence(nn.LSTM(3, 3, batch_first=True).double(), n=1)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
    y = torch.randn(1, model(X).shape[1], generator=g, dtype=torch.float64)
    part = kh.compute_kfac(model, nn.MSELoss(), (X, y))["rnn"].parts["l0"]
    a = torch.cat([X[0, 0], model.state[0][0, 0], torch.ones(2, dtype=torch.float64)])
    assert rel_err(part.A, torch.outer(a, a)) < EXACT
    assert rel_err(part.G, dense_ggn(model, nn.MSELoss(), X, y, ["rnn.bias_hh_l0"])) < EXACT


class _Classifier(nn.Module):
    def __init__(self, rnn: nn.RNNBase, packed: bool = False):
        super().__init__()
        self.rnn, self.packed = rnn, packed
        self.head = nn.Linear((rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x, lengths=None):  # x (N, T, I): the samples on axis 0, as the data convention has them
        x = x if self.rnn.batch_first else x.transpose(0, 1)
        if lengths is not None:
            x = pack_padded_sequence(x, lengths, batch_first=self.rnn.batch_first, enforce_sorted=False)
        state = self.rnn(x)[1]
        h_n = (state[0] if isinstance(state, tuple) else state)[-(2 if self.rnn.bidirectional else 1):]
        return self.head(h_n.transpose(0, 1).reshape(h_n.shape[1], -1))


@pytest.mark.parametrize("variant", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_every_trainable_parameter_is_covered_and_the_model_left_unchanged(variant, batch_first):
    model = _Classifier(_recurrent(variant, batch_first)).double()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=g)
    before = model(X).detach()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert set(kfac.layer_names) == {"rnn", "head"}
    assert kfac.covered_trainable_params == kfac.trainable_params == sum(p.numel() for p in model.parameters())
    assert "forward" not in model.rnn.__dict__ and not model.rnn._forward_hooks and not model.rnn._forward_pre_hooks
    assert all(p.grad is None and torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert torch.equal(model(X), before)
    dense = kfac["rnn"].to_dense()
    assert torch.allclose(kfac["rnn"] @ torch.eye(len(dense), dtype=torch.float64), dense, atol=1e-14)


def test_packed_sequences_count_only_their_active_steps():
    """A batch of two packed sequences of lengths 5 and 2 gives the factors of the two sequences run unpadded, as two
    batches: padding adds no locations to A and no gradient to G (expand and reduce)."""
    model = _Classifier(_recurrent("lstm")).double()
    g = torch.Generator().manual_seed(6)
    X = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2,), generator=g)
    lengths = torch.tensor([5, 2])
    packed = ({"x": X, "lengths": lengths}, y)
    separate = [(X[:1], y[:1]), (X[1:, :2], y[1:])]
    for approx in ("expand", "reduce"):
        ours = kh.compute_kfac(model, nn.CrossEntropyLoss(), packed, approx=approx)["rnn"]
        reference = kh.compute_kfac(model, nn.CrossEntropyLoss(), separate, approx=approx)["rnn"]
        for name, part in ours.parts.items():
            assert rel_err(part.A, reference.parts[name].A) < EXACT, (approx, name)
            assert rel_err(part.G, reference.parts[name].G) < EXACT, (approx, name)


def test_block_state_and_eigen_structure_match_the_dense_matrix(tmp_path):
    model = _Classifier(_recurrent("rnn_relu")).double()
    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(3, 4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    block = kfac["rnn"]
    dense = block.to_dense()
    eig = block.eig()
    reference = torch.linalg.eigvalsh(dense).flip(0)
    assert torch.allclose(eig.eigenvalues, reference.clamp(min=0), atol=1e-12)
    values, vectors = eig.topk(5)
    assert torch.allclose(vectors @ dense @ vectors.T, torch.diag(values), atol=1e-12)
    assert torch.allclose(block.trace(), dense.trace())
    p = reference.clamp(min=0) / reference.clamp(min=0).sum()
    p = p[p > 0]
    assert eig.effective_rank() == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
    kfac.save(tmp_path / "kfac.pt")
    loaded = kh.KFAC.load(tmp_path / "kfac.pt")["rnn"]
    assert torch.equal(loaded.to_dense(), dense) and loaded.describe() == block.describe()


def test_a_variant_the_unrolled_forward_does_not_reproduce_is_skipped(monkeypatch):
    def wrong_step(module, x, h, c, weights, part, s, observe, mask):
        h, c = step(module, x, h, c, weights, part, s, observe, mask)
        return 1.5 * h, c

    step = recurrent._step
    monkeypatch.setattr(recurrent, "_step", wrong_step)
    model = _Classifier(_recurrent("lstm")).double()
    g = torch.Generator().manual_seed(8)
    X, y = torch.randn(3, 4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert "rnn" not in kfac and "differs from its fused forward" in kfac.skipped["rnn"]


def test_partly_frozen_recurrent_layer_is_skipped_with_the_reason():
    model = _Classifier(_recurrent("gru")).double()
    model.rnn.bias_hh_l0.requires_grad_(False)
    X, y = torch.randn(3, 4, 3, dtype=torch.float64), torch.randint(0, 3, (3,))
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    assert "rnn" not in kfac and "freeze all or none" in kfac.skipped["rnn"]


def test_accumulator_parts_follow_the_public_parameter_order():
    module = _recurrent("lstm")
    sums = RecurrentSums("rnn", module, PassSettings("expand", torch.float64, torch.device("cpu")))
    assert RecurrentKind().claims(module) and sums.hooked_module() is sums.observer
    assert [p.name for p in sums.parts] == ["l0", "l0.projection", "l0_reverse", "l0_reverse.projection", "l1",
                                           "l1.projection", "l1_reverse", "l1_reverse.projection"]
    positions = torch.cat([p.index for p in sums.parts]).sort().values
    assert torch.equal(positions, torch.arange(sum(p.numel() for p in module.parameters())))
