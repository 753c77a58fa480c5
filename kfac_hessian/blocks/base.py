"""The block protocol and the eigen protocol that every curvature block of ``compute_kfac`` follows.

A *block* is the curvature of one layer's (or one free parameter's) parameters, a ``(P, P)`` matrix in public
order (``torch.cat([p.flatten() for p in parameters])``) that is never formed: ``num_params``, ``shape``, ``@``
(vectors ``(P,)``, matrices ``(P, m)`` or parameter-shaped tuples), ``trace``, ``to_dense(max_params)`` (small
blocks and tests only), ``eig(vectors=…)``, ``to``, ``describe`` and ``state``/``from_state`` (save and load).
Its *eigen-structure* (``BlockEigen``): ``eigenvalues``, ``top_eigenvalues``, ``topk``, ``trace``,
``effective_rank``, ``density`` and ``clamped`` (round-off negatives set to zero).

The eigendecompositions of all blocks go through ``blocks.eig.eig_blocks`` — batched by size, split over ranks
when distributed: a block only says which small symmetric matrices it reduces to (``_eig_matrices``) and how their
decompositions make its eigen-structure (``_eigen``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from ..spectra import ClampReport, SpectralDensity, entropy, values_density

DENSE_LIMIT = 20_000  # largest P for which ``to_dense`` builds a P×P matrix by default


class CurvatureBlock(ABC):
    """One ``(P, P)`` curvature block in public parameter order (module docstring)."""

    kind: ClassVar[str]  # the ``state`` tag that ``from_state`` reads back
    name: str

    @property
    @abstractmethod
    def num_params(self) -> int: ...

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def describe(self) -> str:
        """The block's structure in a few words (``KFAC.summary``)."""

    @abstractmethod
    def trace(self) -> Tensor: ...

    @abstractmethod
    def _apply(self, columns: Tensor) -> Tensor:
        """The block times ``columns`` ``(P, m)`` (already in the block's dtype)."""

    @abstractmethod
    def _dense(self) -> Tensor: ...

    @abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "CurvatureBlock": ...

    @abstractmethod
    def state(self) -> dict:
        """Plain tensors, numbers and strings (``torch.load(weights_only=True)`` reads them back)."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict, name: str) -> "CurvatureBlock": ...

    @abstractmethod
    def _eig_matrices(self, dtype: torch.dtype | None) -> list[Tensor]:
        """The PSD matrices this block's spectrum is made of, each a batch ``(B, d, d)``."""

    @abstractmethod
    def _eigen(self, matrices: list[Tensor], decompositions: list[tuple], vectors: bool) -> "BlockEigen":
        """The eigen-structure from ``(values (B, d), vectors (B, d, d) or None, reports, forms)`` per matrix."""

    def __matmul__(self, v: Tensor | tuple[Tensor, ...] | list[Tensor]) -> Tensor | tuple[Tensor, ...]:
        """The block times ``v``: ``(P,)``, ``(P, m)``, or a tuple of tensors shaped like the block's parameters
        (returned alike)."""
        if isinstance(v, (tuple, list)):
            out = self @ torch.cat([t.reshape(-1) for t in v])
            return tuple(piece.reshape(t.shape) for piece, t in zip(out.split([t.numel() for t in v]), v))
        if v.dim() not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(f"expected a vector (P,) or matrix (P, m) with P={self.num_params}, got {tuple(v.shape)}")
        return self._apply(v.reshape(self.num_params, -1).to(self.dtype)).reshape(v.shape)

    def to_dense(self, max_params: int = DENSE_LIMIT) -> Tensor:
        """The ``(P, P)`` matrix in public parameter order — for small blocks and tests only."""
        if self.num_params > max_params:
            raise ValueError(
                f"block {self.name!r} has P={self.num_params} parameters; a dense {self.num_params}² matrix is refused "
                f"above max_params={max_params}. Use `@` (matvec), `.eig()` or `.eig().density()` instead"
            )
        return self._dense()

    def eig(self, dtype: torch.dtype | None = None, vectors: bool = False) -> "BlockEigen":
        """Eigen-structure on the block's device (``dtype=torch.float64`` for more precision).

        By default eigenvalues now and eigenvectors when first needed — on the CPU only the leading ones that
        ``topk`` asks for; ``vectors=True`` computes all eigenvectors at once.
        """
        from .eig import eig_blocks

        return eig_blocks({self.name: self}, dtype, vectors)[self.name]


class BlockEigen(ABC):
    """Eigen-structure of one block: all eigenvalues, the leading eigenpairs, trace, effective rank, density."""

    clamped: dict[str, ClampReport]

    @property
    @abstractmethod
    def num_params(self) -> int: ...

    @abstractmethod
    def eigenvalues(self) -> Tensor:
        """All ``P`` eigenvalues, descending (``P`` numbers: for huge blocks use ``density``)."""

    @abstractmethod
    def top_eigenvalues(self, k: int) -> Tensor:
        """The ``k`` largest eigenvalues, descending (no eigenvectors computed)."""

    @abstractmethod
    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues (descending) and orthonormal eigenvectors ``(k, P)`` in public parameter order.

        One rule for ``k`` everywhere (``topk``, ``top_eigenvalues``, ``compare``, ``overlap_by_layer``): at most ``k``
        — all ``P`` of a block with fewer; ``k < 1`` is an error."""

    @abstractmethod
    def trace(self) -> Tensor: ...

    @abstractmethod
    def effective_rank(self) -> float:
        """``exp(−Σ p log p)`` with ``p = λ / Σλ`` (spectral entropy); 0 for an all-zero spectrum."""

    @abstractmethod
    def density(self, bins: int = 100, log: bool = True, range: tuple[float, float] | None = None,
                chunk: int = 2**22) -> SpectralDensity:
        """Histogram of all ``P`` eigenvalues in bounded memory (chunks of about ``chunk`` values).

        ``log=True`` bins ``log10`` of the positive eigenvalues and counts zeros apart; ``range`` is in the
        binned variable (defaults to the exact extent of the spectrum).
        """

    def _check_k(self, k: int) -> int:
        """``min(k, P)`` (``topk``'s rule); ``ValueError`` for a ``k`` that is not a positive integer."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be a positive integer (at most k eigenpairs are returned: all "
                             f"{self.num_params} of this block for a larger k)")
        return min(k, self.num_params)


class ExplicitEigen(BlockEigen):
    """A ``BlockEigen`` whose ``P`` eigenvalues are held explicitly, descending (``values``), with their order
    ``_order`` in the flattened source: ``DenseBlocks`` and EKFAC blocks."""

    values: Tensor
    _order: Tensor

    def _set_values(self, flat: Tensor) -> None:
        self._order = flat.argsort(descending=True, stable=True)
        self.values = flat[self._order]

    @property
    def num_params(self) -> int:
        return self.values.numel()

    def eigenvalues(self) -> Tensor:
        return self.values

    def top_eigenvalues(self, k: int) -> Tensor:
        return self.values[: self._check_k(k)]

    def trace(self) -> Tensor:
        return self.values.sum()

    def effective_rank(self) -> float:
        return math.exp(entropy(self.values)) if float(self.values.sum()) > 0 else 0.0

    def density(self, bins: int = 100, log: bool = True, range: tuple[float, float] | None = None,
                chunk: int = 2**22) -> SpectralDensity:
        return values_density(self.values, bins, log, range, chunk)
