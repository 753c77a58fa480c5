"""EKFAC: the Kronecker eigenbasis with the exact second moments of the per-sample gradients as eigenvalues —
``Λ = diag(Qᵀ H Q)`` for the dense float64 GGN block ``H`` and ``Q`` the Kronecker eigenbasis, on every Kronecker
kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.blocks import EKFACBlock, KroneckerBlock

from ..conftest import KroneckerKinds as _Kinds
from ..conftest import TinyCNN, batches, classification_data, mlp
from ..references import check_factor_spectra, dense_ggn, rel_err


def _basis(block: KroneckerBlock) -> torch.Tensor:
    """The Kronecker eigenvectors of ``block`` as columns in public order (all ``P`` of them, from ``topk``)."""
    return block.eig(vectors=True).topk(block.num_params)[1].T


def _check(model, loss_fn, X, y, names, **options):
    kfac = kh.compute_kfac(model, loss_fn, batches(X, y, [len(X) - len(X) // 3, len(X) // 3]), **options)
    ekfac = kh.compute_ekfac(model, loss_fn, batches(X, y, [len(X) - len(X) // 3, len(X) // 3]), kfac=kfac,
                             per_position=options.get("per_position", False))
    for name in names:
        block = ekfac[name]
        assert isinstance(block, EKFACBlock), name
        H = dense_ggn(model, loss_fn, X, y, kfac.parameter_names[name])
        Q = _basis(kfac[name])
        assert torch.allclose(Q.T @ Q, torch.eye(len(Q)), atol=1e-10)
        dense = block.to_dense()
        # Λ = diag(Qᵀ H Q): the block is Q diag(Qᵀ H Q) Qᵀ
        assert rel_err(dense, Q @ torch.diag((Q.T @ H @ Q).diagonal()) @ Q.T) < 1e-10, name
        assert abs(float(block.trace()) - float(torch.trace(H))) <= 1e-10 * float(torch.trace(H)), name
        # the best approximation diagonal in the Kronecker basis: never further from H than KFAC's
        assert float((dense - H).norm()) <= float((kfac[name].to_dense() - H).norm()) * (1 + 1e-12)
        check_factor_spectra(block, dense)
    return kfac, ekfac


def test_mlp_and_cnn_blocks():
    X, y = classification_data(n=9)
    _check(mlp(nn.Tanh), nn.CrossEntropyLoss(), X, y, ["0", "2"])
    g = torch.Generator().manual_seed(1)
    Xc, yc = torch.randn(7, 2, 4, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    kfac, ekfac = _check(TinyCNN(), nn.CrossEntropyLoss(), Xc, yc, ["conv1", "conv2", "fc"])
    # more locations than the layer's width and outputs: the per-sample gradients are rotated after the sum over them
    narrow = nn.Sequential(nn.Conv1d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(14, 3))
    _check(narrow.double(), nn.CrossEntropyLoss(), torch.randn(6, 1, 8, generator=g, dtype=torch.float64),
           torch.randint(0, 3, (6,), generator=g), ["0"])
    # every EKFAC eigenvalue is a Rayleigh quotient qᵀ H q of the exact block, so none exceeds λ_max(H) — with weight
    # sharing the Kronecker eigenvalues need not obey that bound
    for name in ["conv1", "conv2"]:
        H = dense_ggn(TinyCNN(), nn.CrossEntropyLoss(), Xc, yc, kfac.parameter_names[name])
        exact = torch.linalg.eigvalsh(H)
        values = ekfac[name].eig().eigenvalues
        assert float(values[0]) <= float(exact[-1]) * (1 + 1e-12) and float(values[-1]) >= -1e-15, name


def test_every_kronecker_kind_with_per_position_columns():
    """Several output positions: with per-position columns the per-sample gradients are the exact GGN's."""
    g = torch.Generator().manual_seed(3)
    tokens, labels = torch.randint(0, 6, (5, 3), generator=g), torch.randint(0, 3, (5, 3), generator=g)
    tokens[0, 0] = 0  # the padding token occurs
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        _check(_Kinds().double().eval(), nn.CrossEntropyLoss(), tokens, labels, ["embed", "attn", "conv", "proj"],
               per_position=True)


def test_other_blocks_are_kept_and_the_result_behaves_like_kfac(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = classification_data(n=10)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    ekfac = kh.compute_ekfac(model, nn.CrossEntropyLoss(), (X, y), kfac=kfac)
    assert ekfac["1"] is kfac["1"] and ekfac.layer_names == kfac.layer_names
    assert "EKFAC: the Kronecker eigenbasis V ⊗ U" in ekfac.summary()
    ekfac.save(tmp_path / "e.pt")
    loaded = kh.KFAC.load(tmp_path / "e.pt")
    assert torch.equal(loaded["0"].values, ekfac["0"].values)
    rows = kh.overlap_by_layer(kfac.eig(), ekfac.eig(), k=3)  # Kronecker and EKFAC eigenvectors: factor form
    assert all(0 <= r["overlap"] <= 1 + 1e-12 for r in rows)
    same = kh.compute_ekfac(model, nn.CrossEntropyLoss(), (X, y))  # computes its own KFAC
    assert torch.allclose(same["0"].values, ekfac["0"].values, atol=1e-14)
    with pytest.raises(ValueError, match="configure compute_kfac"):
        kh.compute_ekfac(model, nn.CrossEntropyLoss(), (X, y), kfac=kfac, approx="reduce")


class _CrossAttention(nn.Module):
    """A decoder layer whose cross-attention block is a ``BlockDiagonal`` (kept by EKFAC) and whose ``out_proj`` is a
    Linear called as a module only while the attention kind reroutes the forward."""

    def __init__(self):
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.dec(x[:, :2], x[:, 2:]).mean(1))


def test_cross_attention_models_get_ekfac_blocks_of_the_layers_their_attention_routes():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(6, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    model = _CrossAttention().double().eval()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        kfac, ekfac = _check(model, nn.CrossEntropyLoss(), X, y, ["dec.multihead_attn.out_proj", "head"])
    kept = ekfac["dec.multihead_attn"]
    assert kept is kfac["dec.multihead_attn"]  # the cross-attention in-projection's block is kept as it is


def test_the_eigendecompositions_report_progress_with_the_pass(monkeypatch, capsys):
    import sys

    import kfac_hessian.blocks.base as base

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # plain lines
    monkeypatch.setattr(base, "EIG_COST_WORTH_A_BAR", 0)
    model = mlp(widths=(5,) * (base.EIG_BLOCKS_WORTH_A_BAR + 1)).double()  # 8 Kronecker layers
    X, y = classification_data(n=4, d=5, classes=5)
    quiet = kh.compute_ekfac(model, nn.CrossEntropyLoss(), (X.double(), y), curvature="mc", seed=0)
    assert capsys.readouterr().err == ""
    reported = kh.compute_ekfac(model, nn.CrossEntropyLoss(), (X.double(), y), curvature="mc", seed=0, progress=True)
    err = capsys.readouterr().err
    assert "eigendecompositions of 8 blocks: 8/8 block" in err and "KFAC (mc)" in err
    for name, block in quiet.items():  # the same computation, reported (torch's batched eigh of fewer matrices at a
        # time: equal to round-off)
        assert torch.allclose(reported[name].values, block.values, rtol=0, atol=1e-12 * float(block.values.max()))
