"""The validation report's numbers equal values recomputed from the dense matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn

import kfac_hessian as kh
from kfac_hessian.analyses import eigenspace_overlap
from kfac_hessian.analyses.report import compare

from ..conftest import batches, classification_data, mlp


@pytest.mark.parametrize("dense_limit", [5000, 0])
def test_report_matches_dense_recomputation(dense_limit, tmp_path):
    model = mlp(nn.Tanh, widths=(5, 6, 3))
    X, y = classification_data(n=30)
    data = batches(X, y, [16, 14])
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), data)
    report = compare(kfac, model, nn.CrossEntropyLoss(), data, k=4, dense_limit=dense_limit)
    for row in report.rows:
        f = kfac[row["layer"]]
        assert row["block"] == f.describe() and "approximation of the GGN block" in row["block"]  # what it is
        H = kh.layer_operator(model, nn.CrossEntropyLoss(), data, row["layer"]).to_dense()
        exact_vals, exact_vecs = torch.linalg.eigh(H)
        exact_vals, exact_vecs = exact_vals.flip(0)[:4], exact_vecs.flip(1)[:, :4].T
        k_vals, k_vecs = f.eig().topk(4)
        rel = ((k_vals - exact_vals).abs() / exact_vals.abs()).numpy()
        assert row["max_eig_rel_err"] == pytest.approx(rel.max(), rel=1e-5)
        assert abs(row["exact_trace"] - float(torch.trace(H))) <= max(4 * row["exact_trace_stderr"],
                                                                      1e-12 * abs(row["exact_trace"]))
        assert row["trace_ratio"] == pytest.approx(float(f.trace()) / row["exact_trace"], rel=1e-12)
        if dense_limit:
            assert row["overlap"] == pytest.approx(eigenspace_overlap(k_vecs, exact_vecs), abs=1e-9)
            assert row["frobenius_rel_err"] == pytest.approx(float((f.to_dense() - H).norm() / H.norm()), rel=1e-9)
            all_k = f.eig().eigenvalues.numpy()
            all_e = torch.linalg.eigvalsh(H).numpy()
            top = max(all_k.max(), all_e.max())
            w1 = wasserstein_distance(np.log10(np.maximum(all_k, 1e-10 * top)),
                                      np.log10(np.maximum(all_e, 1e-10 * top)))
            assert row["log_spectrum_w1"] == pytest.approx(w1, rel=1e-6)
            positive = np.sort(all_e)[::-1]
            positive = positive[positive > 1e-8 * positive[0]][:51]  # the widest gap among the top 50, by hand
            assert row["outlier_gap_ratio_exact"] == pytest.approx((positive[:-1] / positive[1:]).max(), rel=1e-9)
        else:
            assert row["exact"] == "lanczos+slq" and row["overlap"] == pytest.approx(
                eigenspace_overlap(k_vecs, exact_vecs), abs=1e-4)
    assert "| layer |" in report.to_markdown()
    path = tmp_path / "r.json"
    report.to_json(path)
    assert json.loads(path.read_text())["layers"][0]["layer"] == "0"


def test_further_approximations_against_the_same_exact_blocks():
    """``also=``: EKFAC and the Kronecker fit measured beside KFAC, each column recomputed from the dense GGN block —
    on a ReLU network (layer block = GGN block) with one output position, where EKFAC's trace is the exact one."""
    model = mlp(nn.ReLU, widths=(5, 6, 3)).double()
    X, y = classification_data(n=30)
    X = X.double()
    loss_fn = nn.CrossEntropyLoss()
    kfac = kh.compute_kfac(model, loss_fn, (X, y))
    also = {"ekfac": kh.compute_ekfac(model, loss_fn, (X, y), kfac=kfac),
            "fit": kh.compute_kronecker_fit(model, loss_fn, (X, y), kfac=kfac, iterations=20, tol=1e-8)}
    report = compare(kfac, model, loss_fn, (X, y), k=4, kind="ggn", also=also)
    for row in report.rows:
        H = kh.layer_operator(model, loss_fn, (X, y), row["layer"], kind="ggn").to_dense()
        exact_vals, exact_vecs = torch.linalg.eigh(H)
        exact_vals, exact_vecs = exact_vals.flip(0)[:4], exact_vecs.flip(1)[:, :4].T
        for label, approximation in also.items():
            block = approximation[row["layer"]]
            vals, vecs = block.eig().topk(4)
            assert row[f"{label}_max_eig_rel_err"] == pytest.approx(
                float(((vals - exact_vals).abs() / exact_vals).max()), rel=1e-9)
            assert row[f"{label}_overlap"] == pytest.approx(eigenspace_overlap(vecs, exact_vecs), abs=1e-9)
            assert row[f"{label}_frobenius_rel_err"] == pytest.approx(
                float((block.to_dense() - H).norm() / H.norm()), rel=1e-9)
            assert row[f"{label}_frobenius_rel_err"] <= row["frobenius_rel_err"] * (1 + 1e-12)  # both never worse
        assert row["ekfac_trace_ratio"] == pytest.approx(1.0, abs=1e-10)
    table = report.to_markdown()
    assert "ekfac_overlap" in table.splitlines()[0] and "fit_frobenius_rel_err" in table
    assert "for ekfac" in table and report.settings["also"] == ["ekfac", "fit"]


@pytest.mark.parametrize("activation, zero", [(nn.ReLU, True), (nn.Tanh, False)])
@pytest.mark.parametrize("dense_limit", [5000, 0])
def test_gauss_newton_residual(activation, zero, dense_limit):
    model = mlp(activation, widths=(5, 6, 3))
    X, y = classification_data(n=30)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    report = kh.compare(kfac, model, nn.CrossEntropyLoss(), (X, y), k=3, dense_limit=dense_limit,
                        gauss_newton_residual=True)
    row = report.rows[0]
    H = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "0").to_dense()
    GGN = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "0", kind="ggn").to_dense()
    share = float(torch.trace(H - GGN) / torch.trace(H))
    if dense_limit:
        assert row["residual_frobenius"] == pytest.approx(float((H - GGN).norm() / H.norm()), abs=1e-12)
        assert row["residual_trace_share"] == pytest.approx(share, abs=1e-12)
    else:  # Hutchinson: within 4 standard errors (exact when the residual vanishes)
        assert abs(row["residual_trace"] - float(torch.trace(H - GGN))) <= 4 * row["residual_trace_stderr"] + 1e-12
    assert (abs(row["residual_trace_share"]) < 1e-10) == zero


def test_one_rule_for_k_strict_json_and_a_short_repr():
    model = mlp(nn.Tanh, widths=(5, 2, 3))  # layer "2": P = 9
    X, y = classification_data(n=12)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))
    report = compare(kfac, model, nn.CrossEntropyLoss(), (X, y), k=10**6, dense_limit=0)
    assert [row["k"] for row in report.rows] == [12, 9]  # at most k: all P of each block
    values, vectors = kfac["2"].eig().topk(10**6)  # the same rule
    assert values.shape == (9,) and vectors.shape == (9, 9)
    with pytest.raises(ValueError, match="positive integer"):
        compare(kfac, model, nn.CrossEntropyLoss(), (X, y), k=0)
    text = report.to_json()
    assert "NaN" not in text and json.loads(text)["layers"][0]["frobenius_rel_err"] is None  # Lanczos layers
    assert repr(report) == ("ValidationReport(layers=[0, 2], settings={'k': 1000000, 'kind': 'hessian', "
                            "'curvature': 'ggn', 'approx': 'expand', 'dense_limit': 0})")
