from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.analyses import SpectrumTracker, count_outliers, eigenspace_overlap, spectral_metrics

from ..conftest import batches, classification_data, mlp
from ..references import dense_ggn, dense_hessian


def _dense_metrics(H: torch.Tensor, k: int) -> dict:
    values = torch.linalg.eigvalsh(H).flip(0).clamp_min(0)
    p = values[values > 0] / values.sum()
    searched = values[values > 1e-8 * values[0]][:51]  # the widest ratio among the top 50, written out
    return {
        "top_eigenvalue": float(values[0]),
        "trace": float(values.sum()),
        "effective_rank": math.exp(float(-(p * p.log()).sum())),
        "stable_rank": float(values.sum() / values[0]),
        # λ₁/λ_k' over the top k above round-off (P·ε·λ₁): a singular block's round-off eigenvalues are left out
        "top_k_condition": float(values[0] / values[:k][values[:k] > len(values) * torch.finfo(H.dtype).eps
                                                        * values[0]][-1]),
        "outliers": count_outliers(values),
        "outlier_gap_ratio": float((searched[:-1] / searched[1:]).max()),
    }


def test_metrics_equal_the_dense_spectrum():
    model = mlp(nn.Tanh, widths=(5, 6, 4))
    X, y = classification_data(n=20, d=5, classes=4)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    for name, factor in kfac.items():
        ours = spectral_metrics(factor.eig(vectors=False), top_k=7)
        reference = _dense_metrics(factor.to_dense(), 7)
        for key, value in reference.items():
            assert ours[key] == pytest.approx(value, rel=1e-9), (name, key)


def _train(tracker_every: int | None, steps: int = 6):
    model = mlp(nn.ReLU, widths=(5, 4, 3), seed=1)
    X, y = classification_data(n=12, d=5, classes=3)
    data = batches(X, y, [6, 6])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = SpectrumTracker(model, nn.CrossEntropyLoss(), data, every=tracker_every or 1, curvature="mc")
    torch.manual_seed(0)
    for step in range(steps):
        xb, yb = data[step % 2]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb + 0.01 * torch.randn_like(xb)), yb)
        loss.backward()
        if tracker_every:
            tracker(step, train_loss=loss.item())
        opt.step()
    return model, opt, tracker


