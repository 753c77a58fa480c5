"""The block protocol and the eigen protocol that every curvature block of ``compute_kfac`` follows.

A *block* is the curvature of one layer's (or one free parameter's) parameters, a ``LinearOperator``
(``kfac_hessian.linear_operator``: ``(P, P)`` in public order, ``@``, ``to_dense``, ``to_scipy``, sums and
restrictions) that is never formed, with ``trace``, ``eig(vectors=…)``, ``to``, ``describe`` and
``state``/``from_state`` (save and load). Its *eigen-structure* (``BlockEigen``, the same operator seen through its
eigendecomposition): ``eigenvalues``, ``top_eigenvalues``, ``topk``, ``trace``, ``effective_rank``, ``density`` and
``clamped`` (round-off negatives set to zero).

The eigendecompositions of all blocks go through ``eig_blocks`` — batched by size, split over ranks when distributed
(``blocks.decomposition``): a block only says which small symmetric matrices it reduces to (``eig_matrices``) and
how their decompositions make its eigen-structure (``eigen_from``).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from ..limits import DENSITY_CHUNK
from ..linear_operator import LinearOperator
from ..spectra import ClampReport, SpectralDensity, entropy, values_density
from .decomposition import decompose, decompose_distributed


class CurvatureBlock(LinearOperator):
    """One ``(P, P)`` curvature block in public parameter order (module docstring)."""

    storage_tag: ClassVar[str]  # what ``state`` is saved under, so that loading picks the class that reads it back
    name: str
    # what the block is with respect to its target curvature (``factors.labels``): "exact …", "estimate …" or
    # "approximation …"; set by the pass that computed it
    status: str = ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, P={self.num_params})"

    def describe(self) -> str:
        """The block's structure and what it is, in a few words (``KFAC.summary``, ``report.json``)."""
        return f"{self.structure()} — {self.status}" if self.status else self.structure()

    @abstractmethod
    def structure(self) -> str:
        """The block's structure in a few words."""

    @abstractmethod
    def trace(self) -> Tensor: ...

    @abstractmethod
    def materialize(self) -> Tensor:
        """The ``(P, P)`` matrix, formed from the block's own structure."""

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CurvatureBlock:
        """The block on ``device`` in ``dtype`` (its status kept)."""
        moved = self.moved(device, dtype)
        moved.status = self.status
        return moved

    @abstractmethod
    def moved(self, device: torch.device | str | None, dtype: torch.dtype | None) -> CurvatureBlock:
        """A new block of the same structure with its tensors on ``device`` in ``dtype``."""

    @abstractmethod
    def state(self) -> dict:
        """Plain tensors, numbers and strings (``torch.load(weights_only=True)`` reads them back)."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict, name: str) -> CurvatureBlock: ...

    @abstractmethod
    def eig_matrices(self, dtype: torch.dtype | None) -> list[Tensor]:
        """The PSD matrices this block's spectrum is made of, each a batch ``(B, d, d)``."""

    @abstractmethod
    def eigen_from(self, matrices: list[Tensor], decompositions: list[tuple], vectors: bool) -> BlockEigen:
        """The eigen-structure from ``(values (B, d), vectors (B, d, d) or None, reports, forms)`` per matrix."""

    def eig(self, dtype: torch.dtype | None = None, vectors: bool = False) -> BlockEigen:
        """Eigen-structure on the block's device (``dtype=torch.float64`` for more precision).

        By default eigenvalues now and eigenvectors when first needed — on the CPU only the leading ones that
        ``topk`` asks for; ``vectors=True`` computes all eigenvectors at once.
        """
        return eig_blocks({self.name: self}, dtype, vectors)[self.name]


