"""Embeddings: diag(A) ⊗ G with A the token frequencies, against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.layers.embedding import embedding_bag_written_out

from ..conftest import batches
from ..references import EXACT, check_factor_spectra, dense_ggn, dense_hessian, rel_err


class _PerToken(nn.Module):
    """Embedding → linear head at every position, logits as (N, C, T)."""

    def __init__(self, vocab=6, dim=3, classes=2, padding_idx=None, max_norm=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx, max_norm=max_norm)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.embed(tokens)).transpose(1, 2)


def _tokens(n=5, t=4, vocab=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g), torch.randn(n, 2, t, generator=g)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_per_token_mse_block_is_exact(padding_idx):
    """Each position's output depends on its own token through a linear map: the block is exactly diag(A) ⊗ G."""
    model = _PerToken(padding_idx=padding_idx).double()
    tokens, target = _tokens()
    tokens[0, 0] = 0  # make sure the padding token occurs
    kfac = kh.compute_kfac(model, nn.MSELoss(), batches(tokens, target, [3, 2]))
    factor = kfac["embed"]
    H = dense_hessian(model, nn.MSELoss(), tokens, target, ["embed"])
    assert rel_err(factor.to_dense(), H) < 1e-10
    if padding_idx is not None:
        assert factor.A[padding_idx] == 0 and H[:3].abs().max() == 0
    counts = torch.bincount(tokens.flatten(), minlength=6).double() / tokens.numel()
    if padding_idx is not None:
        counts[padding_idx] = 0
    assert factor.a_is_diagonal and torch.allclose(factor.A, counts, atol=1e-15)


def test_spectra_matvec_and_round_trip(tmp_path):
    model = _PerToken(vocab=7, dim=4).double()
    tokens, _ = _tokens(n=6, t=5, vocab=7)
    labels = torch.randint(0, 2, (6, 5), generator=torch.Generator().manual_seed(2))
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens, labels))
    factor = kfac["embed"]
    dense = factor.to_dense()
    check_factor_spectra(factor, dense, k=5, atol=1e-13)
    eig = factor.eig()
    reference = torch.linalg.eigvalsh(dense).flip(0).clamp_min(0)
    # A's eigenvectors are the unit vectors of the tokens, most frequent first
    assert torch.equal(eig.a_vectors, torch.eye(7)[:, eig.a_order])
    pairs = eig.top_pairs(3)
    assert torch.equal(pairs.a_vectors, torch.eye(7)[eig.a_order[:1].repeat(3)]) or pairs.a_vectors.sum(1).eq(1).all()
    # the spectrum metrics work on it as on every block
    from kfac_hessian.analyses import spectral_metrics

    assert spectral_metrics(eig)["top_eigenvalue"] == pytest.approx(float(reference[0]), rel=1e-12)
    kfac.save(tmp_path / "k.pt")
    loaded = kh.KFAC.load(tmp_path / "k.pt")
    assert torch.equal(loaded["embed"].G, factor.G) and torch.equal(loaded["embed"].A, factor.A)
    assert ("embed: Kronecker G ⊗ diag(A), A diagonal (7,), G (4, 4) — approximation of the GGN block (Kronecker "
            "factorization); estimate: 1 random-sign draw per output position (5 positions), P=28") in kfac.summary()
    # "reduce" keeps embeddings on expand: their factors are identical
    reduced = kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens, labels), approx="reduce")
    assert torch.equal(reduced["embed"].A, factor.A)


def test_max_norm_embedding_is_skipped_with_reason():
    model = _PerToken(max_norm=1.0).double()
    tokens, target = _tokens()
    kfac = kh.compute_kfac(model, nn.MSELoss(), (tokens, target))
    assert "embed" in kfac.skipped and "max_norm" in kfac.skipped["embed"]
    assert "embed" not in kfac


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_written_out_equals_the_fused_op(mode):
    g = torch.Generator().manual_seed(0)
    for padding_idx in (None, 2):
        bag = nn.EmbeddingBag(6, 3, mode=mode, padding_idx=padding_idx).double()
        rows = torch.tensor([[1, 2, 2], [2, 2, 2], [0, 5, 3]])  # the second bag is all padding for padding_idx=2
        weights = torch.rand(3, 3, generator=g, dtype=torch.float64) if mode == "sum" else None
        assert torch.allclose(embedding_bag_written_out(bag, rows, None, weights),
                              bag(rows, per_sample_weights=weights), atol=1e-15)
        flat, offsets = torch.tensor([4, 2, 1, 1, 5, 0]), torch.tensor([0, 2, 2, 5])  # an empty bag
        weights = torch.rand(6, generator=g, dtype=torch.float64) if mode == "sum" else None
        assert torch.allclose(embedding_bag_written_out(bag, flat, offsets, weights),
                              bag(flat, offsets, per_sample_weights=weights), atol=1e-15)
    last = nn.EmbeddingBag(6, 3, mode=mode, include_last_offset=True).double()
    assert torch.allclose(embedding_bag_written_out(last, flat, torch.tensor([0, 2, 2, 6])),
                          last(flat, torch.tensor([0, 2, 2, 6])), atol=1e-15)


class _Bags(nn.Module):
    """A bag of token vectors (mean, padding left out) → tanh → linear head; ``written=True`` is the same function with
    an ``nn.Embedding`` and a masked mean, the reference that torch.func can differentiate twice."""

    def __init__(self, written: bool = False, mode: str = "mean"):
        super().__init__()
        torch.manual_seed(0)
        self.written = written
        self.bag = nn.Embedding(7, 3, padding_idx=0) if written else nn.EmbeddingBag(7, 3, mode=mode, padding_idx=0)
        self.head = nn.Linear(3, 4)

    def forward(self, tokens):
        if self.written:
            kept = (tokens != 0).unsqueeze(-1).to(self.bag.weight.dtype)
            bags = (self.bag(tokens) * kept).sum(1) / kept.sum(1).clamp(min=1)
        else:
            bags = self.bag(tokens)
        return self.head(torch.tanh(bags))


def test_embedding_bag_on_the_exact_path_and_in_compute_kfac():
    """``nn.EmbeddingBag`` has no double backward; the exact path runs it written out and equals the dense Hessian
    and GGN of the same model written with an ``nn.Embedding`` (weight block, and all parameters jointly: the mixed
    blocks with the head); compute_kfac gives its weight the exact per-sample GGN block."""
    model, twin = _Bags().double(), _Bags(written=True).double()
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    X, y = torch.randint(0, 7, (5, 3), generator=g), torch.randint(0, 4, (5,), generator=g)
    X[1] = 0  # a bag of padding alone
    data, loss_fn = batches(X, y, [3, 2]), nn.CrossEntropyLoss()
    all_layers = ["bag", "head"]
    for kind, reference in (("hessian", dense_hessian), ("ggn", dense_ggn)):
        for layer, layers in (("bag", ["bag"]), (None, all_layers)):
            exact = kh.layer_operator(model, loss_fn, data, layer, kind=kind).to_dense()
            assert rel_err(exact, reference(twin, loss_fn, X, y, layers)) < EXACT, (kind, layer)
    assert model.bag.forward.__func__ is nn.EmbeddingBag.forward  # the module's own forward is back
    kfac = kh.compute_kfac(model, loss_fn, data)
    assert rel_err(kfac["bag.weight"].to_dense(), dense_ggn(twin, loss_fn, X, y, ["bag"])) < EXACT
    with pytest.raises(NotImplementedError, match="mode='max'"):
        kh.layer_operator(_Bags(mode="max").double(), loss_fn, data, "bag").to_dense()