def test_tracker_leaves_training_untouched_and_records_rows(tmp_path):
    plain_model, plain_opt, _ = _train(None)
    model, opt, tracker = _train(2)
    for p, q in zip(plain_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert str(plain_opt.state_dict()) == str(opt.state_dict())
    assert model.training
    assert [r["step"] for r in tracker.records] == [0, 0, 2, 2, 4, 4]
    assert {r["layer"] for r in tracker.records} == {"0", "2"}
    assert all(r["seconds"] >= r["factor_seconds"] > 0 and "train_loss" in r for r in tracker.records)
    with (tracker.to_csv(tmp_path / "t.csv")).open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and float(rows[0]["trace"]) == pytest.approx(tracker.records[0]["trace"], rel=1e-12)
    assert json.loads(tracker.to_json(tmp_path / "t.json").read_text())[3]["layer"] == tracker.records[3]["layer"]
    pytest.importorskip("matplotlib")
    assert tracker.plot(tmp_path / "t.png").stat().st_size > 0


def test_hutchinson_check_matches_the_exact_trace():
    model = mlp(nn.Tanh, widths=(4, 3, 2))
    X, y = classification_data(n=10, d=4, classes=2)
    tracker = SpectrumTracker(model, nn.CrossEntropyLoss(), (X, y), curvature="ggn", hutchinson_probes=400)
    rows = tracker.record(0)
    for row in rows:
        exact = torch.trace(dense_ggn(model, nn.CrossEntropyLoss(), X, y, [row["layer"]])).item()
        assert abs(row["exact_trace"] - exact) <= 5 * row["exact_trace_stderr"] + 1e-12
    assert tracker(3) is None and len(tracker.records) == 2


def test_exact_top_k_beside_the_kronecker_one():
    """With exact_top_k, every row carries the block's top-k, the exact block's (Lanczos) and their
    overlap: against eigh of the dense float64 Hessian block (torch.func) and of G ⊗ A."""
    model, loss_fn = mlp(nn.Tanh, widths=(4, 3, 2)), nn.CrossEntropyLoss()
    X, y = classification_data(n=10, d=4, classes=2)
    tracker = SpectrumTracker(model, loss_fn, (X, y), curvature="ggn", exact_top_k=3, exact_kind="hessian",
                              exact_tol=1e-10)
    kfac = kh.compute_kfac(model, loss_fn, (X, y), curvature="ggn")
    for row in tracker.record(0):
        exact_values, exact_vectors = torch.linalg.eigh(dense_hessian(model, loss_fn, X, y, [row["layer"]]))
        assert row["exact_top_eigenvalues"] == pytest.approx(exact_values.flip(0)[:3].tolist(), rel=1e-8)
        assert row["exact_top_eigenvalue"] == pytest.approx(float(exact_values[-1]), rel=1e-8)
        block = kfac[row["layer"]].to_dense()
        assert row["top_eigenvalues"] == pytest.approx(torch.linalg.eigvalsh(block).flip(0)[:3].tolist(), rel=1e-9)
        vectors = kfac[row["layer"]].eig().topk(3)[1]
        reference = eigenspace_overlap(vectors, exact_vectors.flip(1)[:, :3].T)
        assert row["top_k_overlap"] == pytest.approx(reference, abs=1e-8) and row["exact_converged"]
    assert "exact_top_eigenvalue" not in SpectrumTracker(model, loss_fn, (X, y)).record(0)[0]


def test_tracker_errors():
    model = mlp(nn.Tanh, widths=(4, 3, 2))
    X, y = classification_data(n=10, d=4, classes=2)
    for kwargs, match in (({"every": 0}, "every"), ({"top_k": 0}, "top_k"), ({"hutchinson_probes": -1}, "hutchinson"),
                          ({"exact_top_k": -1}, "exact_top_k")):
        with pytest.raises(ValueError, match=match):
            SpectrumTracker(model, nn.CrossEntropyLoss(), (X, y), **kwargs)
    with pytest.raises(ValueError, match="one-shot"):
        SpectrumTracker(model, nn.CrossEntropyLoss(), iter([(X, y)]))
    with pytest.raises(ValueError, match="nothing recorded"):
        SpectrumTracker(model, nn.CrossEntropyLoss(), (X, y)).plot("x.png")


def test_normalization_and_embedding_layers_are_tracked_too():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.norm, self.head = nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 3)

        def forward(self, tokens):
            return self.head(self.norm(self.embed(tokens))).transpose(1, 2)

    model = Net().double()
    tokens = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (5, 3), generator=torch.Generator().manual_seed(2))
    tracker = SpectrumTracker(model, nn.CrossEntropyLoss(), (tokens, labels), curvature="ggn")
    rows = {r["layer"]: r for r in tracker.record(0)}
    assert set(rows) == {"embed", "norm", "head"}
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (tokens, labels))
    for name in ("embed", "norm"):
        factor = kfac[name]
        reference = _dense_metrics(factor.to_dense(), min(10, factor.num_params))
        for key, value in reference.items():
            assert rows[name][key] == pytest.approx(value, rel=1e-9), (name, key)


def test_top_k_condition_leaves_out_round_off_eigenvalues():
    # a cross-entropy G has the null direction 1 (softmax gradients sum to zero): G ⊗ A is singular, and the smallest
    # computed eigenvalues of the block are round-off, whose ratio to λ₁ says nothing about the network
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 4)).double()
    X, y = torch.randn(50, 3, dtype=torch.float64), torch.randint(0, 4, (50,))
    block = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64)["2"]
    dense = torch.linalg.eigvalsh(block.to_dense()).flip(0)  # independent: the formed (12, 12) matrix
    rank = 3 * 3  # rank(G) = C − 1 = 3 times rank(A) = 3 (2 hidden units + bias)
    assert float(dense[rank - 1]) > 1e-6 * float(dense[0]) and abs(float(dense[rank])) < 1e-12 * float(dense[0])
    metrics = spectral_metrics(block.eig(), top_k=12)
    assert metrics["top_k_condition"] == pytest.approx(float(dense[0] / dense[rank - 1]), rel=1e-8)
