"""The exact-path-at-scale benchmark's measurements on a tiny GPT-2 config (float64): the exact top-5 by Lanczos, and
each approximation's λ₁ ratio, top-5 overlap and relative product error, against a dense float64 GGN block formed
with torch.func and the approximations' own dense matrices."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import kfac_hessian as kh
from benchmarks.scale import batch
from benchmarks.scale_exact import (
    K,
    against_exact,
    approximations,
    block_name,
    exact_operator,
    exact_top,
    render,
    tiny_gpt2,
)

from ..references import dense_ggn


@pytest.fixture(scope="module")
def tiny():
    model = tiny_gpt2().double()
    return model, batch(model, 4), nn.CrossEntropyLoss(), block_name(model)


@pytest.fixture(scope="module")
def reference(tiny):
    """The dense GGN block ``Jᵀ Λ J`` (torch.func, math attention kernel) and its top-K pairs, rows descending."""
    model, (inputs, targets), loss_fn, name = tiny
    with sdpa_kernel([SDPBackend.MATH]):
        ggn = dense_ggn(model, loss_fn, inputs, targets, [name], output=kh.sequence_logits)
    values, vectors = torch.linalg.eigh(ggn)
    return ggn, values.flip(0)[:K], vectors.flip(1)[:, :K].T


@pytest.fixture(scope="module")
def measured(tiny):
    model, data, loss_fn, name = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exact path switches attention kernels; the fit warns of its iterations
        top, summary = exact_top(exact_operator(model, loss_fn, data, name, "ggn"))
        found = approximations(model, loss_fn, data, name, column_signs=2)
    return top, summary, found


def test_the_block_is_the_last_layers_in_projection_with_its_bias(tiny, reference):
    model, _, _, name = tiny
    assert name == "transformer.h.1.attn.c_attn"
    assert reference[0].shape == (17 * 48, 17 * 48)  # (16 + 1) inputs → 3·16 outputs


def test_exact_top_is_the_dense_ggn_blocks_top(measured, reference):
    top, summary, _ = measured
    _, values, vectors = reference
    assert summary["method"] == "block-lanczos" and summary["converged"]  # P = 816 > the dense limit
    assert summary["products"] == top.n_matvecs > 0
    assert torch.allclose(top.eigenvalues, values, rtol=1e-8)
    assert torch.allclose((top.eigenvectors @ vectors.T).abs(), torch.eye(K, dtype=values.dtype), atol=1e-5)


def test_approximations_are_measured_as_from_their_dense_matrices(measured, reference):
    top, _, found = measured
    ggn, values, vectors = reference
    blocks = {label: entry["block"] for label, entry in found.items() if "block" in entry}
    assert set(blocks) == {"KFAC mc", "KFAC ggn, column_signs=2", "EKFAC (mc)", "Kronecker fit (mc)"}
    for label, block in blocks.items():
        result = against_exact(block, *top.topk(K))
        dense = block.to_dense()
        approx_values, approx_vectors = torch.linalg.eigh(dense)
        approx_values, approx_vectors = approx_values.flip(0)[:K], approx_vectors.flip(1)[:, :K]
        errors = (dense @ vectors.T - ggn @ vectors.T).norm(dim=0) / (ggn @ vectors.T).norm(dim=0)
        assert result["lambda1_ratio"] == pytest.approx(float(approx_values[0] / values[0]), rel=1e-8), label
        assert torch.allclose(torch.tensor(result["eigenvalues"], dtype=values.dtype), approx_values, rtol=1e-8)
        assert result["overlap"] == pytest.approx(float((vectors @ approx_vectors).pow(2).sum() / K), abs=1e-6), label
        assert torch.allclose(torch.tensor(result["relative_errors"], dtype=values.dtype), errors, rtol=1e-5), label
        assert result["orthonormality"] < 1e-10, label


def test_the_results_file_states_the_question_and_every_number(measured, tiny):
    top, summary, found = measured
    versus = {label: against_exact(entry["block"], *top.topk(K)) for label, entry in found.items() if "block" in entry}
    text = render({"command": "python -m benchmarks.scale_exact --quick", "block": tiny[3], "parameters": 1,
                   "block_parameters": 816, "tokens": 8, "machine": {"processor": "cpu", "cpus": 2, "threads": 1,
                                                                      "torch": "2", "load_start": [1.0, 1.0, 1.0]},
                   "exact": {"ggn": summary}, "versus": {"ggn": versus},
                   "approximations": {label: {k: v for k, v in entry.items() if k != "block"}
                                      for label, entry in found.items()}})
    assert "LAYER block" in text and "not" in text and "whole-model" in text
    for label, row in versus.items():
        assert f"| {label} | {row['lambda1_ratio']:.3g} |" in text
    assert f"**{summary['products']} products**" in text
