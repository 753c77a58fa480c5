"""One eigen-result protocol, taken by every analysis (overlap, low-rank structure, outliers, PAC-Bayes bases).

An *eigen result* has

* ``eigenvalues``: the eigenvalues it knows, **descending** — all ``P`` of a block's eigen-structure (``BlockEigen``:
  Kronecker, EKFAC, Kronecker fit, dense blocks) or of a dense eigendecomposition (``EigenPairs`` from
  ``eigen_pairs``), the ``k`` pairs a Lanczos run found (``LanczosResult``), the top-k of a whole-model spectrum;
* ``topk(k) -> (values (k,), vectors (k, P))``: the ``k`` largest eigenvalues, descending, with orthonormal
  eigenvectors as *rows*, in public parameter order (``torch.cat([p.flatten() for p in parameters])``); at most
  ``k`` — all ``P`` of a result that holds the whole spectrum — and a ``ValueError`` when ``k`` exceeds the pairs a
  truncated result holds;
* ``num_params``: ``P``, the length of the eigenvectors.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .linear_operator import LinearOperator


class EigenResult(Protocol):
    """What every analysis takes (module docstring)."""

    @property
    def eigenvalues(self) -> Tensor: ...

    @property
    def num_params(self) -> int: ...

    def topk(self, k: int) -> tuple[Tensor, Tensor]: ...


def is_eigen_result(value: object) -> bool:
    """Whether ``value`` has the protocol's members — looked up statically: reading ``eigenvalues`` may sort all ``P``
    products of a Kronecker block."""
    return all(_has_static(value, name) for name in ("eigenvalues", "num_params", "topk"))


def _has_static(value: object, name: str) -> bool:
    try:
        inspect.getattr_static(value, name)
    except AttributeError:
        return False
    return True


def require_eigen_result(value: object, what: str) -> EigenResult:
    """``value`` itself, or a ``TypeError`` saying what an eigen result is."""
    if not is_eigen_result(value):
        raise TypeError(f"{what} must be an eigen result (a block's .eig(), lanczos(...), eigen_pairs(matrix), "
                        f"model_spectrum(...): eigenvalues, topk(k), num_params), got {type(value).__name__}")
    return value


def eigenvalues_of(spectrum: Tensor | EigenResult) -> Tensor:
    """The eigenvalues of a spectrum given as a tensor of eigenvalues or as an eigen result."""
    if isinstance(spectrum, Tensor):
        return spectrum
    return require_eigen_result(spectrum, "a spectrum (or a tensor of eigenvalues)").eigenvalues


def check_k(k: object) -> int:
    """``k`` itself, or a ``ValueError`` for a ``k`` that is not a positive integer."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer (the number of leading eigenpairs)")
    return k


@dataclass
class EigenPairs(LinearOperator):
    """Eigenvalues ``(m,)`` descending and orthonormal eigenvectors ``(m, P)`` (rows, public order): all ``P`` pairs
    of a dense decomposition, or the leading ones of an iterative method.

    Unpacks as ``vals, vecs = pairs``. As a ``LinearOperator`` it is ``V diag(λ) Vᵀ`` of its pairs: the matrix itself
    when all ``P`` are there.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor

    def __iter__(self):
        return iter((self.eigenvalues, self.eigenvectors))

    @property
    def num_params(self) -> int:
        return self.eigenvectors.shape[1]

    @property
    def reference(self) -> Tensor:
        return self.eigenvectors

    def matmat(self, columns: Tensor) -> Tensor:
        return self.eigenvectors.T @ (self.eigenvalues[:, None] * (self.eigenvectors @ columns))

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` leading pairs (module docstring): all ``P`` for a larger ``k`` of a complete decomposition."""
        held = len(self.eigenvalues)
        k = check_k(k)
        if k > held and held < self.num_params:
            raise ValueError(f"k={k} exceeds the {held} eigenpairs this result holds (of P={self.num_params}); "
                             f"compute at least k pairs (lanczos(op, k) or model_spectrum(..., k=k))")
        return self.eigenvalues[:k], self.eigenvectors[:k]


def eigen_pairs(matrix: Tensor) -> EigenPairs:
    """The eigendecomposition of a dense symmetric ``(P, P)`` matrix in public order (symmetrized first), descending.
    Unlike the PSD eigensolvers of the blocks nothing is clamped: a Hessian's negative eigenvalues stay."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square (P, P) matrix, got {tuple(matrix.shape)}")
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return EigenPairs(values.flip(0), vectors.flip(1).T.contiguous())