def eig_blocks(blocks: Mapping[str, CurvatureBlock], dtype: torch.dtype | None = None, vectors: bool = False,
               distributed: bool = False, progress: bool = False) -> dict[str, BlockEigen]:
    """``BlockEigen`` of every block (``dtype``: precision of the decompositions; ``vectors``: all eigenvectors now
    instead of on first use; ``distributed``: each rank of the process group decomposes a cost-balanced share
    (≈ B·d³ per matrix) and all ranks receive every result; ``progress``: blocks done, rate and ETA as the pass
    reports them (``factors.progress``) when the work is worth it, ``_worth_a_bar``)."""
    # bfloat16/float16 blocks are decomposed in float32 (no LAPACK routine takes them)
    requests = {(name, i): m for name, block in blocks.items()
                for i, m in enumerate(block.eig_matrices(dtype or _upcast(block.dtype)))}
    decomposed = decompose_distributed if distributed else decompose
    if progress and _worth_a_bar(blocks, requests):
        results = {}
        for chunk in _tracked_chunks(blocks, requests, vectors):
            if chunk:  # not only blocks that are diagonal already (EKFAC)
                results |= decomposed({key: requests[key] for key in chunk}, vectors)
    else:
        results = decomposed(requests, vectors)
    out = {}
    for name, block in blocks.items():
        keys = [key for key in requests if key[0] == name]
        eigen = block.eigen_from([requests[k] for k in keys], [results[k] for k in keys], vectors)
        eigen.source = block
        out[name] = eigen
    return out


def _upcast(dtype: torch.dtype) -> torch.dtype | None:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else None


EIG_BLOCKS_WORTH_A_BAR = 8  # blocks from which their eigendecompositions report progress …
EIG_COST_WORTH_A_BAR = 2 * 1024**3  # … once Σ B·d³ of their matrices is above this (about a second on 2 CPU cores)
EIG_PROGRESS_STEPS = 20  # updates of the progress report, about


def _worth_a_bar(blocks: Mapping[str, CurvatureBlock], requests: dict) -> bool:
    cost = sum(float(len(m)) * float(m.shape[-1]) ** 3 for m in requests.values())
    return len(blocks) >= EIG_BLOCKS_WORTH_A_BAR and cost >= EIG_COST_WORTH_A_BAR


def _tracked_chunks(blocks: Mapping[str, CurvatureBlock], requests: dict, vectors: bool):
    """The keys of ``requests`` in chunks of whole blocks, reported as blocks done. A chunk is decomposed in one call
    (batched by size, concurrent tridiagonalizations): it holds about 1/``EIG_PROGRESS_STEPS`` of the blocks and at
    least as many matrices as there are threads, so that the report costs little of the concurrency."""
    from ..factors.progress import tracked  # the factors package imports this one: imported when needed

    by_block: dict[str, list] = {name: [] for name in blocks}
    for key in requests:
        by_block[key[0]].append(key)
    per_block = max(1.0, len(requests) / max(len(by_block), 1))
    size = max(math.ceil(len(by_block) / EIG_PROGRESS_STEPS), math.ceil(torch.get_num_threads() / per_block))
    names = list(by_block)
    chunks = [names[start : start + size] for start in range(0, len(names), size)]
    what = "eigendecompositions" if vectors else "eigenvalues"
    for chunk in tracked(chunks, f"{what} of {len(blocks)} blocks", len(blocks), "block", size=len):
        yield [key for name in chunk for key in by_block[name]]


class BlockEigen(LinearOperator):
    """Eigen-structure of one block: all eigenvalues, the leading eigenpairs, trace, effective rank, density — an eigen
    result (``kfac_hessian.eigen.EigenResult``: ``eigenvalues`` descending, ``topk``, ``num_params``).

    As an operator it is the block it decomposes (``source``, set by ``eig_blocks``): its products are the block's."""

    clamped: dict[str, ClampReport]
    source: CurvatureBlock

    @property
    def reference(self) -> LinearOperator:
        return self.source

    def matmat(self, columns: Tensor) -> Tensor:
        return self.source.matmat(columns)

    @property
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
                chunk: int = DENSITY_CHUNK) -> SpectralDensity:
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

    @property
    def eigenvalues(self) -> Tensor:
        return self.values

    def top_eigenvalues(self, k: int) -> Tensor:
        return self.values[: self._check_k(k)]

    def trace(self) -> Tensor:
        return self.values.sum()

    def effective_rank(self) -> float:
        return math.exp(entropy(self.values)) if float(self.values.sum()) > 0 else 0.0

    def density(self, bins: int = 100, log: bool = True, range: tuple[float, float] | None = None,
                chunk: int = DENSITY_CHUNK) -> SpectralDensity:
        return values_density(self.values, bins, log, range, chunk)
