"""Real scale: full-size language models from transformers' configs (random init, nothing downloaded), their pass
planned before it runs, the default ggn pass refused by the plan, mc factors measured against the plan.

Usage: python -m benchmarks.scale [--quick] [--models gpt2,llama] [--out docs/results/scale.md] [--keep DIR]
       [--fresh plan,refuse]
Every measurement runs in a fresh interpreter (``--child``), one after the other:

* ``plan``: ``kh.plan`` of the default pass (``curvature="ggn"``) and of ``curvature="mc"``: the printout and its time;
* ``refuse``: ``compute_kfac`` with the defaults until ``PlanExceedsBudget``: the time and the message;
* ``fwd+bwd``: one forward+backward of the batch (the loss, ``.backward()``), its time, and in a second child its peak
  of live tensors;
* ``mc``: ``compute_kfac(curvature="mc", seed=0)``, its time, and in a second child its peak of live tensors.

Peak live-tensor memory above the state once the model and data exist, as ``benchmarks/peak_memory.py`` measures it
(the PyTorch profiler's allocation events on the CPU, ``max_memory_allocated`` on CUDA). ``--quick``: GPT-2 only, with
its full width and vocabulary but 2 of its 12 layers, on 2 × 64 tokens (a few minutes on 2 cores); the full run: 12
layers, 2 × 128 tokens, both models.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import kfac_hessian as kh
from benchmarks.peak_memory import _live_peak
from kfac_hessian.factors.plan import PlanExceedsBudget, plan

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def build(name: str, layers: int) -> nn.Module:
    """Full-size configs with random init: GPT-2 (124 M parameters, vocabulary 50 257, tied head) and a Llama-style
    decoder of about the same size (RMSNorm, SwiGLU, rotary positions, vocabulary 32 000)."""
    torch.manual_seed(0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_layer=layers)).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32_000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def batch(model: nn.Module, tokens: int) -> tuple[dict, torch.Tensor]:
    vocabulary = model.config.vocab_size
    ids = torch.randint(0, vocabulary, (2, tokens + 1), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids[:, :-1]}, ids[:, 1:]


def child(name: str, case: str, layers: int, tokens: int) -> dict:
    model = build(name, layers)
    data = batch(model, tokens)
    loss_fn = nn.CrossEntropyLoss()
    result: dict = {"parameters": sum(p.numel() for p in model.parameters()),
                    "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if case == "plan":
        for curvature in ("ggn", "mc"):
            start = time.perf_counter()
            cost = plan(model, loss_fn, data, curvature=curvature, seed=0, output=kh.sequence_logits)
            result[curvature] = {"seconds": time.perf_counter() - start, "printout": str(cost),
                                 "peak": cost.peak_bytes, "time_units": cost.time_units, "estimate": cost.seconds,
                                 "passes": cost.backward_passes_per_batch}
    elif case == "refuse":
        start = time.perf_counter()
        try:
            kh.compute_kfac(model, loss_fn, data, output=kh.sequence_logits)
            result["refused"] = None
        except PlanExceedsBudget as refusal:
            result["refused"] = str(refusal)
        result["seconds"] = time.perf_counter() - start
    else:
        run = {"fwd+bwd": lambda: gradient(model, loss_fn, data),
               "mc": lambda: kh.compute_kfac(model, loss_fn, data, curvature="mc", seed=0,
                                             output=kh.sequence_logits)}[case.split(":")[0]]
        if case.endswith(":peak"):
            _, result["peak"] = _live_peak(run, torch.device("cpu"))
        else:
            start = time.perf_counter()
            kfac = run()
            result["seconds"] = time.perf_counter() - start
            if case == "mc":
                result["row_factors"] = sum(len(b.row_factors) for b in kfac.values() if hasattr(b, "row_factors"))
    return result


def gradient(model: nn.Module, loss_fn: nn.Module, data) -> None:
    inputs, targets = data
    logits = kh.sequence_logits(model(**inputs))
    loss_fn(logits, targets).backward()
    model.zero_grad(set_to_none=True)


def measure(name: str, case: str, layers: int, tokens: int, keep: Path | None, fresh: set[str]) -> dict:
    """One case in a fresh interpreter; with ``keep``, its result is stored there and reused unless ``case`` is in
    ``fresh`` (so that a changed plan is re-measured without repeating the slow passes)."""
    stored = keep / f"{name}_{case.replace(':', '_')}_{layers}_{tokens}.json" if keep else None
    if stored is not None and stored.exists() and case not in fresh:
        return json.loads(stored.read_text())
    command = [sys.executable, "-m", "benchmarks.scale", "--child", name, case, str(layers), str(tokens)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if stored is not None:
        stored.write_text(json.dumps(result))
    return result


def report(name: str, layers: int, tokens: int, keep: Path | None = None, fresh: set[str] = frozenset()) -> list[str]:
    print(f"{name}: {layers} layers, 2 × {tokens} tokens", flush=True)
    results = {case: measure(name, case, layers, tokens, keep, fresh)
               for case in ("plan", "refuse", "fwd+bwd", "fwd+bwd:peak", "mc", "mc:peak")}
    for case, result in results.items():
        print(f"  {case}: { {k: v for k, v in result.items() if k not in ('ggn', 'mc', 'refused')} }", flush=True)
    planned, refuse = results["plan"], results["refuse"]
    fwd, fwd_peak, mc, mc_peak = (results[c] for c in ("fwd+bwd", "fwd+bwd:peak", "mc", "mc:peak"))
    title = "GPT-2" if name == "gpt2" else "Llama-style"
    lines = [f"## {title}: {layers} layers, {fwd.get('parameters', 0) / 1e6:.1f} M parameters, 2 × {tokens} tokens",
             ""]
    if "error" in planned:
        return lines + [f"plan failed: {planned['error']}", ""]
    lines += ["The default pass (`curvature=\"ggn\"`), planned:", "", "```", planned["ggn"]["printout"], "```", "",
              f"Planned in {planned['ggn']['seconds']:.1f} s (one forward of the batch).", ""]
    if "error" in refuse:
        lines += [f"`compute_kfac` with the defaults failed: {refuse['error']}", ""]
    elif refuse["refused"] is None:
        lines += [f"`compute_kfac` with the defaults ran ({refuse['seconds']:.1f} s): the plan fit the budgets.", ""]
    else:
        lines += [f"`compute_kfac(model, nn.CrossEntropyLoss(), data, output=kh.sequence_logits)` with the defaults "
                  f"was refused after **{refuse['seconds']:.1f} s** (goal: < 5 s):", "", "```",
                  refuse["refused"], "```", ""]
    lines += ["`curvature=\"mc\"`, planned:", "", "```", planned["mc"]["printout"], "```", "",
              "| measured | time (s) | × fwd+bwd | plan: time (s) | plan: × fwd+bwd | peak live tensors (GiB) | "
              "plan: peak (GiB) |", "|---|---|---|---|---|---|---|"]
    unit = fwd.get("seconds")

    def row(label: str, timed: dict, peak: dict, planned: dict | None) -> str:
        seconds = timed.get("seconds")
        cells = [f"{seconds:.1f}" if seconds else timed.get("error", "—"),
                 f"{seconds / unit:.1f}" if seconds and unit else "—",
                 f"{planned['estimate']:.1f}" if planned else "—",
                 f"{planned['time_units']:.1f}" if planned else "1",
                 f"{peak['peak'] / GIB:.2f}" if "peak" in peak else peak.get("error", "—"),
                 f"{planned['peak'] / GIB:.2f}" if planned else "—"]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines += [row("one forward+backward", fwd, fwd_peak, None), row("compute_kfac mc", mc, mc_peak, planned["mc"]), ""]
    if "row_factors" in mc:
        lines += [f"The mc pass kept {mc['row_factors']} factors as their rows (fewer rows than the width).", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 with 2 layers on 2 × 64 tokens")
    parser.add_argument("--models", default=None, help="comma-separated: gpt2,llama (default: gpt2, both for full)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "scale.md"))
    parser.add_argument("--keep", type=Path, default=None, help="a folder keeping every case's result for reuse")
    parser.add_argument("--fresh", default="", help="comma-separated cases re-measured although kept (e.g. plan)")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "CASE", "LAYERS", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, case, layers, tokens = args.child
        print(json.dumps(child(name, case, int(layers), int(tokens))))
        return
    layers, tokens = (2, 64) if args.quick else (12, 128)
    models = (args.models or ("gpt2" if args.quick else "gpt2,llama")).split(",")
    start = time.perf_counter()
    lines = ["# Real scale: full-size language models, planned before they run", "",
             f"`python -m benchmarks.scale{' --quick' if args.quick else ''}` — {platform.processor() or 'CPU'}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; random init from transformers' configs, "
             "nothing downloaded; every measurement in a fresh process. Peak live tensors: above the state once the "
             "model and the batch exist (the profiler's allocation events, as `benchmarks/peak_memory.py`). Times on "
             "a machine shared with other jobs vary by 2× or more between runs.", ""]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    for name in models:
        lines += report(name, layers, tokens, args.keep, set(filter(None, args.fresh.split(","))))
    lines.append(f"Total benchmark time: {time.perf_counter() - start:.0f} s.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
