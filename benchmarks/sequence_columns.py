"""Sequence outputs: joint columns vs random signs per position (``position_signs``) vs per-position columns.

Usage: python -m benchmarks.sequence_columns [--train-seconds 30] [--draws 1,2,4,6] [--quick] [--output FILE]

For (N, V, T) logits the default GGN columns are the loss-Hessian square root of all positions at once: ``K = V``
backward passes, but the blocks of parameters shared over positions (LayerNorms, embeddings, key/value projections,
…) then carry cross-position products. ``per_position=True`` is exact at ``V·T`` passes; ``position_signs=R`` is an
unbiased estimate at ``V·R``. For TinyGPT and transformers' GPT-2 (a tiny config, character vocabulary), both trained
on argparse's source, every block where the three differ is compared with the per-position one: relative Frobenius
error (for Kronecker blocks ``‖G − G_pp‖/‖G_pp‖``, as ``A`` does not depend on the columns) and ``λ₁ / λ₁(pp)``.
Writes docs/results/sequence_columns.md (--quick: a smoke run that prints only).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import kfac_hessian as kh
from benchmarks.architectures import train_tiny_gpt
from kfac_hessian.blocks import DenseBlocks, KroneckerBlock

ROOT = Path(__file__).resolve().parent.parent


class GPT2Logits(nn.Module):
    """transformers' GPT-2 (tiny config, nothing downloaded) returning (N, V, T) logits."""

    def __init__(self, vocabulary: int, dim: int, context: int):
        super().__init__()
        import transformers

        config = transformers.GPT2Config(n_layer=2, n_embd=dim, n_head=4, vocab_size=vocabulary, n_positions=context,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        self.gpt2 = transformers.GPT2LMHeadModel(config)

    def forward(self, tokens):
        return self.gpt2(input_ids=tokens).logits.transpose(1, 2)


def _error(block, reference) -> float:
    if isinstance(block, KroneckerBlock):
        return float((block.G - reference.G).norm() / reference.G.norm())
    dense, ref = block.to_dense(), reference.to_dense()
    return float((dense - ref).norm() / ref.norm())


def _top(block) -> float:
    return float(block.eig().top_eigenvalues(1)[0])


def measure(name, model, data, vocabulary, context, draws):
    loss_fn = nn.CrossEntropyLoss()
    timings = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the joint columns' warning, attention kernels
        reference, timings["per_position"] = timed(lambda: kh.compute_kfac(model, loss_fn, data, per_position=True))
        results = {"joint": timed(lambda: kh.compute_kfac(model, loss_fn, data, position_signs=0))}
        for r in draws:
            results[f"signs R={r}"] = timed(kh.compute_kfac, model, loss_fn, data, position_signs=r, seed=0)
    joint = results["joint"][0]
    names = [n for n in reference if _error(joint[n], reference[n]) > 1e-3]  # blocks with cross-position terms
    lines = [f"## {name}", "",
             f"Passes per batch: per-position {vocabulary}·{context} = {vocabulary * context} "
             f"({timings['per_position']:.1f} s for all blocks), joint {vocabulary} ({results['joint'][1]:.1f} s), "
             + ", ".join(f"signs R={r}: {vocabulary * r} = {r / context:.3g} of per-position "
                         f"({results[f'signs R={r}'][1]:.1f} s)" for r in draws) + ".", "",
             f"{len(names)} of {len(reference)} blocks differ between joint and per-position columns (the others reach "
             "only their own output position, as the last block's output projection and MLP and the head do).", "",
             "| block | structure | " + " | ".join(f"{label}: error, λ₁ ratio" for label in results) + " |",
             "|---|---|" + "---|" * len(results)]
    for n in names:
        cells = [f"{_error(r[0][n], reference[n]):.3f}, {_top(r[0][n]) / _top(reference[n]):.2f}"
                 for r in results.values()]
        lines.append(f"| {n} | {type(reference[n]).__name__} | " + " | ".join(cells) + " |")
    worst = {label: max(_error(r[0][n], reference[n]) for n in names) for label, r in results.items()}
    norms = [n for n in names if isinstance(reference[n], DenseBlocks)]
    worst_norm = {label: max((_error(r[0][n], reference[n]) for n in norms), default=float("nan"))
                  for label, r in results.items()}
    lines += ["", "Largest error over these blocks: " + ", ".join(f"{k} {v:.3f}" for k, v in worst.items())
              + "; over the normalization blocks: " + ", ".join(f"{k} {v:.3f}" for k, v in worst_norm.items()) + ".",
              ""]
    print("\n".join(lines), flush=True)
    return lines


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=30.0)
    parser.add_argument("--draws", default="1,2,4,6", help="comma-separated R for position_signs")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small models, 8 positions; prints only")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    draws = [int(r) for r in args.draws.split(",")]
    dim, context = (16, 8) if args.quick else (64, 64)
    seconds = 2.0 if args.quick else args.train_seconds
    if args.output is None and not args.quick:
        args.output = ROOT / "docs" / "results" / "sequence_columns.md"
    lines = ["# Sequence columns: joint vs random signs vs per position (generated)", "",
             f"Command: `python -m benchmarks.sequence_columns --train-seconds {seconds:.0f} --draws {args.draws}` "
             f"({time.strftime('%Y-%m-%d')}, CPU, {torch.get_num_threads()} threads, float32); one batch of 32 "
             "sequences. Error = ‖block − per-position block‖_F / ‖per-position block‖_F (for Kronecker "
             "blocks that of G); λ₁ ratio = λ₁(block) / λ₁(per-position block). Per-position columns give the exact "
             "GGN's outer products; the signs estimate them without bias (`position_signs=1` is the default, the joint "
             "columns are `position_signs=0`).", ""]
    model, vocabulary, data, info = train_tiny_gpt(seconds, dim, context=context, n_eval=32)
    lines += measure(f"TinyGPT (dim {dim}, 2 blocks, context {context})", model.eval(), data, vocabulary, context,
                     draws) + [info, ""]
    if importlib.util.find_spec("transformers") is None:
        lines.append("transformers is not installed: GPT-2 skipped.")
    else:
        # transformers' GPT-2 is ~10× slower per backward pass here: a shorter context keeps per-position feasible
        short = context if args.quick else 16
        torch.manual_seed(0)
        gpt2 = GPT2Logits(vocabulary, dim, short)
        gpt2, vocabulary, data, info = train_tiny_gpt(seconds, dim, model=gpt2, context=short, n_eval=32)
        lines += measure(f"transformers GPT-2 (n_embd {dim}, 2 layers, context {short}, tied head)", gpt2.eval(),
                         data, vocabulary, short, draws) + [info, ""]
    if args.output is not None:
        args.output.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
