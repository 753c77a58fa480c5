"""The LinearOperator protocol against dense float64 matrices: sums, differences, scalings, restrictions, products
with vectors, matrices and parameter-shaped tuples, scipy, and the package's operators (blocks, eigen-structures,
Lanczos results, exact operators) combined with one another."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.linear_operator import LinearOperator

from .conftest import classification_data, mlp, psd
from .references import EXACT, rel_err


class Dense(LinearOperator):
    """A dense symmetric float64 matrix as an operator (only the abstract members)."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix

    @property
    def num_params(self) -> int:
        return self.matrix.shape[0]

    @property
    def reference(self) -> torch.Tensor:
        return self.matrix

    def matmat(self, columns: torch.Tensor) -> torch.Tensor:
        return self.matrix @ columns


def _columns(p: int, m: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(p, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sums_differences_scalings_and_negation_are_those_of_the_matrices():
    A, B = psd(7, seed=1), psd(7, seed=2)
    a, b = Dense(A), Dense(B)
    cases = [(a + b, A + B), (a - b, A - B), (2.5 * a, 2.5 * A), (a * -0.5, -0.5 * A), (-a, -A),
             (3 * a - b + (-b), 3 * A - 2 * B)]
    v = _columns(7, 3)
    for op, dense in cases:
        assert op.shape == (7, 7) and op.dtype == torch.float64
        assert torch.allclose(op.to_dense(), dense, atol=1e-14)
        assert torch.allclose(op @ v, dense @ v, atol=1e-14)
        assert torch.allclose(op @ v[:, 0], dense @ v[:, 0], atol=1e-14)  # a vector comes back a vector
        assert torch.allclose(op.matvec(v[:, 1]), dense @ v[:, 1], atol=1e-14)
    with pytest.raises(TypeError, match="cannot combine"):
        a + A
    with pytest.raises(ValueError, match="sizes 7 and 4"):
        a - Dense(psd(4))


def test_restrict_is_dense_slicing():
    A = psd(9, seed=3)
    indices = [7, 0, 4, 5]  # unsorted: the restriction keeps the given order
    restricted = Dense(A).restrict(indices)
    expected = A[indices][:, indices]
    assert restricted.num_params == 4
    assert torch.allclose(restricted.to_dense(), expected, atol=1e-15)
    v = _columns(4, 2)
    assert torch.allclose(restricted @ v, expected @ v, atol=1e-14)
    # restrictions compose with the other operations
    assert torch.allclose((Dense(A) - Dense(2 * A)).restrict(indices).to_dense(), -expected, atol=1e-14)
    with pytest.raises(ValueError, match="repeat"):
        Dense(A).restrict([1, 1])
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        Dense(A).restrict([0, 9])


def test_to_dense_is_refused_above_max_params():
    A = psd(6)
    assert torch.allclose(Dense(A).to_dense(max_params=6), A, atol=1e-15)
    with pytest.raises(ValueError, match="P=6 parameters.*max_params=5"):
        Dense(A).to_dense(max_params=5)


def test_to_scipy_products_equal_the_matrix():
    A = psd(8, seed=4)
    scipy_op = Dense(A).to_scipy()
    x = _columns(8, 3).numpy()
    assert scipy_op.shape == (8, 8) and scipy_op.dtype == np.float64
    assert np.allclose(scipy_op.matvec(x[:, 0]), A.numpy() @ x[:, 0], atol=1e-14)
    assert np.allclose(scipy_op.matmat(x), A.numpy() @ x, atol=1e-14)


def test_parameter_shaped_tuples_come_back_alike():
    shapes = [(2, 3), (3,), (1, 2, 2)]
    P = sum(int(np.prod(s)) for s in shapes)
    A = psd(P, seed=5)
    g = torch.Generator().manual_seed(6)
    pieces = tuple(torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    out = Dense(A) @ pieces
    assert isinstance(out, tuple) and [o.shape for o in out] == [p.shape for p in pieces]
    flat = A @ torch.cat([p.reshape(-1) for p in pieces])
    assert torch.allclose(torch.cat([o.reshape(-1) for o in out]), flat, atol=1e-14)
    assert all(torch.equal(x, y) for x, y in zip(Dense(A) @ list(pieces), out))  # a list works as a tuple
    with pytest.raises(ValueError, match="P=13"):
        Dense(A) @ torch.zeros(P + 1)


def test_a_one_sample_kronecker_block_minus_the_exact_ggn_block_is_zero():
    """With one sample the Kronecker block is the GGN block: their difference, as an operator, vanishes."""
    model = mlp(nn.Tanh)
    X, y = classification_data(n=1)
    block = kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y))["0"]
    exact = kh.layer_operator(model, nn.CrossEntropyLoss(), (X, y), "0", kind="ggn")
    difference = (block - exact).to_dense()
    assert float(difference.norm()) <= EXACT * float(exact.to_dense().norm())
    v = _columns(block.num_params, 2)
    assert rel_err(block @ v, exact @ v) < EXACT


def test_a_lanczos_result_is_v_diag_lambda_v_transposed():
    A = psd(30, seed=7)
    result = kh.lanczos(Dense(A), 4, tol=1e-12, seed=0, dense_limit=0)
    V, values = result.eigenvectors, result.eigenvalues
    expected = V.T @ torch.diag(values) @ V
    assert torch.allclose(result.to_dense(), expected, atol=1e-13)
    # on the top eigenvectors it acts as the matrix itself
    assert torch.allclose(result @ V.T, A @ V.T, atol=1e-8 * float(values[0]))


def test_an_eigen_structure_multiplies_as_its_block():
    kfac = kh.compute_kfac(mlp(nn.Tanh), nn.CrossEntropyLoss(), classification_data())
    v = _columns(kfac["0"].num_params, 3)
    for name, eigen in kfac.eig().items():
        block = kfac[name]
        u = _columns(block.num_params, 3)
        assert isinstance(eigen, LinearOperator) and eigen.num_params == block.num_params
        assert torch.equal(eigen @ u, block @ u)
    e = kfac["0"].eig()
    assert torch.allclose((e - kfac["0"]) @ v, torch.zeros_like(v), atol=1e-15)
