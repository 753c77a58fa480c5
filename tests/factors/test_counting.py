"""Parameter counts: every parameter counted once, at its first use — also when modules share it (weight tying) —
and who shares what."""

from __future__ import annotations

import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.factors.counting import parameter_counts, tied_parameters

from ..conftest import classification_data


class _TiedLM(nn.Module):
    """Embedding, LayerNorm and an output head whose weight is the embedding's (logits ``(N, T, V)``)."""

    def __init__(self, vocab: int = 7, dim: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.ln, self.head = nn.Embedding(vocab, dim), nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.ln(self.emb(tokens)))


def test_a_tied_parameter_is_counted_at_its_first_use():
    model = _TiedLM().double()
    modules = dict(model.named_modules())
    assert tied_parameters(modules) == {"head": ["weight is emb.weight"]}
    names = {"emb": ["emb.weight"], "ln": ["ln.weight", "ln.bias"], "head": ["head.weight"]}
    counted = parameter_counts(model, names, {})
    counts, total = counted.counts, counted.total
    vocab, dim = model.emb.weight.shape
    assert counts == {"emb": vocab * dim, "ln": 2 * dim, "head": 0} and total == vocab * dim + 2 * dim
    assert total == sum(p.numel() for p in model.parameters())  # torch counts a shared parameter once too
    # the other way round the head comes first and counts the shared weight
    counts = parameter_counts(model, {"head": ["head.weight"], "emb": ["emb.weight"]}, {"ln": "not selected"}).counts
    assert counts == {"head": vocab * dim, "emb": 0, "ln": 2 * dim}


def test_skipped_modules_and_parameters_are_counted_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 3))
    counted = parameter_counts(model, {"0": ["0.weight", "0.bias"]}, {"1.weight": "a parameter", "2": "a module"})
    sizes = [sum(p.numel() for p in module.parameters()) for module in model]
    assert counted.counts == {"0": sizes[0], "1.weight": sizes[1], "2": sizes[2]} and counted.tied == {}
    assert counted.total == counted.trainable == sum(sizes) and counted.covered_trainable == sizes[0]


def test_coverage_is_a_share_of_the_trainable_parameters_and_frozen_entries_are_listed_apart():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    for p in [*model[0].parameters(), *model[2].parameters()]:
        p.requires_grad_(False)  # a fine-tuning setting: the first layers frozen
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), classification_data())
    frozen, trainable = 24 + 15, 12
    assert kfac.total_params == frozen + trainable and kfac.trainable_params == kfac.covered_trainable_params == 12
    summary = kfac.summary()
    assert f"covered 12 of 12 trainable parameters (100.0 %); {frozen} frozen parameters apart" in summary
    assert "frozen (requires_grad=False; name them in layers= to include them): 0, 2" in summary


def test_the_result_reports_the_counts():
    model = _TiedLM().double()
    tokens = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens, tokens), output=kh.sequence_logits)
    unique = sum(p.numel() for p in model.parameters())
    assert kfac.tied == {"head": ["weight is emb.weight"]} and kfac.counts["head"] == 0
    assert kfac.total_params == kfac.covered_params() == unique
    assert (f"covered {unique} of {unique} trainable parameters (100.0 %), tied parameters counted once"
            in kfac.summary())
    assert "head: Kronecker" in kfac.summary() and "(tied: weight is emb.weight)" in kfac.summary()
