"""Lanczos against eigvalsh of the dense matrix and scipy's eigsh; multiplicities come out in full."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

import kfac_hessian as kh

from ..conftest import batches, classification_data, mlp, regression_data


class Dense:
    """A symmetric matrix with the operator interface."""

    def __init__(self, matrix):
        self.matrix, self.shape, self.dtype, self.device = matrix, matrix.shape, matrix.dtype, matrix.device

    def __matmul__(self, x):
        return self.matrix @ x


@pytest.fixture(scope="module")
def hessian_op():
    model = mlp(nn.Tanh, widths=(6, 8, 3))
    X, y = classification_data(n=20, d=6)
    return kh.layer_operator(model, nn.CrossEntropyLoss(), batches(X, y, [8, 8, 4]), "0")


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_matches_eigvalsh(hessian_op, which):
    dense = hessian_op.to_dense()
    exact = torch.linalg.eigvalsh(dense)
    k = 6
    result = kh.lanczos(hessian_op, k, which=which, tol=1e-10, seed=0, dense_limit=0)
    expected = {
        "largest": exact.flip(0)[:k],
        "smallest": exact[:k].flip(0),  # descending, whichever pairs are asked for
        "both": torch.cat([exact.flip(0)[:3], exact[:3].flip(0)]),
    }[which]
    assert result.converged and result.method == "block-lanczos"
    dense_path = kh.lanczos(hessian_op, k, which=which)
    assert dense_path.method == "dense" and torch.allclose(dense_path.eigenvalues, expected, atol=1e-12)
    assert torch.allclose(result.eigenvalues, expected, rtol=1e-8, atol=1e-8 * exact.abs().max())
    vecs = result.eigenvectors
    assert torch.allclose(vecs @ vecs.T, torch.eye(k), atol=1e-8)
    residual = dense @ vecs.T - vecs.T * result.eigenvalues
    assert torch.allclose(residual.norm(dim=0), result.residuals, atol=1e-9)


def test_agrees_with_scipy_eigsh(hessian_op):
    ours = kh.lanczos(hessian_op, 4, tol=1e-10, seed=1, dense_limit=0).eigenvalues.numpy()
    theirs = np.sort(eigsh(hessian_op.to_scipy(), k=4, which="LA", tol=1e-12)[0])[::-1]
    assert np.allclose(ours, theirs, rtol=1e-8)


@pytest.mark.parametrize("block_size", [1, 3])
def test_repeated_eigenvalues_of_mse_last_layer(block_size):
    """The MSE last layer's block is (2/C)·I ⊗ A: every eigenvalue of A appears C = 3 times."""
    model = mlp(nn.Tanh, widths=(5, 4, 3))
    X, y = regression_data(n=12)
    op = kh.layer_operator(model, nn.MSELoss(), batches(X, y, [7, 5]), "2")
    exact = torch.linalg.eigvalsh(op.to_dense()).flip(0)
    assert torch.allclose(exact[0], exact[2]) and not torch.allclose(exact[2], exact[3])  # the premise
    result = kh.lanczos(op, 7, tol=1e-10, seed=0, block_size=block_size, dense_limit=0)
    assert torch.allclose(result.eigenvalues, exact[:7], rtol=1e-8)


def test_dense_fallback_and_operator_kinds():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    values = torch.linspace(-2, 5, 30)
    op = Dense(Q @ torch.diag(values) @ Q.T)
    result = kh.lanczos(op, 3)  # P=30 ≤ dense_limit
    assert result.method == "dense" and torch.allclose(result.eigenvalues, values.flip(0)[:3])
    iterative = kh.lanczos(op, 3, dense_limit=0, tol=1e-12, seed=0)
    assert torch.allclose(iterative.eigenvalues, values.flip(0)[:3], atol=1e-10)


def test_kronecker_factor_is_an_operator():
    kfac = kh.compute_kfac(mlp(nn.Tanh, widths=(6, 8, 3)), nn.CrossEntropyLoss(), classification_data(d=6))
    f = kfac["0"]
    vals = kh.lanczos(f, 5, tol=1e-12, seed=0, dense_limit=0).eigenvalues
    assert torch.allclose(vals, f.eig().topk(5)[0], rtol=1e-9)


def test_non_convergence_is_reported():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    op = Dense(Q @ torch.diag(torch.linspace(1, 1.001, 200)) @ Q.T)  # a tight cluster
    with pytest.warns(RuntimeWarning, match="did not converge"):
        result = kh.lanczos(op, 5, tol=1e-14, max_iter=8, seed=0, dense_limit=0)
    assert not result.converged and result.notes


def test_bad_arguments(hessian_op):
    with pytest.raises(ValueError, match="k=0"):
        kh.lanczos(hessian_op, 0)
    with pytest.raises(ValueError, match="which"):
        kh.lanczos(hessian_op, 2, which="middle")


def test_warm_start_from_the_wanted_eigenvectors():
    """A start in the span of the top-k eigenvectors: the first run's Krylov space is that invariant subspace after k
    products (the vectors are folded into one start column), so only the confirming run remains; the answer is the
    same from any start, also when fewer start vectors than the block are given."""
    n, k = 300, 6
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    values = torch.cat([torch.tensor([5.0, 4.0, 3.5, 3.0, 2.5, 2.2], dtype=torch.float64),
                        0.9 ** torch.arange(n - k, dtype=torch.float64)])
    op = Dense((Q * values) @ Q.T)
    exact = values[:k]
    cold = kh.lanczos(op, k, tol=1e-8, seed=0, dense_limit=0)
    warm = kh.lanczos(op, k, tol=1e-8, seed=0, dense_limit=0, start=Q[:, :k].T)
    fewer = kh.lanczos(op, k, tol=1e-8, seed=0, dense_limit=0, start=Q[:, :2].T, block_size=4)
    for result in (cold, warm, fewer):
        assert result.converged and torch.allclose(result.eigenvalues, exact, rtol=1e-8)
        V = result.eigenvectors  # the residuals are the true ones (a fresh block once hid couplings from them)
        assert torch.allclose((op.matrix @ V.T - V.T * result.eigenvalues).norm(dim=0), result.residuals, atol=1e-12)
    assert warm.n_matvecs < cold.n_matvecs


def test_low_rank_operator_with_blocks_that_exhaust_the_range():
    """Rank 5 with block size 3: the Krylov space becomes invariant after one block, fresh directions continue in the
    null space, and the confirming run there converges against ‖A‖ (not against the zeros that remain)."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64)).Q
    values = torch.zeros(200, dtype=torch.float64)
    values[:5] = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0])
    matrix = (Q * values) @ Q.T
    result = kh.lanczos(Dense(matrix), 4, block_size=3, tol=1e-10, seed=0, dense_limit=0)
    assert result.converged and torch.allclose(result.eigenvalues, values[:4], rtol=1e-10)
    V = result.eigenvectors
    assert torch.allclose((matrix @ V.T - V.T * result.eigenvalues).norm(dim=0), result.residuals, atol=1e-12)


def test_start_is_validated():
    op = Dense(torch.eye(40, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"start must be \(m, 40\)"):
        kh.lanczos(op, 2, start=torch.zeros(3, 41, dtype=torch.float64), dense_limit=0)
    with pytest.raises(ValueError, match="which='largest'"):
        kh.lanczos(op, 2, which="both", start=torch.zeros(3, 40, dtype=torch.float64), dense_limit=0)
