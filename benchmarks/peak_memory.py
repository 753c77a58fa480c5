"""Peak memory of computing the factors vs the gradient floor, each case in a fresh process.

Usage: python -m benchmarks.peak_memory [--workloads mlp,cnn,seq] [--n 2048] [--n-cnn 256] [--n-seq 256]
       [--device cpu|cuda]
Two measures of the extra peak over the state once the model and data exist:
* live tensors: CPU — the running sum of the allocations and frees the PyTorch profiler records
  (``profile_memory=True``), its maximum; CUDA — ``torch.cuda.max_memory_allocated``;
* CPU only: growth of the process's peak resident set (``ru_maxrss``), which also counts the C allocator's
  caching and fragmentation (measured in its own fresh process, without the profiler).
Reported per case: the extra peak in MiB, the bytes of the factors (A and G: returned by compute_kfac, held by
curvlinops' operator — the same matrices), and (peak − factors) / floor-peak — the issue's goal is ≤ 1.2.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

import kfac_hessian as kh
from benchmarks.compare import gradient_pass, peer_cases
from benchmarks.models import workload

ROOT = Path(__file__).resolve().parent.parent

CASES = ("floor: forward + 1 backward", "compute_kfac ggn", "compute_kfac mc", "compute_kfac empirical",
         "curvlinops KFAC type-2", "curvlinops KFAC mc", "curvlinops KFAC empirical")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _live_peak(fn, device: torch.device) -> tuple[object, int]:
    """``fn()`` and the peak of live tensor bytes it allocated above what existed before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        return result, _peak_bytes(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return result, peak


def child(name: str, case: str, n: int, device: torch.device, metric: str) -> dict:
    model, loss_fn, data = workload(name, n)
    model = model.to(device)
    data = [(X.to(device), y.to(device)) for X, y in data]
    cases = {
        CASES[0]: lambda: gradient_pass(model, loss_fn, data),
        CASES[1]: lambda: kh.compute_kfac(model, loss_fn, data, curvature="ggn"),
        CASES[2]: lambda: kh.compute_kfac(model, loss_fn, data, curvature="mc", seed=0),
        CASES[3]: lambda: kh.compute_kfac(model, loss_fn, data, curvature="empirical"),
        **peer_cases(model, loss_fn, data),
    }
    if case not in cases:
        return {"case": case, "skipped": "curvlinops is not installed"}
    gc.collect()
    if metric == "live":
        _, extra = _live_peak(cases[case], device)
    else:
        before = _peak_bytes(device)
        cases[case]()
        extra = _peak_bytes(device) - before
    # every case except the floor returns (ours) or holds (curvlinops' operator) the same factors
    factor_bytes = 0 if case == CASES[0] else _factor_bytes(model)
    return {"case": case, "extra": extra, "factors": factor_bytes}


def _factor_bytes(model: torch.nn.Module) -> int:
    """Bytes of all ``A`` and ``G`` of the model's Linear/Conv layers (per group: width = d_in (+1 with a bias))."""
    total = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            layout = kh.layers.kind_for(module).layout(module)
            total += layout.groups * (layout.width**2 + layout.d_out**2) * module.weight.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mlp,cnn,seq")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--n-cnn", type=int, default=256)
    parser.add_argument("--n-seq", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", nargs=4, metavar=("WORKLOAD", "CASE", "N", "METRIC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), device, args.child[3])))
        return
    mib = 2**20
    print(f"# Peak memory ({device}, torch {torch.__version__})")
    for name in args.workloads.split(","):
        n = {"mlp": args.n, "cnn": args.n_cnn, "seq": args.n_seq}[name]
        metrics = ("live", "rss") if device.type == "cpu" else ("live",)
        rows = {}
        for metric in metrics:
            for case in CASES:
                # a fresh interpreter per case, importing this checkout as the parent does
                command = [sys.executable, "-m", "benchmarks.peak_memory", "--device", args.device,
                           "--child", name, case, str(n), metric]
                out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
                rows.setdefault(case, {})[metric] = json.loads(out.stdout.strip().splitlines()[-1])
        floors = {m: rows[CASES[0]][m]["extra"] for m in metrics}
        header = " | ".join(f"{m}: extra peak (MiB) | {m}: (peak − factors) / floor" for m in metrics)
        print(f"\n## {name}, N={n}\n\n| case | factors (MiB) | {header} |\n|---|---|" + "---|---|" * len(metrics))
        for case, by_metric in rows.items():
            first = by_metric[metrics[0]]
            if "skipped" in first:
                print(f"| {case} | — ({first['skipped']}) |" + " |" * (2 * len(metrics)))
                continue
            cells = []
            for m in metrics:
                r = by_metric[m]
                cells += [f"{r['extra'] / mib:.1f}", f"{(r['extra'] - r['factors']) / floors[m]:.2f}"]
            print(f"| {case} | {first['factors'] / mib:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
