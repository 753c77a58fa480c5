"""Second moments of convolution patches from shifted products of the input — no unfolded patches.

A stride-1 convolution with zero padding reads, at output location ``o`` and kernel offset ``i``, the input at
``q = o + d∘i − p`` (``d`` dilation, ``p`` the leading padding; ``x = 0`` outside the input). Summed over the
samples and output locations, the block of ``Σ ā āᵀ`` between offsets ``i`` and ``i'`` (``c_in × c_in``) is

    A_{i,i'} = Σ_{q ∈ W_i} x(q) x(q + d∘Δ)ᵀ,   Δ = i' − i,   W_i = {o + d∘i − p : o an output location} ∩ input.

That is the full correlation ``C_Δ = Σ_{q ∈ input} x(q) x(q + d∘Δ)ᵀ`` minus the same sum over the input positions
outside ``W_i`` — a border of at most the padding's width, split by inclusion–exclusion into the rows outside the
window's row range (full width), the columns outside its column range (full height) and, added back, their
crossings; one product per row range serves every kernel offset sharing it. ``C_{−Δ} = C_Δᵀ``, so
``((2k_h − 1)(2k_w − 1) + 1)/2`` products over all input positions (13 for a 3×3 kernel) replace the ``(k_h k_w)²``
block products over all output locations of an unfolded patch matrix (81), plus small products over the border
strips.

``C_Δ`` is one product of two shifted views of the input flattened per channel, after ``d(k − 1)`` zero rows and
columns are appended to every sample: a shift of at most that many then lands on zeros, never on the next row
or sample. The result is the same matrix as from unfolded patches (up to rounding; tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Geometry:
    """A stride-1 zero-padded convolution over 1 or 2 spatial axes (a 1-D one is a height-1 2-D one): kernel,
    dilation and ``F.pad``-ordered padding ``[left, right, top, bottom]`` (1-D: ``[left, right]``)."""

    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    pad: tuple[int, ...]

    @property
    def planar(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]]:
        if len(self.kernel) == 1:
            return (1, self.kernel[0]), (1, self.dilation[0]), (*self.pad, 0, 0)
        return tuple(self.kernel), tuple(self.dilation), tuple(self.pad)


def patch_moments_elements(geometry: Geometry, inputs: Tensor) -> int:
    """Elements of the temporaries ``patch_moments`` builds per sample (for chunking the batch)."""
    (kh, kw), (dh, dw), _ = geometry.planar
    h, w = (1, inputs.shape[-1]) if len(geometry.kernel) == 1 else inputs.shape[-2:]
    # the zero-extended copy; the border strips are a small fraction of it
    return inputs.shape[1] * (h + dh * (kh - 1)) * (w + dw * (kw - 1))


def patch_moments(geometry: Geometry, inputs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, int]:
    """``(Σ ā āᵀ, Σ ā, rows)`` over the samples and output locations of ``inputs`` (``N, c_in, *spatial``), without
    the bias entry; ``ā`` in channel-major patch order (that of ``weight.flatten()``), ``rows = N · locations``.
    """
    x, (pad_top, pad_left), (h_out, w_out) = _as_2d(geometry, inputs.to(dtype))
    (kh, kw), (dh, dw), _ = geometry.planar
    n, c, h, w = x.shape
    correlations = _full_correlations(x, kh, kw, dh, dw)
    outside_rows = [_outside(_window(dh * i - pad_top, h_out, h), h) for i in range(kh)]
    outside_cols = [_outside(_window(dw * j - pad_left, w_out, w), w) for j in range(kw)]
    all_rows, all_cols = [(0, h)], [(0, w)]
    row_shifts = [(i2, j2) for i2 in range(kh) for j2 in range(-(kw - 1), kw)]  # (i', Δ_w)
    col_shifts = [(i2, j2) for i2 in range(-(kh - 1), kh) for j2 in range(kw)]  # (Δ_h, j')
    by_row = [_border_products(x, outside_rows[i], all_cols, [(i2 - i, delta_w) for i2, delta_w in row_shifts], dh, dw)
              for i in range(kh)]
    by_col = [_border_products(x, all_rows, outside_cols[j], [(delta_h, j2 - j) for delta_h, j2 in col_shifts], dh, dw)
              for j in range(kw)]
    total = x.sum((0, 2, 3))
    gram = x.new_empty(c, kh, kw, c, kh, kw)
    sums = x.new_empty(c, kh, kw)
    partners = [(i2, j2) for i2 in range(kh) for j2 in range(kw)]
    for i in range(kh):
        for j in range(kw):
            corner = _border_products(x, outside_rows[i], outside_cols[j], [(i2 - i, j2 - j) for i2, j2 in partners],
                                      dh, dw)
            sums[:, i, j] = total - by_row[i][1] - by_col[j][1] + corner[1]
            for k, (i2, j2) in enumerate(partners):
                gram[:, i, j, :, i2, j2] = (_correlation(correlations, i2 - i, j2 - j)
                                            - by_row[i][0][row_shifts.index((i2, j2 - j))]
                                            - by_col[j][0][col_shifts.index((i2 - i, j2))] + corner[0][k])
    d = c * kh * kw
    return gram.reshape(d, d), sums.reshape(d), n * h_out * w_out


def _correlation(correlations: dict[tuple[int, int], Tensor], delta_h: int, delta_w: int) -> Tensor:
    if delta_h > 0 or (delta_h == 0 and delta_w >= 0):
        return correlations[(delta_h, delta_w)]
    return correlations[(-delta_h, -delta_w)].T


def _border_products(x: Tensor, rows: list[tuple[int, int]], cols: list[tuple[int, int]], shifts: list[tuple[int, int]],
                     dh: int, dw: int) -> tuple[Tensor, Tensor]:
    """For the input positions ``q`` in ``rows × cols`` (unions of intervals): ``Σ_q x(q) x(q + d∘s)ᵀ`` for every
    shift ``s`` (``(K, c, c)``) and ``Σ_q x(q)`` — zeros for an empty region. One product for all shifts whose
    partner region overlaps the input (the others are zero: with "same" padding most of them)."""
    n, c, h, w = x.shape
    products, total = x.new_zeros(len(shifts), c, c), x.new_zeros(c)
    rectangles = [(r, cc) for r in rows for cc in cols]

    def overlap(rect: tuple, shift: tuple[int, int]) -> tuple[int, int, int, int, int, int] | None:
        (r0, r1), (c0, c1) = rect
        top, left = r0 + dh * shift[0], c0 + dw * shift[1]
        a0, a1, b0, b1 = max(top, 0), min(top + r1 - r0, h), max(left, 0), min(left + c1 - c0, w)
        return (top, left, a0, a1, b0, b1) if a1 > a0 and b1 > b0 else None

    live = [k for k, shift in enumerate(shifts) if any(overlap(rect, shift) for rect in rectangles)]
    if not live:
        for (r0, r1), (c0, c1) in rectangles:
            total += x[:, :, r0:r1, c0:c1].sum((0, 2, 3))
        return products, total
    regions, partners = [], []
    for rect in rectangles:
        (r0, r1), (c0, c1) = rect
        regions.append(x[:, :, r0:r1, c0:c1].transpose(0, 1).reshape(c, -1))
        shifted = x.new_zeros(len(live), c, n, r1 - r0, c1 - c0)
        for slot, k in enumerate(live):  # the partner region, zero where it leaves the input
            box = overlap(rect, shifts[k])
            if box is not None:
                top, left, a0, a1, b0, b1 = box
                shifted[slot, :, :, a0 - top : a1 - top, b0 - left : b1 - left] = x[:, :, a0:a1, b0:b1].transpose(0, 1)
        partners.append(shifted.reshape(len(live) * c, -1))
    region = torch.cat(regions, dim=1) if len(regions) > 1 else regions[0]
    partner = torch.cat(partners, dim=1) if len(partners) > 1 else partners[0]
    products[live] = (region @ partner.T).reshape(c, len(live), c).transpose(0, 1)
    return products, total + region.sum(1)


def _as_2d(geometry: Geometry, inputs: Tensor) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
    """The input as ``(N, c, H, W)`` (a 1-D input as height 1), the leading paddings and the output size."""
    (kh, kw), (dh, dw), pad = geometry.planar  # F.pad order: last axis first
    if len(geometry.kernel) == 1:
        inputs = inputs.unsqueeze(2)
    h, w = inputs.shape[2:]
    h_out = h + pad[2] + pad[3] - dh * (kh - 1)
    w_out = w + pad[0] + pad[1] - dw * (kw - 1)
    return inputs, (pad[2], pad[0]), (h_out, w_out)


def _full_correlations(x: Tensor, kh: int, kw: int, dh: int, dw: int) -> dict[tuple[int, int], Tensor]:
    """``C_Δ`` for the half plane of offsets ``Δ`` (``Δ_h > 0``, or ``Δ_h = 0`` and ``Δ_w ≥ 0``)."""
    n, c, h, w = x.shape
    mh, mw = dh * (kh - 1), dw * (kw - 1)
    flat = x.new_zeros(c, n, h + mh, w + mw)
    flat[:, :, :h, :w] = x.transpose(0, 1)
    flat = flat.reshape(c, -1)
    length, row = flat.shape[1], w + mw
    correlations = {}
    for delta_h in range(kh):
        for delta_w in range(-(kw - 1), kw):
            if delta_h == 0 and delta_w < 0:
                continue
            shift = dh * delta_h * row + dw * delta_w
            correlations[(delta_h, delta_w)] = flat[:, : length - shift] @ flat[:, shift:].T
    return correlations


def _window(start: int, n_out: int, n_in: int) -> tuple[int, int]:
    """Input indices ``[start, start + n_out)`` read at one kernel offset, clipped to the input."""
    lo = min(max(start, 0), n_in)
    return lo, min(max(start + n_out, lo), n_in)


def _outside(window: tuple[int, int], n_in: int) -> list[tuple[int, int]]:
    """The intervals of ``[0, n_in)`` outside ``window``, empty ones left out."""
    return [(a, b) for a, b in ((0, window[0]), (window[1], n_in)) if b > a]
