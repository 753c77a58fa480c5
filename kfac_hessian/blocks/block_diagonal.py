"""A block-diagonal of Kronecker blocks on a partition of one module's parameters: ``BlockDiagonal``.

Some modules have parameters that no single ``G ⊗ A`` covers: a recurrent layer (one Kronecker block per layer and
direction, plus the hidden-state projection of an LSTM with ``proj_size``; GRU's input-side and hidden-side
projections apart) or cross-attention (the query rows of the in-projection see the query input, the key/value rows
the memory). ``BlockDiagonal`` holds named ``KroneckerBlock`` parts, each in its own public order, and ``index``
(one ``(P_i,)`` tensor per part): the positions in the module's public order of the part's public positions. Every
position belongs to exactly one part; the curvature between parts is dropped. As a matrix the block is
``Σ_i E_iᵀ (G_i ⊗ A_i) E_i`` (``E_i`` selects ``index_i``): its eigenvalues are those of the parts, each
eigenvector a part's placed at its positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..limits import DENSITY_CHUNK
from ..spectra import ClampReport, SpectralDensity, values_density
from .base import BlockEigen, CurvatureBlock
from .kronecker import KroneckerBlock, KroneckerEigen


class BlockDiagonal(CurvatureBlock):
    """Named Kronecker parts on a partition of the public positions (module docstring)."""

    storage_tag = "block_diagonal"

    def __init__(self, parts: dict[str, KroneckerBlock], index: dict[str, Tensor], name: str = "",
                 assumption: str = ""):
        if list(parts) != list(index) or not parts:
            raise ValueError(f"expected the same non-empty part names for parts and index, got {list(parts)} and "
                             f"{list(index)}")
        for part, block in parts.items():
            if index[part].shape != (block.num_params,):
                raise ValueError(f"part {part!r} has {block.num_params} parameters but an index of shape "
                                 f"{tuple(index[part].shape)}")
        positions = torch.cat(list(index.values()))
        if not torch.equal(positions.sort().values, torch.arange(len(positions), device=positions.device)):
            raise ValueError("the parts' index must cover every public position exactly once")
        device = next(iter(parts.values())).device
        self.parts, self.index, self.name = parts, {p: i.to(device) for p, i in index.items()}, name
        self.assumption = assumption  # what the split into parts assumes, in a few words (``structure``)

    def __repr__(self) -> str:
        return f"BlockDiagonal({self.name!r}, parts={list(self.parts)}, P={self.num_params})"

    @property
    def num_params(self) -> int:
        return sum(block.num_params for block in self.parts.values())

    @property
    def reference(self) -> KroneckerBlock:
        return next(iter(self.parts.values()))

    def structure(self) -> str:
        parts = ", ".join(f"{part}: G {block.layout.d_out}² ⊗ A {block.layout.width}²"
                          for part, block in self.parts.items())
        assumption = f"{self.assumption}; " if self.assumption else ""
        return (f"block-diagonal of {len(self.parts)} Kronecker blocks ({assumption}the terms between them dropped): "
                f"{parts}")

    def matmat(self, columns: Tensor) -> Tensor:
        out = torch.empty_like(columns)
        for part, block in self.parts.items():
            out[self.index[part]] = block.matmat(columns[self.index[part]])
        return out

    def trace(self) -> Tensor:
        return sum(block.trace() for block in self.parts.values())

    def materialize(self) -> Tensor:
        out = self.reference.G.new_zeros(self.num_params, self.num_params)
        for part, block in self.parts.items():
            index = self.index[part]
            out[index[:, None], index[None, :]] = block.materialize()
        return out

    def moved(self, device: torch.device | str | None, dtype: torch.dtype | None) -> BlockDiagonal:
        return BlockDiagonal({p: b.moved(device, dtype) for p, b in self.parts.items()}, self.index, self.name,
                             self.assumption)

    def state(self) -> dict:
        return {"parts": {p: b.state() for p, b in self.parts.items()}, "index": dict(self.index),
                "assumption": self.assumption}

    @classmethod
    def from_state(cls, state: dict, name: str) -> BlockDiagonal:
        parts = {p: KroneckerBlock.from_state(s, f"{name}/{p}") for p, s in state["parts"].items()}
        return cls(parts, state["index"], name, state["assumption"])

    def eig_matrices(self, dtype: torch.dtype | None) -> list[Tensor]:
        return [m for block in self.parts.values() for m in block.eig_matrices(dtype)]

    def eigen_from(self, matrices: list[Tensor], decompositions: list[tuple], vectors: bool) -> BlockDiagonalEigen:
        eigens, start = {}, 0
        for part, block in self.parts.items():
            count = len(block.eig_matrices(None))
            eigens[part] = block.eigen_from(matrices[start : start + count], decompositions[start : start + count],
                                            vectors)
            eigens[part].source = block
            start += count
        return BlockDiagonalEigen(eigens, self.index, self.num_params)


class BlockDiagonalEigen(BlockEigen):
    """Eigen-structure of a ``BlockDiagonal``: the parts' eigenvalues merged, eigenvectors placed at each part's
    positions; ``parts`` the parts' ``KroneckerEigen``; ``clamped`` per part and factor (``"l0/G"``)."""

    def __init__(self, parts: dict[str, KroneckerEigen], index: dict[str, Tensor], num_params: int):
        self.parts, self.index, self._num_params = parts, index, num_params
        self.clamped: dict[str, ClampReport] = {f"{p}/{f}": r for p, e in parts.items() for f, r in e.clamped.items()}

    @property
    def num_params(self) -> int:
        return self._num_params

    @property
    def eigenvalues(self) -> Tensor:
        return torch.cat([e.eigenvalues for e in self.parts.values()]).sort(descending=True).values

    def top_eigenvalues(self, k: int) -> Tensor:
        k = self._check_k(k)
        values = torch.cat([e.top_eigenvalues(min(k, e.num_params)) for e in self.parts.values()])
        return values.sort(descending=True).values[:k]

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        k = self._check_k(k)
        values, vectors = [], []
        for part, eigen in self.parts.items():
            part_values, part_vectors = eigen.topk(min(k, eigen.num_params))
            placed = part_vectors.new_zeros(len(part_values), self.num_params)
            placed[:, self.index[part]] = part_vectors
            values.append(part_values)
            vectors.append(placed)
        values, vectors = torch.cat(values), torch.cat(vectors)
        order = values.argsort(descending=True, stable=True)[:k]
        return values[order], vectors[order]

    def trace(self) -> Tensor:
        return sum(e.trace() for e in self.parts.values())

    def effective_rank(self) -> float:
        """Exact from the parts: the spectrum is the mixture of the parts' with weights ``q_i`` (trace shares), so its
        entropy is ``−Σ q_i log q_i + Σ q_i H_i`` with ``H_i = log erank_i``."""
        traces = torch.stack([e.trace().double() for e in self.parts.values()])
        total = float(traces.sum())
        if total <= 0:
            return 0.0
        entropy = 0.0
        for share, eigen in zip((traces / total).tolist(), self.parts.values()):
            if share > 0:
                entropy += share * (math.log(eigen.effective_rank()) - math.log(share))
        return math.exp(entropy)

    def density(self, bins: int = 100, log: bool = True, range: tuple[float, float] | None = None,
                chunk: int = DENSITY_CHUNK) -> SpectralDensity:
        return values_density(self.eigenvalues, bins, log, range, chunk)
