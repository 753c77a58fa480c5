"""Eigendecompositions of many small PSD matrices at once against ``torch.linalg.eigh`` in float64: batched by size,
every key its own result, eigenvalues descending and clamped at zero."""

from __future__ import annotations

import pytest
import torch

from kfac_hessian.blocks.decomposition import decompose

from ..conftest import psd


def _matrices() -> dict:
    """Keys of three sizes, two of them sharing a size (one batched call), one large enough for the tridiagonal
    path of the values-only decomposition, and a rank-deficient one."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 2, generator=g, dtype=torch.float64)  # rank 2 of 6
    return {("a", 0): psd(5, 2, seed=1), ("b", 0): psd(5, 3, seed=2), ("b", 1): psd(40, 1, seed=3),
            ("c", 0): x @ x.transpose(1, 2)}


@pytest.mark.parametrize("vectors", [True, False])
def test_every_key_gets_the_eigendecomposition_of_its_matrices(vectors):
    matrices = _matrices()
    results = decompose(matrices, vectors)
    assert list(results) == list(matrices)
    for key, m in matrices.items():
        values, vecs, reports, forms = results[key]
        expected = torch.linalg.eigvalsh(m).flip(-1).clamp_min(0)
        assert values.shape == m.shape[:2] and len(reports) == len(forms) == len(m)
        assert torch.allclose(values, expected, atol=1e-12 * float(expected.max()))
        assert (values >= 0).all() and (values[:, :-1] >= values[:, 1:]).all()  # clamped, descending
        assert all(r.count == 0 or r.most_negative < 0 for r in reports)
        if vectors:
            assert torch.allclose(vecs.transpose(1, 2) @ vecs, torch.eye(m.shape[-1], dtype=m.dtype), atol=1e-12)
            assert torch.allclose(vecs @ torch.diag_embed(values) @ vecs.transpose(1, 2), m, atol=1e-12)
        else:
            assert vecs is None


def test_values_only_keeps_the_tridiagonal_form_of_a_large_single_matrix():
    results = decompose(_matrices(), vectors=False)
    (form,) = results[("b", 1)][3]
    assert form is not None
    leading = form.leading_vectors(3)
    m = _matrices()[("b", 1)][0]
    assert torch.allclose(m @ leading, leading * results[("b", 1)][0][0, :3], atol=1e-12)
    assert all(f is None for f in results[("a", 0)][3])  # batches and small matrices: torch's eigvalsh, no form
