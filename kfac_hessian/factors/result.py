"""``KFAC``: the curvature blocks of every covered layer and parameter, with how they were computed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from ..blocks import BlockEigen, CurvatureBlock
from ..blocks.base import eig_blocks
from ..layers import FROZEN
from . import storage

_META = ("curvature", "approx", "loss", "reduction", "n_samples", "skipped", "parameter_names", "counts",
         "total_params", "tied", "trainable_params", "covered_trainable_params")


@dataclass
class KFAC(Mapping[str, CurvatureBlock]):
    """A read-only mapping block name → ``CurvatureBlock`` (``KroneckerBlock`` or ``DenseBlocks``), with how the
    blocks were computed.

    A block is named after its module (a free parameter's block after the parameter). ``parameter_names`` lists the
    full names of each block's parameters in public order; ``skipped`` names every parameterized module (or
    parameter) that is not covered, and why; ``counts`` gives the parameters of every block and skipped entry, a
    parameter shared by several modules (weight tying) counted once, at its first use; ``total_params`` counts the
    model's parameters; ``tied`` lists, per module, which of its parameters are shared and with whom. Each module's
    block is the curvature of its own use of the parameters; for a tied parameter the exact block is the sum of its
    users' blocks plus cross terms.
    """

    blocks: dict[str, CurvatureBlock]
    curvature: str
    approx: str
    loss: str
    reduction: str
    n_samples: int
    skipped: dict[str, str] = field(default_factory=dict)
    parameter_names: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    total_params: int = 0
    tied: dict[str, list[str]] = field(default_factory=dict)
    trainable_params: int = 0
    covered_trainable_params: int = 0

    @property
    def layer_names(self) -> list[str]:
        return list(self.blocks)

    def __getitem__(self, name: str) -> CurvatureBlock:
        if name not in self.blocks:
            why = f" ({name} was skipped: {self.skipped[name]})" if name in self.skipped else ""
            raise KeyError(f"no block named {name!r}{why}; blocks: {self.layer_names}")
        return self.blocks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def eig(self, dtype: torch.dtype | None = None, vectors: bool = False,
            distributed: bool = False, progress: bool = False) -> dict[str, BlockEigen]:
        """Eigen-structures of every block, decomposed together (``blocks.eig_blocks``): batched by size, on the CPU
        eigenvalues through concurrent tridiagonalizations, eigenvectors on first use unless ``vectors=True``.

        ``distributed=True``: the matrices are split over the ranks of the process group by cost (≈ B·d³), each rank
        decomposes its share, and all ranks receive every result. ``progress=True``: blocks done, rate and ETA (as
        ``compute_kfac(progress=True)`` reports its batches) when there are many blocks and the work takes long.
        """
        return eig_blocks(self.blocks, dtype, vectors, distributed, progress)

    def with_blocks(self, blocks: dict[str, CurvatureBlock], **changes) -> KFAC:
        """A copy with ``blocks`` (and any field in ``changes``), its dictionaries copied."""
        copied = {key: dict(value) if isinstance(value, dict) else value for key, value in self._meta().items()}
        return dataclasses.replace(self, blocks=blocks, **{**copied, **changes})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KFAC:
        return self.with_blocks({n: b.to(device, dtype) for n, b in self.blocks.items()})

    def _meta(self) -> dict:
        return {key: getattr(self, key) for key in _META}

    def covered_params(self) -> int:
        return sum(self.counts.get(name, b.num_params) for name, b in self.blocks.items())

    def summary(self) -> str:
        """One line per block (its structure, what it is, its parameter count), one per skipped entry (why), the
        frozen entries in one line, and the covered share of the model's trainable parameters."""
        lines = [f"KFAC curvature={self.curvature} approx={self.approx} loss={self.loss}({self.reduction}) "
                 f"N={self.n_samples}"]
        for name, block in self.blocks.items():
            tied = f" (tied: {', '.join(self.tied[name])})" if name in self.tied else ""
            lines.append(f"  {name}: {block.describe()}, P={block.num_params}{tied}")
        frozen = [name for name, reason in self.skipped.items() if reason == FROZEN]
        for name, reason in self.skipped.items():
            if name not in frozen:
                count = self.counts.get(name)
                lines.append(f"  {name}: skipped{f' ({count} parameters)' if count is not None else ''} — {reason}")
        if frozen:  # a fine-tuned model can have hundreds: listed apart, in one line
            shown = ", ".join(frozen[:8]) + (f", … ({len(frozen)} in all)" if len(frozen) > 8 else "")
            lines.append(f"  frozen (requires_grad=False; name them in layers= to include them): {shown}")
        # results saved before the trainable counts existed fall back to all parameters
        trainable = self.trainable_params or self.total_params
        covered = self.covered_trainable_params or self.covered_params()
        if trainable:
            share = 100 * covered / trainable
            frozen_count = self.total_params - trainable
            lines.append(f"  covered {covered} of {trainable} trainable parameters "
                         f"({share:.1f} %)" + (f"; {frozen_count} frozen parameters apart" if frozen_count else "")
                         + (", tied parameters counted once" if self.tied else ""))
        return "\n".join(lines)

    def save(self, path) -> None:
        """Save as plain tensors and strings (loaded with ``torch.load(weights_only=True)``: no code runs)."""
        storage.save(path, self._meta(), self.blocks)

    @classmethod
    def load(cls, path, map_location: torch.device | str | None = None) -> KFAC:
        """Load what ``save`` wrote; never unpickles code (``weights_only=True``)."""
        meta, blocks = storage.load(path, map_location)
        return cls(blocks, **meta)
