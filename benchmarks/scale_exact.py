"""The exact path at scale: one attention block of full-size GPT-2, its exact top eigenpairs, and the Kronecker
approximations of that block measured against them.

Usage: python -m benchmarks.scale_exact [--quick] [--out docs/results/scale_exact.md] [--keep DIR] [--repeats 3]
       [--column-signs 8] [--kinds ggn,hessian]

The model and the batch are those of ``benchmarks/scale.py`` (transformers' ``GPT2Config()`` defaults, random init
with a fixed seed, nothing downloaded; one batch of 2 × 128 tokens, cross-entropy on the shifted tokens,
``output=kh.sequence_logits``). The block is ``transformer.h.5.attn.c_attn`` (768 + 1 → 2304: 1.77 M parameters),
its weight then its bias, flattened row-major (public order). In order, one process:

1. ``costs``: one gradient (forward+backward of the batch) and one exact GGN and one exact Hessian product of the
   block, interleaved, after one warm-up round; medians of ``--repeats`` rounds;
2. ``approximations``: ``compute_kfac(curvature="mc", layers=[block])``; ``curvature="ggn"`` with ``column_signs=R``
   when ``kh.plan`` admits it (R random-sign combinations of the loss-Hessian square-root columns: an unbiased
   estimate); EKFAC and the Kronecker fit on the mc factors;
3. per ``--kinds``: ``kh.lanczos(kh.layer_operator(..., kind=kind), 5, seed=0)``, its products and wall time, and
   every approximation against it: λ₁ ratio, top-5 eigenvalues, top-5 subspace overlap
   (``kh.eigenspace_overlap``), ``‖B̂ v − B v‖ / ‖B v‖`` on the exact top eigenvectors ``v`` (``B v = λ v``, up to
   the Lanczos residual).

These are LAYER blocks: one layer's own curvature (the exact one against its approximations; the cross-layer
curvature is absent from both by construction) — not the whole-model Hessian against its block diagonal.
``--keep DIR``: the costs and the exact eigenpairs are stored there (JSON, and the eigenvectors) and reused by a
rerun (the approximations, minutes, are rebuilt); the results file is rewritten after every phase. ``--quick``: a
tiny 2-layer GPT-2 config on 2 × 16 tokens (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import kfac_hessian as kh
from benchmarks.scale import batch, build, gradient
from kfac_hessian.linear_operator import LinearOperator

ROOT = Path(__file__).resolve().parent.parent
K = 5
BLOCK_LAYER = 5
# what a refused or failed approximation raises: the results file says so, and the run goes on
FAILURES = (ValueError, NotImplementedError, RuntimeError, MemoryError)


def tiny_gpt2(layers: int = 2) -> nn.Module:
    """A tiny GPT-2 config (width 16, 2 heads, vocabulary 64) with random init: the ``--quick`` mode and the tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def block_name(model: nn.Module) -> str:
    """The attention in-projection of layer 5 (the last layer of a shallower model)."""
    return f"transformer.h.{min(BLOCK_LAYER, model.config.n_layer - 1)}.attn.c_attn"


def exact_operator(model: nn.Module, loss_fn: nn.Module, data, name: str, kind: str) -> kh.exact.CurvatureOperator:
    return kh.layer_operator(model, loss_fn, data, name, kind=kind, output=kh.sequence_logits)


def product_costs(model: nn.Module, loss_fn: nn.Module, data, name: str, repeats: int = 3) -> dict:
    """Seconds of one gradient and of one exact GGN and Hessian product of the block (one vector each), measured
    interleaved — gradient, GGN, Hessian, gradient, … — after a warm-up round, so that a machine whose load changes
    slows all three alike. Returns the warm-up, every round and the medians (``"median"``, and ``"ratio"``: the
    median product over the median gradient)."""
    operators = {kind: exact_operator(model, loss_fn, data, name, kind) for kind in ("ggn", "hessian")}
    vector = torch.randn(operators["ggn"].num_params, generator=torch.Generator().manual_seed(0))
    runs: dict[str, Callable[[], object]] = {"gradient": lambda: gradient(model, loss_fn, data),
                                             **{kind: (lambda op=op: op @ vector) for kind, op in operators.items()}}
    times: dict[str, list[float]] = {label: [] for label in runs}
    warm_up = {label: _seconds(run) for label, run in runs.items()}
    for _ in range(repeats):
        for label, run in runs.items():
            times[label].append(_seconds(run))
    median = {label: statistics.median(seconds) for label, seconds in times.items()}
    return {"warm_up": warm_up, "rounds": times, "median": median,
            "ratio": {kind: median[kind] / median["gradient"] for kind in operators}}


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


