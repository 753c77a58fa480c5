"""Real architectures end to end: ResNet-18 with BatchNorm and a small GPT with tied embeddings.

Usage: python benchmarks/architectures.py [--train-seconds 60] [--k 10] [--quick] [--output FILE]
For each model: compute_kfac (GGN), eigendecompositions of every factor (timed), the summary's coverage, and
for a few layers the overlap of the Kronecker top-k eigenspace with the exact GGN block's (block Lanczos).
The GPT is trained for --train-seconds on the characters of Python's own argparse source (shipped with
Python, nothing downloaded). Writes docs/results/architectures.md; --quick (a smoke run of about a minute: ResNet-18 at
width 16, a smaller GPT, fewer layers) prints only, unless --output is given.
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian.models import ResNet18, TinyGPT

ROOT = Path(__file__).resolve().parent.parent


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def overlaps(kfac, model, loss_fn, data, layers, k, dense_limit=2000):
    rows = []
    for name in layers:
        factor = kfac[name]
        k_layer = min(k, factor.num_params - 1)
        k_vals, k_vecs = factor.eig().topk(k_layer)
        op = kh.layer_operator(model, loss_fn, data, name, kind="ggn")
        result, seconds = timed(lambda: kh.lanczos(op, k_layer, tol=1e-3, seed=0, dense_limit=dense_limit))
        rows.append({
            "layer": name, "structure": type(factor).__name__, "P": factor.num_params, "k": k_layer,
            "overlap": kh.eigenspace_overlap(k_vecs, result.eigenvectors),
            "top_ratio": float(k_vals[0] / result.eigenvalues[0]), "exact_seconds": seconds, "matvecs": op.n_matvecs,
        })
        print(rows[-1], flush=True)
    return rows


def resnet_section(args):
    torch.manual_seed(0)
    model = ResNet18(width=16 if args.quick else 64)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(args.n_images, 3, 32, 32, generator=g), torch.randint(0, 10, (args.n_images,), generator=g)
    data = list(zip(X.split(32), y.split(32)))
    loss_fn = nn.CrossEntropyLoss()
    kfac, t_factors = timed(lambda: kh.compute_kfac(model, loss_fn, data))
    _, t_eig = timed(lambda: kfac.eig(vectors=True))
    _, t_eig_values = timed(lambda: kfac.eig(vectors=False))
    layers = ["fc", "layers.3.1.bn2", "layers.1.0.conv1"] if not args.quick else ["fc", "layers.3.1.bn2"]
    exact_data = data[:1]
    kfac_small = kh.compute_kfac(model, loss_fn, exact_data)
    rows = overlaps(kfac_small, model, loss_fn, exact_data, layers, args.k)
    width = 16 if args.quick else 64
    return {"name": f"ResNet-18 (width {width}, random 32×32 inputs, N={args.n_images})", "params": sum(p.numel() for p in model.parameters()),
            "t_factors": t_factors, "t_eig": t_eig, "t_eig_values": t_eig_values, "summary": kfac.summary().splitlines()[-1],
            "rows": rows, "exact_n": 32, "extra": ""}


def gpt_section(args):
    text = inspect.getsource(argparse)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text])
    context = 64
    torch.manual_seed(0)
    dim = 32 if args.quick else 64
    model = TinyGPT(len(chars), dim=dim, depth=2, heads=4, context=context)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    start, steps, first = time.perf_counter(), 0, None
    while time.perf_counter() - start < args.train_seconds:
        offsets = torch.randint(0, len(ids) - context - 1, (32,), generator=g)
        batch = torch.stack([ids[o : o + context + 1] for o in offsets])
        loss = loss_fn(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        steps += 1
    offsets = torch.randint(0, len(ids) - context - 1, (64,), generator=g)
    batch = torch.stack([ids[o : o + context + 1] for o in offsets])
    data = list(zip(batch[:, :-1].split(32), batch[:, 1:].split(32)))
    kfac, t_factors = timed(lambda: kh.compute_kfac(model, loss_fn, data))
    t_per_position = float("nan") if args.quick else timed(lambda: kh.compute_kfac(model, loss_fn, data, per_position=True))[1]
    _, t_eig = timed(lambda: kfac.eig(vectors=True))
    _, t_eig_values = timed(lambda: kfac.eig(vectors=False))
    layers = ["blocks.0.q", "blocks.1.mlp.0", "ln", "pos", "tok", "head"]
    # the same batch as the exact path, per-position columns: the factors of the exact GGN's outer products
    kfac_small = kh.compute_kfac(model, loss_fn, data[:1], per_position=True)
    rows = overlaps(kfac_small, model, loss_fn, data[:1], layers if not args.quick else layers[:2], args.k,
                    dense_limit=200 if args.quick else 2000)
    extra = (f"Trained {steps} AdamW steps in {args.train_seconds:.0f} s on {len(text)} characters of argparse's source "
             f"(vocabulary {len(chars)}): training loss {first:.2f} → {loss.item():.2f}."
             + ("" if args.quick else f" Factors with per-position columns (`per_position=True`, used for the overlaps): "
                                      f"{t_per_position:.1f} s."))
    return {"name": f"TinyGPT (dim {dim}, 2 blocks, context {context}, tied head)", "params": sum(p.numel() for p in model.parameters()),
            "t_factors": t_factors, "t_eig": t_eig, "t_eig_values": t_eig_values, "summary": kfac.summary().splitlines()[-1],
            "rows": rows, "exact_n": 32, "extra": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute; prints only")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the table (default: docs/results/architectures.md; none with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.train_seconds, args.n_images, args.k = 2.0, 16, 3
    elif args.output is None:
        args.output = ROOT / "docs" / "results" / "architectures.md"
    sections = [resnet_section(args), gpt_section(args)]
    lines = ["# Real architectures (generated)", "",
             f"Command: `python benchmarks/architectures.py --train-seconds {args.train_seconds:.0f} --k {args.k}` "
             f"({time.strftime('%Y-%m-%d')}, CPU, {torch.get_num_threads()} threads, float32). Overlap = ‖V_K V_Eᵀ‖²_F / k between "
             "the Kronecker (or 2×2-block / diagonal-A) top-k eigenvectors and the exact GGN block's (block Lanczos, "
             "residual tol 1e-3), on one batch of 32.", ""]
    for s in sections:
        lines += [f"## {s['name']}: {s['params']:,} parameters", "", s["extra"], "",
                  f"compute_kfac (ggn): {s['t_factors']:.1f} s; eig of all factors: {s['t_eig']:.2f} s with vectors, "
                  f"{s['t_eig_values']:.2f} s values only. Summary: {s['summary'].strip()}", "",
                  "| layer | structure | P | k | overlap with exact top-k | λ₁ Kronecker / exact | exact Lanczos s (matvecs) |",
                  "|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['layer']} | {r['structure']} | {r['P']:,} | {r['k']} | {r['overlap']:.3f} | {r['top_ratio']:.3f} | "
                         f"{r['exact_seconds']:.1f} ({r['matvecs']}) |")
        lines.append("")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
