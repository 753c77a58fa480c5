"""The columns backpropagated from the model output, generated lazily, a chunk of backward passes at a time.

Per curvature (``losses`` has the conventions): the loss-Hessian square-root columns (``"ggn"``, ``K`` = size of
the feature axis, less one for cross-entropy), ``mc_samples`` gradients at labels drawn from the model (``"mc"``),
or the gradient at the true labels (``"empirical"``); each column shaped like the output ``(N, C, *)``.

The ``"ggn"`` columns are never formed all at once: ``K`` of them are ``K·N·C·T`` numbers — 2.6 TB for a vocabulary
of 50 257 on 256 tokens — so every chunk is computed from ``S``'s closed form (``losses.HessianSqrt``) when its
backward pass comes: memory ``O(chunk · N·C·T)``. Every variant is ``S`` applied to coefficients per (sample,
position): unit vectors (the columns), unit vectors at one position (``per_position``), unit vectors times a random
sign per (sample, position) (``position_signs``), or random signs on all ``K`` columns at once (``column_signs``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ..losses import HessianSqrt, LossSpec, output_gradient, sample_output_gradients
from .options import Curvature


class DenseColumns:
    """Columns held as one tensor ``(K, *output.shape)`` (``"mc"``, ``"empirical"``: one or a few columns), with the
    interface of ``losses.HessianSqrt``: ``rank``, ``columns(indices)`` and ``apply(coefficients)``."""

    def __init__(self, columns: Tensor):
        self.tensor, self.rank, self.dtype, self.device = columns, len(columns), columns.dtype, columns.device

    def columns(self, indices: Tensor) -> Tensor:
        return self.tensor[indices.to(self.tensor.device)]

    def apply(self, coefficients: Tensor) -> Tensor:
        """``Σ_k c_{nk…} column_k[n, :, …]`` for coefficients ``(m, N, K, *)``: ``(m, *output.shape)``."""
        k, n, c = self.tensor.shape[:3]
        flat = self.tensor.reshape(k, n, c, -1)
        combined = torch.einsum("mnkp,kncp->mncp", coefficients.reshape(len(coefficients), n, k, -1), flat)
        return combined.reshape(len(coefficients), *self.tensor.shape[1:])


Columns = HessianSqrt | DenseColumns


def output_columns(spec: LossSpec, curvature: Curvature, output: Tensor, target: Tensor, mc_samples: int,
                   generator) -> Columns:
    """The columns backpropagated from the output for ``curvature``, generated on demand (zero at targets equal to
    the loss's ``ignore_index``)."""
    if curvature == "ggn":
        return HessianSqrt(spec, output, target)
    if curvature == "mc":
        return DenseColumns(sample_output_gradients(spec, output, mc_samples, generator, target))
    return DenseColumns(output_gradient(spec, output.detach(), target).unsqueeze(0))


def column_count(rank: int, positions: int, per_position: bool = False, position_signs: int = 0,
                 column_signs: int | None = None) -> int:
    """The columns one batch backpropagates: ``rank`` (``K``), ``K·T`` per position, ``K·R`` sign draws per
    position, or ``R`` random-sign combinations (``column_signs``)."""
    if column_signs:
        return column_signs
    if positions > 1 and per_position:
        return rank * positions
    if positions > 1 and position_signs:
        return rank * position_signs
    return rank


def column_chunks(columns: Columns, shape: torch.Size, size: int | None, per_position: bool = False,
                  position_signs: int = 0, column_signs: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[int, Iterator[Tensor]]:
    """``(count, chunks of ≤ size columns)`` for an output of ``shape``, each chunk computed when it is reached
    (``size=None``: all columns in one chunk).

    * default: the ``K`` columns, each at all positions at once;
    * ``per_position``: every column split into one column per output position (zero elsewhere): ``K·T`` columns;
    * ``position_signs = R``: ``R`` draws of every column with independent random signs at each (sample,
      position), scaled by ``1/√R``: ``K·R`` columns whose outer products average the ``R`` draws;
    * ``column_signs = R``: ``R`` columns ``Σ_k s_k c_k / √R`` with independent Rademacher signs ``s`` per (draw,
      column, sample, position). ``E[s sᵀ] = I``, so ``E[Σ_r (Σ_k s_k c_k)(Σ_l s_l c_l)ᵀ / R] = Σ_k c_k c_kᵀ`` at every
      position, and the cross-position products vanish in expectation as with ``position_signs``: an unbiased
      estimate of the per-position outer products at ``R`` backward passes instead of ``K``.

    Signs come from ``generator`` (on the CPU, so that a seed gives the same draws on every device).
    """
    n, k = shape[0], columns.rank
    positions = math.prod(shape[2:]) if len(shape) > 2 else 1
    count = column_count(k, positions, per_position, position_signs, column_signs)
    size = size or count
    device, dtype = columns.device, columns.dtype

    def chunked(make) -> tuple[int, Iterator[Tensor]]:
        return -(-count // size), (make(start, min(start + size, count)) for start in range(0, count, size))

    if column_signs:
        coefficient_shape = (n, k, *shape[2:]) if len(shape) > 1 else (n,)

        def combined(start: int, stop: int) -> Tensor:
            signs = torch.randint(0, 2, (stop - start, *coefficient_shape), generator=generator)
            return columns.apply(((2 * signs - 1) / math.sqrt(column_signs)).to(device, dtype))

        return chunked(combined)
    if positions == 1 or not (per_position or position_signs):
        return chunked(lambda start, stop: columns.columns(torch.arange(start, stop, device=device)))
    if position_signs:
        def signed(start: int, stop: int) -> Tensor:
            draw = torch.arange(start, stop) % k  # draw-major: (r, column)
            signs = torch.randint(0, 2, (stop - start, n, 1, positions), generator=generator)
            coefficients = torch.zeros(stop - start, n, k, positions)
            coefficients[torch.arange(stop - start), :, draw] = (2 * signs[:, :, 0] - 1) / math.sqrt(position_signs)
            return _apply(columns, coefficients.to(device, dtype), shape)

        return chunked(signed)

    def at_one_position(start: int, stop: int) -> Tensor:
        pair = torch.arange(start, stop)  # column-major: (column, position)
        coefficients = torch.zeros(stop - start, n, k, positions)
        coefficients[torch.arange(stop - start), :, pair // positions, pair % positions] = 1
        return _apply(columns, coefficients.to(device, dtype), shape)

    return chunked(at_one_position)


def _apply(columns: Columns, coefficients: Tensor, shape: torch.Size) -> Tensor:
    """``columns.apply`` on coefficients with the positions flattened ``(m, N, K, T)``."""
    m, n, k = coefficients.shape[:3]
    return columns.apply(coefficients.reshape(m, n, k, *shape[2:])).reshape(m, *shape)


def one_column_per_pass(column_chunk: int | None, device: torch.device, curvature: Curvature, mc_samples: int) -> bool:
    """Whether every backward pass carries a single column (then its gradients are streamed into the sums):
    ``column_chunk=1``; by default on the CPU; and wherever there is only one column per sample."""
    if column_chunk is not None:
        return column_chunk == 1
    return device.type != "cuda" or curvature == "empirical" or (curvature == "mc" and mc_samples == 1)