class _Logged(LinearOperator):
    """An operator that prints the time of each of its products (a long Lanczos run shows its progress)."""

    def __init__(self, op: LinearOperator, label: str):
        self.op, self.label, self.count, self.start = op, label, 0, time.perf_counter()

    @property
    def num_params(self) -> int:
        return self.op.num_params

    @property
    def reference(self) -> Tensor:
        return self.op.reference

    def matmat(self, columns: Tensor) -> Tensor:
        product = self.op.matmat(columns)
        self.count += columns.shape[1]
        print(f"  {self.label}: {self.count} products, {time.perf_counter() - self.start:.0f} s, "
              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        return product


def exact_top(op: LinearOperator, k: int = K, seed: int = 0, log: bool = False,
              **options) -> tuple[kh.exact.LanczosResult, dict]:
    """``kh.lanczos(op, k, seed=seed, **options)`` with its products and wall time."""
    start, load = time.perf_counter(), os.getloadavg()[0]
    result = kh.lanczos(_Logged(op, "lanczos") if log else op, k, seed=seed, **options)
    return result, {"seconds": time.perf_counter() - start, "products": result.n_matvecs, "runs": result.n_runs,
                    "converged": result.converged, "method": result.method, "options": options,
                    "notes": result.notes,
                    "eigenvalues": result.eigenvalues.tolist(), "residuals": result.residuals.tolist(),
                    "load_before": load, "load_after": os.getloadavg()[0]}


def approximations(model: nn.Module, loss_fn: nn.Module, data, name: str, column_signs: int) -> dict:
    """label → the block's approximation and its seconds, or the reason it is absent (``"error"``): KFAC mc, KFAC
    ggn with ``column_signs`` (when ``kh.plan`` admits it), EKFAC and the Kronecker fit on the mc factors."""
    common = {"layers": [name], "output": kh.sequence_logits, "seed": 0}
    found: dict[str, dict] = {}

    def timed(label: str, run: Callable[[], kh.KFAC]) -> kh.KFAC | None:
        start = time.perf_counter()
        try:
            result = run()
        except FAILURES as error:
            found[label] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
            return None
        found[label] = {"block": result[name], "seconds": time.perf_counter() - start}
        return result

    mc = timed("KFAC mc", lambda: kh.compute_kfac(model, loss_fn, data, curvature="mc", **common))
    try:
        found["plan ggn"] = {"printout": str(kh.plan(model, loss_fn, data, curvature="ggn", column_signs=column_signs,
                                                     **common))}
    except FAILURES as error:
        found["plan ggn"] = {"printout": f"{type(error).__name__}: {error}"}
    timed(f"KFAC ggn, column_signs={column_signs}",
          lambda: kh.compute_kfac(model, loss_fn, data, curvature="ggn", column_signs=column_signs, **common))
    if mc is not None:
        timed("EKFAC (mc)", lambda: kh.compute_ekfac(model, loss_fn, data, kfac=mc, output=kh.sequence_logits))
        timed("Kronecker fit (mc)", lambda: kh.compute_kronecker_fit(model, loss_fn, data, kfac=mc, seed=0,
                                                                     output=kh.sequence_logits))
    return found


def against_exact(block: kh.CurvatureBlock, values: Tensor, vectors: Tensor) -> dict:
    """An approximation ``B̂`` of a block against the block's exact top-k pairs (``values (k,)`` descending, rows
    ``vectors (k, P)``): λ₁ ratio ``λ̂₁ / λ₁``, its top-k eigenvalues, the top-k subspace overlap
    ``‖V̂ Vᵀ‖²_F / k`` and ``‖B̂ v_i − λ_i v_i‖ / ‖λ_i v_i‖`` for each exact eigenvector (``B v = λ v``)."""
    k = len(values)
    approx_values, approx_vectors = block.eig().topk(k)
    exact_products = values[:, None] * vectors
    errors = torch.linalg.vector_norm((block @ vectors.T).T - exact_products, dim=1) / torch.linalg.vector_norm(
        exact_products, dim=1)
    # the overlap written out in float64 (kh.eigenspace_overlap refuses bases orthonormal to worse than 1e-4, and its
    # refusal forms a (P, P) matrix); how orthonormal the approximation's float32 basis is, is reported beside it
    approx64, exact64 = approx_vectors.double(), vectors.double()
    return {"lambda1_ratio": float(approx_values[0] / values[0]), "eigenvalues": approx_values.tolist(),
            "overlap": float((approx64 @ exact64.T).pow(2).sum() / k),
            "orthonormality": float((approx64 @ approx64.T - torch.eye(k, dtype=torch.float64)).abs().max()),
            "relative_errors": errors.tolist()}


def run(quick: bool, keep: Path | None, repeats: int, column_signs: int, kinds: list[str], out: Path,
        command: str, lanczos_options: dict, note: str | None = None) -> dict:
    model = tiny_gpt2() if quick else build("gpt2", 12)
    data = batch(model, 16 if quick else 128)
    loss_fn = nn.CrossEntropyLoss()
    name = block_name(model)
    stored = keep / "results.json" if keep else None
    results: dict = json.loads(stored.read_text()) if stored is not None and stored.exists() else {}
    results.update({"command": command, "block": name, "parameters": sum(p.numel() for p in model.parameters()),
                    "block_parameters": exact_operator(model, loss_fn, data, name, "ggn").num_params,
                    "tokens": int(data[1].numel()), "machine": _machine()})
    if note:
        results.setdefault("notes", []).append(note)

    def save() -> None:
        if stored is not None:
            stored.write_text(json.dumps(results, indent=1))
        out.write_text(render(results))

    if "costs" not in results:
        print("costs", file=sys.stderr, flush=True)
        results["costs"] = product_costs(model, loss_fn, data, name, repeats)
        save()
    exact = {}
    for kind in kinds:  # the exact pairs first: the approximations are measured against them
        vectors_file = keep / f"exact_{kind}.pt" if keep else None
        if vectors_file is not None and vectors_file.exists() and kind in results.get("exact", {}):
            exact[kind] = torch.load(vectors_file)
            continue
        print(f"lanczos {kind}", file=sys.stderr, flush=True)
        top, summary = exact_top(exact_operator(model, loss_fn, data, name, kind), log=not quick, **lanczos_options)
        exact[kind] = top.topk(len(top.eigenvalues))  # fewer than K when a bounded run stopped short
        results.setdefault("exact", {})[kind] = summary
        if vectors_file is not None:
            torch.save(exact[kind], vectors_file)
        save()
    print("approximations", file=sys.stderr, flush=True)
    found = approximations(model, loss_fn, data, name, column_signs)
    results["approximations"] = {label: {k: v for k, v in entry.items() if k != "block"}
                                 for label, entry in found.items()}
    results["versus"] = {kind: {label: against_exact(entry["block"], values, vectors)
                                for label, entry in found.items() if "block" in entry}
                         for kind, (values, vectors) in exact.items()}
    results["machine"]["load_end"] = os.getloadavg()
    save()
    return results


def _machine() -> dict:
    return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "load_start": os.getloadavg()}


