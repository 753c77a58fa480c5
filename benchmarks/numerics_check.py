"""Bit-identity check of the package's numerics across two commits (for refactors that must not change results).

Builds fixed-seed workloads (the benchmarks' mlp, cnn and seq models, a small ResNet18 with BatchNorm and a TinyGPT
read through ``sequence_logits``), computes ``compute_kfac`` (ggn, mc, empirical; expand and reduce),
``compute_ekfac`` and ``compute_kronecker_fit`` with the public API, and collects every block's state tensors, all
eigenvalues and the top-5 eigenvalues. ``--save`` stores them; ``--compare`` recomputes them and checks each with
``torch.equal`` against the stored ones (exit status 1 on any difference, missing or extra key).

Run it with ``python -m`` from the root of the checkout under test (about a minute on 2 CPU cores): ``-m`` puts the
working directory first on ``sys.path``, so ``kfac_hessian`` and ``benchmarks`` come from that checkout rather than
from the editable install; ``main`` refuses to run otherwise. A commit older than this file needs a copy of it in
its ``benchmarks/`` first:

    cp benchmarks/numerics_check.py /tmp/old_worktree/benchmarks/
    cd /tmp/old_worktree && python -m benchmarks.numerics_check --save /tmp/numerics_old.pt
    cd /work/main && python -m benchmarks.numerics_check --compare /tmp/numerics_old.pt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

# Both runs with the same thread pools, sized before torch and numpy start them.
os.environ.update(dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "2"))

import torch
from torch import nn

import kfac_hessian
from benchmarks.models import workload
from kfac_hessian import compute_ekfac, compute_kfac, compute_kronecker_fit, sequence_logits

# Commits up to 9ba63df keep the reference models in kfac_hessian.models, later ones in
# benchmarks/reference_models.py; the classes are the same, so either checkout can be checked.
try:
    from benchmarks.reference_models import ResNet18, TinyGPT
except ImportError:
    from kfac_hessian.models import ResNet18, TinyGPT


class _LanguageModel(TinyGPT):
    """TinyGPT returning ``(N, T, V)`` logits as language models do, so ``output=sequence_logits`` is exercised."""

    def forward(self, tokens):
        return super().forward(tokens).transpose(1, 2)


def _extra_workload(name: str, n: int, seed: int):
    """``(model, loss_fn, batches, output)`` for "resnet18" (width 8, BatchNorm) and "gpt" (TinyGPT, vocab 32)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "resnet18":
        X, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        return ResNet18(width=8), nn.CrossEntropyLoss(), list(zip(X.split(16), y.split(16))), None
    tokens = torch.randint(0, 32, (n, 17), generator=g)
    model = _LanguageModel(32, dim=32, depth=2, heads=4, context=16)
    return model, nn.CrossEntropyLoss(), list(zip(tokens[:, :-1].split(8), tokens[:, 1:].split(8))), sequence_logits


def _runs(reduce: bool):
    """``(label, function, keyword arguments)`` of every curvature computed on one workload."""
    runs = [("kfac-ggn", compute_kfac, {"curvature": "ggn"}),
            ("kfac-mc", compute_kfac, {"curvature": "mc", "seed": 0}),
            ("kfac-empirical", compute_kfac, {"curvature": "empirical"})]
    if reduce:
        runs.append(("kfac-ggn-reduce", compute_kfac, {"curvature": "ggn", "approx": "reduce"}))
    runs += [("ekfac-ggn", compute_ekfac, {"curvature": "ggn"}),
             ("fit-mc", compute_kronecker_fit, {"curvature": "mc", "seed": 0, "iterations": 2})]
    return runs


def _flatten(prefix: str, value, out: dict) -> None:
    """Tensors (and numbers, lists of numbers) of a block's state under ``prefix``; strings are skipped."""
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().clone()
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, bool)) for v in value):
        out[prefix] = torch.tensor(value)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flatten(f"{prefix}.{i}", item, out)
    elif isinstance(value, (int, float, bool)):
        out[prefix] = torch.tensor(value)


def compute_all(n: int) -> dict[str, torch.Tensor]:
    """Every checked tensor, keyed ``workload/run/layer/what``."""
    out: dict[str, torch.Tensor] = {}
    names = {"mlp": False, "cnn": True, "seq": True, "resnet18": False, "gpt": True}  # name: also approx="reduce"
    for name, reduce in names.items():
        if name in ("mlp", "cnn", "seq"):
            (model, loss_fn, data), output = workload(name, n, seed=0), None
        else:
            model, loss_fn, data, output = _extra_workload(name, n // 2, seed=0)
        for label, function, kwargs in _runs(reduce):
            start = time.perf_counter()
            torch.manual_seed(0)
            kfac = function(model, loss_fn, data, output=output, **kwargs)
            eigs = kfac.eig()
            for layer, block in kfac.items():
                key = f"{name}/{label}/{layer}"
                _flatten(f"{key}/state", block.state(), out)
                values = eigs[layer].eigenvalues  # a method or a property: either commit's API may be under test
                out[f"{key}/eigenvalues"] = (values() if callable(values) else values).clone()
                out[f"{key}/top5"] = eigs[layer].topk(5)[0].clone()
            print(f"  {name:8s} {label:16s} {len(kfac):3d} blocks  {time.perf_counter() - start:5.1f} s", flush=True)
    return out


def compare(saved: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> list[str]:
    """One line per key that is missing, extra, or not ``torch.equal`` (with dtype, shape or max abs diff)."""
    problems = [f"missing: {key}" for key in saved if key not in new]
    problems += [f"extra (not in the saved file): {key}" for key in new if key not in saved]
    for key in saved.keys() & new.keys():
        a, b = saved[key], new[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"differs: {key}: {a.dtype} {tuple(a.shape)} saved, {b.dtype} {tuple(b.shape)} now")
        elif not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item()
            problems.append(f"differs: {key}: max abs diff {diff:.3e} (max abs {a.double().abs().max().item():.3e})")
    return sorted(problems)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", type=Path, help="write {key: tensor} to this file")
    action.add_argument("--compare", type=Path, help="recompute and compare with this file")
    parser.add_argument("--n", type=int, default=64, help="samples per workload (as in the saved run)")
    args = parser.parse_args()

    package = Path(kfac_hessian.__file__).resolve()
    print(f"kfac_hessian: {package}\nbenchmarks.models: {sys.modules['benchmarks.models'].__file__}")
    if not package.is_relative_to(Path.cwd().resolve()):
        print("kfac_hessian is not imported from the working directory: run the script from the checkout under test")
        return 2
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore", message="compute_kronecker_fit: after")  # iterations=2 stops short on purpose
    start = time.perf_counter()
    new = compute_all(args.n)
    print(f"{len(new)} tensors computed in {time.perf_counter() - start:.1f} s")
    if args.save:
        torch.save(new, args.save)
        print(f"saved to {args.save}")
        return 0
    problems = compare(torch.load(args.compare, weights_only=True), new)
    print("\n".join(problems) if problems else f"{len(new)} tensors, all torch.equal")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
