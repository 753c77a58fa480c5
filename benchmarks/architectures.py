"""Real architectures end to end: a digits MLP, ResNet-18 with BatchNorm and a small GPT with tied embeddings.

Usage: python -m benchmarks.architectures [--train-seconds 60] [--k 10] [--quick] [--output FILE]
For each model: compute_kfac (GGN), eigendecompositions of every factor (timed), the summary's coverage, and
for a few layers the overlap of the KFAC, EKFAC and nearest-Kronecker top-k eigenspaces with the exact GGN block's
(block Lanczos), their λ₁ against the exact one, and the Lanczos products from a warm (Kronecker) start.
The GPT is trained for --train-seconds on the characters of Python's own argparse source (shipped with
Python, nothing downloaded). Writes docs/results/architectures.md; --quick (a smoke run of about a minute: ResNet-18 at
width 16, a GPT of width 32 and context 8, fewer layers) prints only, unless --output is given.
"""

from __future__ import annotations

import argparse
import inspect
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import kfac_hessian as kh
from benchmarks.reference_models import ResNet18, TinyGPT
from kfac_hessian.blocks import KroneckerBlock

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def overlaps(model, loss_fn, data, layers, k, dense_limit=2000, fit_iterations=3, **options):
    """Per layer: the top-k eigenspace overlap and λ₁ ratio of KFAC, EKFAC and the nearest Kronecker product with the
    exact GGN block (block Lanczos), and the Lanczos products from a random start and from the Kronecker top-k
    eigenvectors (``start=``). ``options`` go to every factor computation (``per_position``)."""
    timings = {}
    kfac, timings["kfac"] = timed(lambda: kh.compute_kfac(model, loss_fn, data, layers=layers, **options))
    ekfac, timings["ekfac"] = timed(lambda: kh.compute_ekfac(model, loss_fn, data, kfac=kfac, **options))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fixed number of passes: the last change is reported below
        fit, timings["fit"] = timed(lambda: kh.compute_kronecker_fit(model, loss_fn, data, kfac=kfac,
                                                                     iterations=fit_iterations, tol=0.0, **options))
    rows = []
    for name in layers:
        k_layer = min(k, kfac[name].num_params - 1)
        op = kh.layer_operator(model, loss_fn, data, name, kind="ggn")
        result, seconds = timed(kh.lanczos, op, k_layer, tol=1e-3, seed=0, dense_limit=dense_limit)
        row = {"layer": name, "structure": type(kfac[name]).__name__, "P": kfac[name].num_params, "k": k_layer,
               "exact_seconds": seconds, "matvecs": result.n_matvecs}
        for label, approximation in (("kfac", kfac), ("ekfac", ekfac), ("fit", fit)):
            values, vectors = approximation[name].eig().topk(k_layer)
            row[f"{label}_overlap"] = kh.eigenspace_overlap(vectors, result.eigenvectors)
            row[f"{label}_top_ratio"] = float(values[0] / result.eigenvalues[0])
        if isinstance(kfac[name], KroneckerBlock) and kfac[name].num_params > dense_limit:
            start = kfac[name].eig().topk(k_layer)[1]
            warm = kh.lanczos(op, k_layer, tol=1e-3, seed=0, dense_limit=dense_limit, start=start)
            row["warm_matvecs"] = warm.n_matvecs
        rows.append(row)
        print(rows[-1], flush=True)
    return rows, timings