def render(results: dict) -> str:
    machine = results["machine"]
    lines = ["# The exact path at scale: one attention block of full-size GPT-2", "",
             f"`{results['command']}` — {machine['processor']}, {machine['cpus']} CPUs, {machine['threads']} threads, "
             f"torch {machine['torch']}; load average (1, 5, 15 min) at the start "
             f"{_load(machine['load_start'])}" + (f", at the end {_load(machine['load_end'])}" if "load_end" in machine
                                                 else "") + ". The machine is shared: times vary by 2× or more.", "",
             f"Model: {results['parameters'] / 1e6:.1f} M parameters, random init from the config, nothing "
             f"downloaded; one batch of {results['tokens']} tokens, cross-entropy on the shifted tokens, "
             f"`output=kh.sequence_logits`. Block: `{results['block']}`, {results['block_parameters']:,} parameters "
             "(weight then bias).", "",
             "**Which question these numbers answer.** Every number compares a LAYER block with a LAYER block: the "
             "exact curvature of this one layer's own parameters (all other parameters fixed) against approximations "
             "of that same block. The cross-layer curvature is absent from both sides by construction, so nothing "
             "here measures what block-diagonal approximations of the whole-model Hessian drop (the question of the "
             "2026 foundation-scale study of LLM Hessians, which reports order-one errors there).", "",
             "The measurements (λ₁ ratio, overlap, relative error) equal those of a dense float64 GGN block on a tiny "
             "config: `tests/benchmarks/test_scale_exact.py::test_approximations_are_measured_as_from_their_dense_"
             "matrices`.", ""]
    if "costs" in results:
        costs = results["costs"]
        lines += ["## Cost of one exact product", "",
                  f"Interleaved (gradient, GGN product, Hessian product) × {len(costs['rounds']['gradient'])} rounds "
                  "after one warm-up round; one vector per product.", "",
                  "| | warm-up (s) | rounds (s) | median (s) | × gradient |", "|---|---|---|---|---|"]
        labels = {"gradient": "gradient (forward+backward)", "ggn": "GGN-vector product",
                  "hessian": "Hessian-vector product"}
        for key, label in labels.items():
            ratio = costs["ratio"].get(key, 1.0)
            rounds = ", ".join(f"{s:.1f}" for s in costs["rounds"][key])
            lines.append(f"| {label} | {costs['warm_up'][key]:.1f} | {rounds} | {costs['median'][key]:.2f} | "
                         f"{ratio:.2f} |")
        lines.append("")
    for kind, summary in results.get("exact", {}).items():
        lines += [f"## Exact top-{K}: {kind.upper() if kind == 'ggn' else 'Hessian'}", "",
                  f"`kh.lanczos(kh.layer_operator(..., kind=\"{kind}\"), {K}, seed=0"
                  + "".join(f", {key}={value}" for key, value in summary.get("options", {}).items())
                  + f")`: **{summary['products']} products** in {summary['runs']} runs, **{summary['seconds']:.0f} s** "
                  f"({summary['seconds'] / 60:.1f} min; load average {summary['load_before']:.1f} before, "
                  f"{summary['load_after']:.1f} after), converged: {summary['converged']}, residuals "
                  f"{_values(summary['residuals'])} (relative to λ: "
                  f"{_values([r / abs(v) for r, v in zip(summary['residuals'], summary['eigenvalues'])])})"
                  + "".join(f"; {note}" for note in summary.get("notes", [])) + ".", ""]
        lines += _versus_table(summary["eigenvalues"], results.get("versus", {}).get(kind, {}),
                               results.get("approximations", {}))
    lines += [f"*Note:* {note}" for note in results.get("notes", [])] + ([""] if results.get("notes") else [])
    approx = results.get("approximations", {})
    if approx:
        lines += ["## The approximations", "", "| | seconds | note |", "|---|---|---|"]
        for label, entry in approx.items():
            if label != "plan ggn":
                lines.append(f"| {label} | {entry['seconds']:.1f} | |" if "seconds" in entry
                             else f"| {label} | — | {entry['error']} |")
        lines += ["", "KFAC ggn with `column_signs=R` estimates the GGN's `G` from R random-sign combinations of the "
                  "loss-Hessian square-root columns (unbiased; R backward passes); EKFAC and the fit are built on the "
                  "mc factors (the same sampled labels). Its plan:", "", "```", approx["plan ggn"]["printout"], "```",
                  ""]
    lines += _meaning(results)
    return "\n".join(lines) + "\n"


