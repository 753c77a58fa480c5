"""One linear-operator protocol for every curvature matrix of the package.

A ``LinearOperator`` is a square ``(P, P)`` matrix in public parameter order
(``torch.cat([p.flatten() for p in parameters])``) known through its products: the Kronecker, dense and EKFAC blocks
of the factors stage, the eigen-results (a full eigendecomposition stands for the matrix it decomposes, a Lanczos
result for its ``k`` pairs ``V diag(λ) Vᵀ``) and the exact Hessian and GGN operators of the exact path.

A subclass provides ``num_params``, ``reference`` (a tensor or operator whose dtype and device it has) and
``matmat`` (the product with columns ``(P, m)`` already in its dtype and on its device); it may override
``materialize`` when it can form its matrix more cheaply than by products with the identity. Everything else is
written once here: ``@`` with vectors, matrices and parameter-shaped tuples, ``to_dense`` (refused above a size
limit), ``to_scipy``, and the operators built from others — ``a + b``, ``a - b``, ``c * a``, ``-a`` and
``a.restrict(indices)`` (the sub-block on some public positions).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
from torch import Tensor

from .limits import DENSE_COLUMNS, DENSE_LIMIT


class LinearOperator(ABC):
    """A square ``(P, P)`` matrix known through its products (module docstring)."""

    @property
    @abstractmethod
    def num_params(self) -> int: ...

    @property
    @abstractmethod
    def reference(self) -> Tensor | LinearOperator:
        """A tensor (or operator) whose dtype and device the operator has."""

    @property
    def dtype(self) -> torch.dtype:
        return self.reference.dtype

    @property
    def device(self) -> torch.device:
        return self.reference.device

    @abstractmethod
    def matmat(self, columns: Tensor) -> Tensor:
        """The operator times ``columns`` ``(P, m)``, given in the operator's dtype and on its device."""

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def matvec(self, vector: Tensor) -> Tensor:
        """The operator times a vector ``(P,)``."""
        return self @ vector.reshape(-1)

    def __matmul__(self, v: Tensor | tuple[Tensor, ...] | list[Tensor]) -> Tensor | tuple[Tensor, ...]:
        """The operator times ``v``: ``(P,)``, ``(P, m)``, or a tuple of tensors shaped like its parameters (returned
        alike)."""
        if isinstance(v, (tuple, list)):
            out = self @ torch.cat([t.reshape(-1) for t in v])
            return tuple(piece.reshape(t.shape) for piece, t in zip(out.split([t.numel() for t in v]), v))
        if v.dim() not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(f"expected a vector (P,) or matrix (P, m) with P={self.num_params}, got {tuple(v.shape)}")
        return self.matmat(v.reshape(self.num_params, -1).to(self.device, self.dtype)).reshape(v.shape)

    def materialize(self) -> Tensor:
        """The ``(P, P)`` matrix, from products with the identity (``dense_by_products``)."""
        return dense_by_products(self)

    def to_dense(self, max_params: int = DENSE_LIMIT) -> Tensor:
        """The ``(P, P)`` matrix in public parameter order — for small operators and tests only."""
        if self.num_params > max_params:
            raise ValueError(
                f"{self!r} has P={self.num_params} parameters; a dense {self.num_params}² matrix is refused above "
                f"max_params={max_params}. Use products (`@`), `.eig()`, `lanczos` or `slq_density` instead")
        return self.materialize()

    def to_scipy(self) -> ScipyLinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (numpy in, numpy out) over the same products."""
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def matmat(x: np.ndarray) -> np.ndarray:
            return (self @ torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)).cpu().numpy()

        return ScipyLinearOperator(self.shape, matvec=matmat, matmat=matmat, rmatvec=matmat, dtype=np_dtype)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        return CombinedOperator([(1.0, self), (1.0, _operand(self, other))])

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return CombinedOperator([(1.0, self), (-1.0, _operand(self, other))])

    def __mul__(self, scalar: float) -> LinearOperator:
        return CombinedOperator([(float(scalar), self)])

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return CombinedOperator([(-1.0, self)])

    def restrict(self, indices: Tensor | list[int]) -> LinearOperator:
        """The sub-block on the public positions ``indices``: ``E A Eᵀ`` with ``E`` selecting them."""
        return RestrictedOperator(self, torch.as_tensor(indices, dtype=torch.long))


def dense_by_products(op) -> Tensor:
    """The ``(P, P)`` matrix of anything with ``shape``, ``dtype``, ``device`` and ``@``, from products with
    ``DENSE_COLUMNS`` identity columns at a time (each column of a curvature operator carries its own tangents
    through the model, so the chunk bounds the memory)."""
    n = op.shape[0]
    eye = torch.eye(n, dtype=op.dtype, device=op.device)
    return torch.cat([op @ eye[:, i : i + DENSE_COLUMNS] for i in range(0, n, DENSE_COLUMNS)], dim=1)


def _operand(first: LinearOperator, other: object) -> LinearOperator:
    if not isinstance(other, LinearOperator):
        raise TypeError(f"cannot combine a LinearOperator with {type(other).__name__}")
    if other.num_params != first.num_params:
        raise ValueError(f"operators of sizes {first.num_params} and {other.num_params} cannot be combined")
    return other


class CombinedOperator(LinearOperator):
    """``Σ c_i A_i`` over operators of one size, in the first operator's dtype and on its device."""

    def __init__(self, terms: list[tuple[float, LinearOperator]]):
        self.terms = terms

    def __repr__(self) -> str:
        return " + ".join(f"{c:g}·{op!r}" for c, op in self.terms)

    @property
    def num_params(self) -> int:
        return self.terms[0][1].num_params

    @property
    def reference(self) -> LinearOperator:
        return self.terms[0][1]

    def matmat(self, columns: Tensor) -> Tensor:
        out = None
        for coefficient, op in self.terms:
            term = (op @ columns).to(self.device, self.dtype)
            term = term if coefficient == 1.0 else coefficient * term
            out = term if out is None else out + term
        return out


class RestrictedOperator(LinearOperator):
    """The sub-block ``E A Eᵀ`` of an operator on some of its positions (``LinearOperator.restrict``)."""

    def __init__(self, parent: LinearOperator, indices: Tensor):
        if indices.dim() != 1 or (len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= parent.num_params)):
            raise ValueError(f"indices must be a 1-d list of positions in [0, {parent.num_params})")
        if len(indices.unique()) != len(indices):
            raise ValueError("indices must not repeat a position")
        self.parent, self.indices = parent, indices

    def __repr__(self) -> str:
        return f"RestrictedOperator({self.parent!r}, {len(self.indices)} positions)"

    @property
    def num_params(self) -> int:
        return len(self.indices)

    @property
    def reference(self) -> LinearOperator:
        return self.parent

    def matmat(self, columns: Tensor) -> Tensor:
        index = self.indices.to(columns.device)
        full = columns.new_zeros(self.parent.num_params, columns.shape[1])
        full[index] = columns
        return (self.parent @ full)[index]