def digits_section(args):
    from benchmarks.datasets import load_tabular
    from benchmarks.reference_models import relu_mlp

    split = load_tabular("digits")
    torch.manual_seed(0)
    model = relu_mlp((64, 128, 128, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    steps = 100 if args.quick else 1000
    for _ in range(steps):
        index = torch.randint(0, len(split.X_train), (64,), generator=g)
        loss = loss_fn(model(split.X_train[index]), split.y_train[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model(split.X_train).argmax(1) == split.y_train).float().mean())
    data = list(zip(split.X_train.split(512), split.y_train.split(512)))
    kfac, t_factors = timed(lambda: kh.compute_kfac(model, loss_fn, data))
    _, t_eig = timed(lambda: kfac.eig(vectors=True))
    _, t_eig_values = timed(lambda: kfac.eig(vectors=False))
    rows, costs = overlaps(model, loss_fn, data, ["0", "2", "4"], args.k, dense_limit=1000)
    extra = (f"Trained {steps} Adam steps (batch 64, lr 1e-3) on the {len(split.X_train)} training images: training "
             f"accuracy {accuracy:.3f}. Every measurement on all training images.")
    return {"name": "ReLU MLP 64-128-128-10 on scikit-learn digits",
            "params": sum(p.numel() for p in model.parameters()), "t_factors": t_factors, "t_eig": t_eig,
            "t_eig_values": t_eig_values, "summary": kfac.summary().splitlines()[-1], "rows": rows, "costs": costs,
            "exact_n": len(split.X_train), "extra": extra}


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
    rows, costs = overlaps(model, loss_fn, data[:1], layers, args.k)
    width = 16 if args.quick else 64
    return {"name": f"ResNet-18 (width {width}, random 32×32 inputs, N={args.n_images})",
            "params": sum(p.numel() for p in model.parameters()), "t_factors": t_factors, "t_eig": t_eig,
            "t_eig_values": t_eig_values, "summary": kfac.summary().splitlines()[-1], "rows": rows, "costs": costs,
            "exact_n": 32, "extra": ""}


def train_tiny_gpt(seconds: float, dim: int, model=None, context: int = 64, n_eval: int = 64):
    """TinyGPT (or ``model``, any module mapping (N, T) tokens to (N, V, T) logits) trained with AdamW for ``seconds``
    on the characters of argparse's source; returns ``(model, vocabulary, eval batches of 32, info)``."""
    text = inspect.getsource(argparse)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text])
    torch.manual_seed(0)
    model = model if model is not None else TinyGPT(len(chars), dim=dim, depth=2, heads=4, context=context)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    start, steps, first = time.perf_counter(), 0, None
    while time.perf_counter() - start < seconds:
        offsets = torch.randint(0, len(ids) - context - 1, (32,), generator=g)
        batch = torch.stack([ids[o : o + context + 1] for o in offsets])
        loss = loss_fn(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
        steps += 1
    offsets = torch.randint(0, len(ids) - context - 1, (n_eval,), generator=g)
    batch = torch.stack([ids[o : o + context + 1] for o in offsets])
    data = list(zip(batch[:, :-1].split(32), batch[:, 1:].split(32)))
    info = (f"Trained {steps} AdamW steps in {seconds:.0f} s on {len(text)} characters of argparse's source "
            f"(vocabulary {len(chars)}): training loss {first:.2f} → {loss.item():.2f}.")
    return model, len(chars), data, info


def gpt_section(args):
    context, dim = (8, 32) if args.quick else (64, 64)  # --quick: V·8 per-position passes a batch, not V·64
    model, vocabulary, data, info = train_tiny_gpt(args.train_seconds, dim, context=context)
    loss_fn = nn.CrossEntropyLoss()
    kfac, t_factors = timed(lambda: kh.compute_kfac(model, loss_fn, data))
    _, t_eig = timed(lambda: kfac.eig(vectors=True))
    _, t_eig_values = timed(lambda: kfac.eig(vectors=False))
    layers = ["blocks.0.q", "blocks.1.mlp.0", "ln", "pos", "tok", "head"]
    # the same batch as the exact path, per-position columns: the per-sample gradients of the exact GGN
    rows, costs = overlaps(model, loss_fn, data[:1], layers if not args.quick else layers[:2], args.k,
                           dense_limit=200 if args.quick else 2000, fit_iterations=2, per_position=True)
    extra = (f"{info} The exact-batch factors use per-position columns (`per_position=True`: the exact GGN's "
             f"per-sample gradients, {vocabulary}·{context} backward passes per batch).")
    return {"name": f"TinyGPT (dim {dim}, 2 blocks, context {context}, tied head)",
            "params": sum(p.numel() for p in model.parameters()), "t_factors": t_factors, "t_eig": t_eig,
            "t_eig_values": t_eig_values, "summary": kfac.summary().splitlines()[-1], "rows": rows, "costs": costs,
            "exact_n": 32, "extra": extra}


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
    sections = [digits_section(args), resnet_section(args), gpt_section(args)]
    lines = ["# Real architectures (generated)", "",
             f"Command: `python -m benchmarks.architectures --train-seconds {args.train_seconds:.0f} --k {args.k}` "
             f"({time.strftime('%Y-%m-%d')}, CPU, {torch.get_num_threads()} threads, float32). "
             "Overlap = ‖V_K V_Eᵀ‖²_F / k between an approximation's top-k eigenvectors and the exact GGN block's "
             "(block Lanczos, residual tol 1e-3), on one batch of 32 (all training images for the MLP): KFAC "
             "(G ⊗ A; exact dense blocks for normalization layers), EKFAC (`compute_ekfac`: the Kronecker eigenbasis "
             "with the exact second moments) and the nearest Kronecker product (`compute_kronecker_fit`, "
             "3 power-iteration passes; 2 for the GPT). Every EKFAC eigenvalue is a Rayleigh quotient of the exact "
             "block, so its λ₁ ratio is at most 1. The last column: Lanczos products to the same tolerance started "
             "from the Kronecker top-k eigenvectors (`lanczos(start=…)`) instead of a random vector.", ""]
    for s in sections:
        lines += [f"## {s['name']}: {s['params']:,} parameters", "", s["extra"], "",
                  f"compute_kfac (ggn): {s['t_factors']:.1f} s; eig of all factors: {s['t_eig']:.2f} s with vectors, "
                  f"{s['t_eig_values']:.2f} s values only. Summary: {s['summary'].strip()}", "",
                  f"On the exact batch, for the layers below: compute_kfac {s['costs']['kfac']:.2f} s, compute_ekfac "
                  f"(eigenvectors + one pass) {s['costs']['ekfac']:.2f} s, compute_kronecker_fit "
                  f"{s['costs']['fit']:.2f} s.", "",
                  "| layer | structure | P | k | top-k overlap KFAC / EKFAC / fit | "
                  "λ₁ ÷ exact λ₁: KFAC / EKFAC / fit | exact Lanczos s (matvecs) | matvecs from the Kronecker top-k |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            overlap = " / ".join(f"{r[f'{m}_overlap']:.3f}" for m in ("kfac", "ekfac", "fit"))
            ratio = " / ".join(f"{r[f'{m}_top_ratio']:.3f}" for m in ("kfac", "ekfac", "fit"))
            warm = str(r["warm_matvecs"]) if "warm_matvecs" in r else "– (dense)"
            lines.append(f"| {r['layer']} | {r['structure']} | {r['P']:,} | {r['k']} | {overlap} | {ratio} | "
                         f"{r['exact_seconds']:.1f} ({r['matvecs']}) | {warm} |")
        lines.append("")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