def _load(load: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


def _versus_table(exact_values: list[float], versus: dict, approx: dict) -> list[str]:
    lines = ["| | λ₁ ratio | top-5 eigenvalues | top-5 overlap | ‖B̂v − Bv‖/‖Bv‖ on v₁…v₅ | max \\|V̂V̂ᵀ − I\\| |",
             "|---|---|---|---|---|---|", f"| exact | 1 | {_values(exact_values)} | 1 | 0 | |"]
    for label, row in versus.items():
        errors = ", ".join(f"{e:.2f}" for e in row["relative_errors"])
        lines.append(f"| {label} | {row['lambda1_ratio']:.3g} | {_values(row['eigenvalues'])} | "
                     f"{row['overlap']:.3f} | {errors} | {row.get('orthonormality', float('nan')):.1e} |")
    return lines + [""]


def _values(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def _meaning(results: dict) -> list[str]:
    """The numbers in words (generated from them, so a rerun keeps text and numbers together)."""
    sentences = []
    gradient = results.get("costs", {}).get("median", {}).get("gradient")
    if gradient:
        ratio = results["costs"]["ratio"]
        sentences.append(f"One exact product of the block costs {ratio['ggn']:.1f} (GGN) and {ratio['hessian']:.1f} "
                         "(Hessian) gradients of the same batch: a product runs the whole model forward, as a gradient "
                         "does, and its backward ends at the block.")
    for kind, summary in results.get("exact", {}).items():
        units = f" = {summary['seconds'] / gradient:.0f} gradients at the same load" if gradient else ""
        sentences.append(f"The exact {kind} top-{K} took {summary['products']} products, "
                         f"{summary['seconds'] / 60:.1f} min{units}.")
        rows = results.get("versus", {}).get(kind, {})
        if rows:
            errors = [e for row in rows.values() for e in row["relative_errors"]]
            sentences.append(f"Against it the λ₁ ratios run from {_spread(rows, 'lambda1_ratio')}, the top-{K} "
                             f"overlaps from {_spread(rows, 'overlap')}, and ‖B̂v − Bv‖/‖Bv‖ on its top eigenvectors "
                             f"from {min(errors):.2f} to {max(errors):.2f}.")
    if not sentences:
        return []
    return ["## What the numbers mean", "", " ".join(sentences) + " An overlap near 1 means the approximation finds "
            f"the block's top-{K} directions; a λ₁ ratio near 1 with a small overlap means the scale is right and the "
            "directions are not; a relative error near 1 means the approximation misses most of what the block does "
            "to its own top eigenvectors. All of this is within one layer's block (see above).", "",
            "EKFAC and the fit are built on the mc pass: the fit is the nearest Kronecker product to the "
            "Monte-Carlo block scale·Σ_n ĝ_n ĝ_nᵀ (ĝ_n: sample n's gradient for sampled labels, summed over its "
            "positions), whose rank is at most the number of samples — 2 here — so that block's λ₁ carries most of "
            "its trace, and the fit inherits it (a λ₁ ratio far above 1). KFAC's G ⊗ A spreads the same samples over "
            "position-level factors and is not concentrated that way. For the fit on few samples use more samples or "
            "curvature=\"ggn\" (with column_signs= at this vocabulary).", ""]


def _spread(rows: dict, key: str) -> str:
    """The smallest and the largest of one measure over the approximations, each with its label."""
    low, high = min(rows, key=lambda label: rows[label][key]), max(rows, key=lambda label: rows[label][key])
    return f"{rows[low][key]:.2f} ({low}) to {rows[high][key]:.2f} ({high})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny 2-layer GPT-2 config on 2 × 16 tokens")
    parser.add_argument("--out", type=Path, default=None, help="default: docs/results/scale_exact.md (full run)")
    parser.add_argument("--keep", type=Path, default=None, help="a folder keeping each finished phase for reuse")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the cost measurement")
    parser.add_argument("--column-signs", type=int, default=8, help="R of KFAC ggn with column_signs=R")
    parser.add_argument("--kinds", default="ggn,hessian", help="exact operators to run Lanczos on, in order")
    parser.add_argument("--tol", type=float, default=None, help="kh.lanczos' tol (default: its own, 1e-6)")
    parser.add_argument("--max-runs", type=int, default=None, help="kh.lanczos' max_runs (default: its own)")
    parser.add_argument("--note", default=None, help="a sentence about this run for the results file")
    parser.add_argument("--render-only", action="store_true", help="rewrite the results file from --keep's results")
    args = parser.parse_args()
    out = args.out or (Path("/tmp/scale_exact_quick.md") if args.quick else ROOT / "docs" / "results" /
                       "scale_exact.md")
    if args.render_only:
        if args.keep is None:
            parser.error("--render-only reads the results kept by an earlier run: give its --keep DIR")
        out.write_text(render(json.loads((args.keep / "results.json").read_text())))
        print(f"wrote {out}")
        return
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    lanczos_options = {key: value for key, value in (("tol", args.tol), ("max_runs", args.max_runs))
                       if value is not None}
    command = "python -m benchmarks.scale_exact" + (" --quick" if args.quick else "") + "".join(
        f" --{key.replace('_', '-')} {value}" for key, value in lanczos_options.items())
    run(args.quick, args.keep, args.repeats, args.column_signs, args.kinds.split(","), out, command, lanczos_options,
        args.note)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
