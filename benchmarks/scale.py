"""Real scale: full-size language models from transformers' configs (random init, nothing downloaded), their pass
planned before it runs, the default ggn pass refused by the plan, mc factors measured against the plan.

Usage: python -m benchmarks.scale [--quick] [--models gpt2,llama] [--out docs/results/scale.md] [--keep DIR]
       [--fresh plan,refuse]
Every measurement runs in a fresh interpreter (``--child``), one after the other:

* ``plan``: ``kh.plan`` of the default pass (``curvature="ggn"``) and of ``curvature="mc"``: the printout and its time;
* ``refuse``: ``compute_kfac`` with the defaults until ``PlanExceedsBudget``: the time and the message;
* ``fwd+bwd:peak``, ``mc:peak``: the peak of live tensors of one forward+backward of the batch (the loss,
  ``.backward()``) and of ``compute_kfac(curvature="mc", seed=0)`` (their times: the job's, side by side);
* ``job``: the user's job — ``compute_kfac(curvature="mc", seed=0)``, ``kfac.eig()`` and the top 20 eigenpairs of every
  block (a Kronecker block's as factor pairs, ``top_pairs``: 20 dense eigenvectors of GPT-2's tied head would be
  3.1 GB) — each phase timed (the pass split into its plan, sample-axis probe and the rest), interleaved with one
  forward+backward of the same batch before, between and after the phases (their median is the unit), and the peak
  resident memory of the process (``ru_maxrss``) against the model's own footprint;
* ``stream``: mc passes over 1, 2, 4, 8 batches of the same shape (``STREAM_LAYERS`` layers in the full run), each
  pass's time and its factors' bytes against ``min(rows, width)·width``.

Peak live-tensor memory above the state once the model and data exist, as ``benchmarks/peak_memory.py`` measures it
(the PyTorch profiler's allocation events on the CPU, ``max_memory_allocated`` on CUDA). ``--quick``: GPT-2 only, with
its full width and vocabulary but 2 of its 12 layers, on 2 × 64 tokens (a few minutes on 2 cores); the full run: 12
layers, 2 × 128 tokens, both models.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import kfac_hessian as kh
from benchmarks.peak_memory import _live_peak
from kfac_hessian import limits
from kfac_hessian.blocks.row_factor import RowFactor
from kfac_hessian.factors import driver as driver_module
from kfac_hessian.factors import stream as stream_module
from kfac_hessian.factors.plan import PlanExceedsBudget, plan

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
BASE_RSS = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the interpreter with torch and the package


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
                    "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                    "rss_with_model": current_rss()}
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
    elif case == "job":
        result.update(job(model, loss_fn, data))
    elif case == "stream":
        result.update(stream(model, loss_fn, tokens))
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


def current_rss() -> int:
    """Resident bytes of this process now (``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


TOP = 20  # eigenpairs of every block in the user's job


def job(model: nn.Module, loss_fn: nn.Module, data) -> dict:
    """The user's job phase by phase, with one forward+backward before, between and after the phases (``case job``)."""
    timer = PhaseTimer()
    fwd_bwd = [timer.seconds(lambda: gradient(model, loss_fn, data))]
    with timer.inside(driver_module, "plan_pass", "plan"), timer.inside(stream_module, "probe_sample_axes", "probe"):
        kfac = timer.phase("compute_kfac", lambda: kh.compute_kfac(model, loss_fn, data, curvature="mc", seed=0,
                                                                   output=kh.sequence_logits))
    fwd_bwd.append(timer.seconds(lambda: gradient(model, loss_fn, data)))
    eigen = timer.phase("eig", kfac.eig)
    fwd_bwd.append(timer.seconds(lambda: gradient(model, loss_fn, data)))
    timer.phase(f"top {TOP}", lambda: [e.top_pairs(TOP) if hasattr(e, "top_pairs") else e.topk(TOP)
                                       for e in eigen.values()])
    fwd_bwd.append(timer.seconds(lambda: gradient(model, loss_fn, data)))
    return {"phases": timer.phases, "fwd_bwd": fwd_bwd, "unit": statistics.median(fwd_bwd),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before_model": BASE_RSS,
            "row_factors": sum(len(b.row_factors) for b in kfac.values() if hasattr(b, "row_factors"))}


STREAM_BATCHES = (1, 2, 4, 8)  # batches of 2 × tokens streamed in one pass: 8 × 2 × 128 = 2 048 tokens


def stream(model: nn.Module, loss_fn: nn.Module, tokens: int) -> dict:
    """Passes over 1, 2, 4, 8 batches (``case stream``): each pass's time, and every factor's bytes against the bound
    ``min(rows, width)·width`` of its rows (``rows`` = the tokens streamed, ``approx="expand"``)."""
    vocabulary = model.config.vocab_size
    ids = torch.randint(0, vocabulary, (max(STREAM_BATCHES), 2, tokens + 1),
                        generator=torch.Generator().manual_seed(1))
    data = [({"input_ids": b[:, :-1]}, b[:, 1:]) for b in ids]
    passes = []
    for count in STREAM_BATCHES:
        start = time.perf_counter()
        kfac = kh.compute_kfac(model, loss_fn, data[:count], curvature="mc", seed=0, output=kh.sequence_logits)
        seconds = time.perf_counter() - start
        rows, factors = 2 * tokens * count, []
        for block in (b for b in kfac.values() if hasattr(b, "row_factors")):  # the Kronecker blocks
            for which in ("A", "G"):
                factor = block.a_factor if which == "A" else block.g_factor
                held = factor.rows if isinstance(factor, RowFactor) else factor
                if held.dim() == 2:  # a diagonal A (an embedding's token counts) is bounded by its width alone
                    # below limits.ROW_FACTOR_MIN_WIDTH a factor is dense by design (at most 16 MiB in float32)
                    width = held.shape[-1]
                    kept = min(rows, width) if width >= limits.ROW_FACTOR_MIN_WIDTH else width
                    factors.append((held.numel() * held.element_size(), kept * width * held.element_size(),
                                    isinstance(factor, RowFactor)))
        passes.append({"batches": count, "tokens": rows, "seconds": seconds,
                       "factor_bytes": sum(f[0] for f in factors), "bound_bytes": sum(f[1] for f in factors),
                       "worst_ratio": max(f[0] / f[1] for f in factors), "row_factors": sum(f[2] for f in factors),
                       "factors": len(factors)})
    return {"passes": passes}


class PhaseTimer:
    """Seconds of each phase of the job, and of functions called inside one (patched for the measurement only)."""

    def __init__(self):
        self.phases: dict[str, float] = {}

    @staticmethod
    def seconds(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    def phase(self, name: str, run):
        start = time.perf_counter()
        out = run()
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start
        return out

    @contextlib.contextmanager
    def inside(self, module, attribute: str, name: str):
        original = getattr(module, attribute)
        setattr(module, attribute, lambda *args, **kwargs: self.phase(name, lambda: original(*args, **kwargs)))
        try:
            yield
        finally:
            setattr(module, attribute, original)


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


CASES = ("plan", "refuse", "fwd+bwd:peak", "mc:peak", "job")  # the times of fwd+bwd and mc: the job's, side by side
STREAM_LAYERS = 2  # layers of the streaming case: 15 passes of the full model take too long on 2 shared cores


def report(name: str, layers: int, tokens: int, keep: Path | None = None, fresh: set[str] = frozenset()) -> list[str]:
    print(f"{name}: {layers} layers, 2 × {tokens} tokens", flush=True)
    results = {case: measure(name, case, layers, tokens, keep, fresh) for case in CASES}
    results["stream"] = measure(name, "stream", min(layers, STREAM_LAYERS), tokens, keep, fresh)
    for case, result in results.items():
        print(f"  {case}: { {k: v for k, v in result.items() if k not in ('ggn', 'mc', 'refused')} }", flush=True)
    job = results["job"]
    planned, refuse = results["plan"], results["refuse"]
    title = "GPT-2" if name == "gpt2" else "Llama-style"
    lines = [f"## {title}: {layers} layers, {job.get('parameters', 0) / 1e6:.1f} M parameters, 2 × {tokens} tokens",
             "", *job_lines(name, layers, tokens, job)]
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
              "Plan against measurement (times: the job's, in one process; peaks: a fresh process each, "
              "`benchmarks/peak_memory.py`):", "",
              "| measured | time (s) | × fwd+bwd | plan: time (s) | plan: × fwd+bwd | peak live tensors (GiB) | "
              "plan: peak (GiB) |", "|---|---|---|---|---|---|---|"]
    unit = job.get("unit")
    mc_seconds = job.get("phases", {}).get("compute_kfac")

    def row(label: str, seconds: float | None, peak: dict, planned: dict | None) -> str:
        cells = [f"{seconds:.1f}" if seconds else job.get("error", "—"),
                 f"{seconds / unit:.1f}" if seconds and unit else "—",
                 f"{planned['estimate']:.1f}" if planned else "—",
                 f"{planned['time_units']:.1f}" if planned else "1",
                 f"{peak['peak'] / GIB:.2f}" if "peak" in peak else peak.get("error", "—"),
                 f"{planned['peak'] / GIB:.2f}" if planned else "—"]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines += [row("one forward+backward", unit, results["fwd+bwd:peak"], None),
              row("compute_kfac mc", mc_seconds, results["mc:peak"], planned["mc"]), ""]
    return lines + stream_lines(min(layers, STREAM_LAYERS), tokens, results["stream"])


def stream_lines(layers: int, tokens: int, streamed: dict) -> list[str]:
    """The streaming case: time per batch against the batches of one pass, and the factors' bytes against their
    bound."""
    if "error" in streamed:
        return [f"Streaming failed: {streamed['error']}", ""]
    lines = [f"Streaming (`--child … stream {layers} {tokens}`: {layers} layers — {STREAM_LAYERS} in the full run, "
             f"15 passes of all 12 take too long on 2 shared cores —, full width and vocabulary): one mc pass over "
             f"1, 2, 4, 8 batches of 2 × {tokens} tokens, each in one call. Factor bytes against the bound "
             "Σ min(rows, width)·width of the Kronecker factors at least `limits.ROW_FACTOR_MIN_WIDTH` = "
             f"{limits.ROW_FACTOR_MIN_WIDTH} wide (rows = tokens streamed; narrower factors are dense by design, "
             "width²; an embedding's diagonal A apart):", "",
             "| batches | tokens | time (s) | s per batch | factors kept as rows | factor MiB | bound MiB | "
             "worst factor / its bound |", "|---|---|---|---|---|---|---|---|"]
    for p in streamed["passes"]:
        lines.append(f"| {p['batches']} | {p['tokens']:,} | {p['seconds']:.1f} | {p['seconds'] / p['batches']:.1f} "
                     f"| {p['row_factors']} of {p['factors']} | {p['factor_bytes'] / 2**20:,.0f} | "
                     f"{p['bound_bytes'] / 2**20:,.0f} | {p['worst_ratio']:.2f} |")
    passes = streamed["passes"]
    if len(passes) > 1:
        slope = (passes[-1]["seconds"] - passes[0]["seconds"]) / (passes[-1]["batches"] - passes[0]["batches"])
        if slope > 0:
            lines += ["", f"Each further batch costs ≈ {slope:.1f} s (from the 1- and {passes[-1]['batches']}-batch "
                          f"passes); the first batch's {passes[0]['seconds'] - slope:.1f} s more are the plan's "
                          "forward, the sample-axis probe and the finalization, paid once per pass."]
        else:
            lines += ["", f"The {passes[-1]['batches']}-batch pass took less time than the 1-batch pass: the load "
                          "of the shared machine changed between the passes, and these times say nothing about the "
                          "slope."]
    return lines + [""]


def job_lines(name: str, layers: int, tokens: int, job: dict) -> list[str]:
    """The user's job (``case job``): its phases in seconds and forward+backward passes, and its peak memory."""
    if "error" in job:
        return [f"The user's job failed: {job['error']}", ""]
    unit, phases = job["unit"], job["phases"]
    total = phases["compute_kfac"] + phases["eig"] + phases[f"top {TOP}"]
    lines = [f"The user's job (`--child {name} job {layers} {tokens}`, one process): `compute_kfac(curvature=\"mc\", "
             f"seed=0, output=kh.sequence_logits)`, `kfac.eig()`, the top {TOP} eigenpairs of every block (Kronecker "
             "blocks as factor pairs). One forward+backward of the same batch before, between and after the phases: "
             + ", ".join(f"{s:.2f}" for s in job["fwd_bwd"]) + f" s (median {unit:.2f} s, the unit).", "",
             "| phase | time (s) | × fwd+bwd |", "|---|---|---|"]
    for phase, label in (("compute_kfac", "compute_kfac mc"), ("plan", "  of which the plan (one forward)"),
                         ("probe", "  of which the sample-axis probe"), ("eig", "kfac.eig()"),
                         (f"top {TOP}", f"top {TOP} of every block")):
        if phase in phases:
            lines.append(f"| {label} | {phases[phase]:.2f} | {phases[phase] / unit:.2f} |")
    goal = job["model_bytes"] + 3 * GIB
    lines += [f"| **the job** | **{total:.2f}** | **{total / unit:.2f}** (goal ≤ 3) |", "",
              f"Peak resident memory of the process: {job['peak_rss'] / GIB:.2f} GiB (the interpreter with torch "
              f"before the model: {job['rss_before_model'] / GIB:.2f} GiB, with the model and batch: "
              f"{job['rss_with_model'] / GIB:.2f} GiB); the model's parameters take "
              f"{job['model_bytes'] / GIB:.2f} GiB, so the goal (footprint + 3 GiB) is {goal / GIB:.2f} GiB: "
              f"{'met' if job['peak_rss'] <= goal else 'missed'}. {job['row_factors']} factors kept as their rows.", ""]
    return lines


EXACT_LINE = ("The exact path at this scale (Lanczos top-5 of one attention block of full-size GPT-2, and KFAC, EKFAC "
              "and the Kronecker fit against it): [scale_exact.md](scale_exact.md).")  # benchmarks/scale_exact.py


def load_average() -> str:
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


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
    start, load = time.perf_counter(), [load_average()]
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
    lines.append(f"Total benchmark time: {time.perf_counter() - start:.0f} s; load average (1, 5, 15 min) at its "
                 f"start {load[0]}, at its end {load_average()} (2 cores).")
    lines += ["", EXACT_LINE]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
