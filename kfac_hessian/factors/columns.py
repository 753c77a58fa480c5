"""The columns backpropagated from the model output, and how they are grouped into backward passes.

Per curvature (``losses`` has the conventions): the loss-Hessian square-root columns (``"ggn"``, ``K`` = size of
the feature axis, less one for cross-entropy), ``mc_samples`` gradients at labels drawn from the model (``"mc"``),
or the gradient at the true labels (``"empirical"``); each ``(K, *output.shape)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..losses import LossSpec, hessian_sqrt_columns, output_gradient, sample_output_gradients
from .options import Curvature


def output_columns(spec: LossSpec, curvature: Curvature, output: Tensor, target: Tensor, mc_samples: int,
                   generator) -> Tensor:
    """Columns ``(K, *output.shape)`` backpropagated from the output for ``curvature``."""
    if curvature == "ggn":
        return hessian_sqrt_columns(spec, output)
    if curvature == "mc":
        return sample_output_gradients(spec, output, mc_samples, generator)
    return output_gradient(spec, output.detach(), target).unsqueeze(0)


def column_chunks(columns: Tensor, size: int, per_position: bool = False, position_signs: int = 0,
                  generator: torch.Generator | None = None) -> tuple[int, Iterator[Tensor]]:
    """``(count, chunks of ≤ size columns)``, built lazily chunk by chunk. ``per_position``: every column is split into
    one column per output position (zero elsewhere) — ``K·T`` columns instead of ``K``. ``position_signs = R``: ``R``
    draws of every column with independent random signs at each (sample, position), scaled by ``1/√R`` — ``K·R``
    columns whose outer products average the ``R`` draws."""
    if columns.dim() <= 3 or not (per_position or position_signs):  # (K, N) or (K, N, C): one position per sample
        chunks = columns.split(size)
        return len(chunks), iter(chunks)
    k, n, c = columns.shape[:3]
    flat = columns.reshape(k, n, c, -1)
    positions = flat.shape[-1]
    if position_signs:
        def signed() -> Iterator[Tensor]:
            draws = [(col, r) for r in range(position_signs) for col in range(k)]
            for start in range(0, len(draws), size):
                part = draws[start : start + size]
                signs = torch.randint(0, 2, (len(part), n, 1, positions), generator=generator).to(columns.device)
                chunk = flat[[col for col, _ in part]] * ((2 * signs - 1) / position_signs**0.5).to(columns.dtype)
                yield chunk.reshape(len(part), *columns.shape[1:])

        return -(-k * position_signs // size), signed()
    pairs = torch.cartesian_prod(torch.arange(k), torch.arange(positions)).to(columns.device)

    def generate() -> Iterator[Tensor]:
        for start in range(0, len(pairs), size):
            col, pos = pairs[start : start + size].unbind(1)
            chunk = flat.new_zeros(len(col), n, c, positions)
            chunk[torch.arange(len(col), device=columns.device), :, :, pos] = flat[col, :, :, pos]
            yield chunk.reshape(len(col), *columns.shape[1:])

    return -(-len(pairs) // size), generate()


def one_column_per_pass(column_chunk: int | None, device: torch.device, curvature: Curvature, mc_samples: int) -> bool:
    """Whether every backward pass carries a single column (then its gradients are streamed into the sums):
    ``column_chunk=1``; by default on the CPU; and wherever there is only one column per sample."""
    if column_chunk is not None:
        return column_chunk == 1
    return device.type != "cuda" or curvature == "empirical" or (curvature == "mc" and mc_samples == 1)
