"""A/B in one process: a convolution's ``Σ ā āᵀ`` from shifted products of the input vs unfolded patches.

Usage: python -m benchmarks.patch_moments [--n 256] [--repeats 7]
The stride-1 3×3 convolutions of the ResNet-style CNN of the ``cnn`` workload in ``benchmarks.models`` (inputs
32×32×3 → widths 32/64/128), float32. Both paths accumulate the same matrix (upper strips for the unfolded path, as
``compute_kfac`` does); the table gives median seconds, the ratio, and the largest difference relative to the largest
entry.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from kfac_hessian.gram import add_gram, feature_major, symmetrize_
from kfac_hessian.layers.conv import ConvKind, padding_amounts
from kfac_hessian.layers.patch_moments import Geometry, patch_moments

SHAPES = [(3, 32, 32), (32, 32, 32), (64, 64, 16), (128, 128, 8)]  # (c_in, c_out, image side)


def unfolded(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    rows = feature_major(ConvKind().input_rows(conv, x), x.dtype)
    gram = torch.zeros(rows.shape[0], rows.shape[0])
    add_gram(gram, rows)
    return symmetrize_(gram)


def shifted(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    geometry = Geometry(tuple(conv.kernel_size), tuple(conv.dilation), tuple(padding_amounts(conv)))
    return patch_moments(geometry, x, x.dtype)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"# Patch moments, N={args.n}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| layer | unfolded patches s | shifted products s | unfolded / shifted | max rel. difference |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for c_in, c_out, side in SHAPES:
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        x = torch.randn(args.n, c_in, side, side, generator=g).relu()
        times = {"unfold": [], "shift": []}
        reference, ours = unfolded(conv, x), shifted(conv, x)
        for _ in range(args.repeats):
            for name, fn in (("unfold", unfolded), ("shift", shifted)):
                start = time.perf_counter()
                fn(conv, x)
                times[name].append(time.perf_counter() - start)
        t_u, t_s = statistics.median(times["unfold"]), statistics.median(times["shift"])
        difference = float((ours - reference).abs().max() / reference.abs().max())
        print(f"| {c_in}→{c_out}, 3×3, {side}×{side} | {t_u:.4f} | {t_s:.4f} | {t_u / t_s:.1f}× | {difference:.1e} |")


if __name__ == "__main__":
    main()
