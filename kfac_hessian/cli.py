"""``kfac-hessian``: the command line.

* ``kfac-hessian demo``: train a small MLP on scikit-learn's bundled digits for a few seconds, validate the
  Kronecker approximation of every layer against the exact Hessian, compare the top eigenspaces of models
  trained from different seeds, print the tables and write ``report.json`` and PNG plots.
* ``kfac-hessian analyze MODULE:FUNCTION``: the same validation for a user's model; ``FUNCTION()`` returns
  ``(model, loss_fn, data)``. Or ``analyze --checkpoint state.pt --arch digits-mlp --hidden 64 32``: a saved
  ``state_dict`` of the built-in digits MLP, analysed on the digits training split.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import compute_kfac
from .analyses.overlap import overlap_by_layer
from .analyses.report import ValidationReport, compare


def _log(args, message: str) -> None:
    if not args.quiet and not args.json:
        print(message, flush=True)


def _write_plots(args, report: ValidationReport, out: Path, overlaps=None, labels=None) -> list[str]:
    if args.no_plots:
        return []
    try:
        from .plotting import plot_overlap_matrices, plot_spectra, plot_top_eigenvalues
    except ImportError:  # pragma: no cover
        _log(args, "matplotlib is not installed: no plots (pip install 'kfac_hessian[plot]')")
        return []
    files = [plot_spectra(report, out / "spectra.png"), plot_top_eigenvalues(report, out / "top_eigenvalues.png")]
    if overlaps:
        files.append(plot_overlap_matrices(overlaps, labels, out / "overlap_across_seeds.png"))
    return [str(f) for f in files]


def _run_demo(args) -> dict:
    from .demo import train_digits_mlp

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_samples = 400 if args.quick else None
    epochs = args.epochs if args.epochs is not None else (5 if args.quick else 60)
    seeds = list(range(2 if args.quick else 3))
    problems = []
    for seed in seeds:
        problem = train_digits_mlp(epochs=epochs, seed=seed, n_samples=n_samples, device=args.device, dtype=torch.float64)
        _log(args, f"seed {seed}: trained {epochs} epochs in {problem.seconds:.1f}s, "
                   f"train acc {problem.train_accuracy:.3f}, test acc {problem.test_accuracy:.3f}")
        problems.append(problem)
    main = problems[0]
    start = time.perf_counter()
    kfacs = [compute_kfac(p.model, p.loss_fn, p.train, curvature=args.curvature, progress=not args.quiet and not args.json) for p in problems]
    _log(args, f"Kronecker factors ({args.curvature}) of {len(problems)} models in {time.perf_counter() - start:.2f}s")
    report = compare(kfacs[0], main.model, main.loss_fn, main.train, k=args.k, kind=args.kind, n_classes=10)
    _log(args, f"\nKronecker approximation vs exact {args.kind} per layer (seed 0, k={args.k}, 10 classes):\n")
    _log(args, report.to_markdown())
    eigs = [k.eig() for k in kfacs]
    names = kfacs[0].layer_names
    overlaps = {name: np.eye(len(seeds)) for name in names}
    pair_rows = {}
    for i in range(len(seeds)):
        for j in range(i + 1, len(seeds)):
            pair_rows[i, j] = overlap_by_layer(eigs[i], eigs[j], args.k)
            for row in pair_rows[i, j]:
                overlaps[row["layer"]][i, j] = overlaps[row["layer"]][j, i] = row["overlap"]
    _log(args, f"\nTop-{args.k} Kronecker eigenspace overlap between seeds 0 and 1 (random baseline k/P):")
    for row in pair_rows[0, 1]:
        _log(args, f"  layer {row['layer']}: {row['overlap']:.3f} (random {row['random_baseline']:.4f})")
    result = report.to_dict()
    result["models"] = [
        {"seed": s, "train_accuracy": p.train_accuracy, "test_accuracy": p.test_accuracy, "train_seconds": p.seconds}
        for s, p in zip(seeds, problems)
    ]
    result["overlap_across_seeds"] = {name: overlaps[name].tolist() for name in names}
    result["plots"] = _write_plots(args, report, out, overlaps, [f"seed {s}" for s in seeds])
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    _log(args, f"\nwrote {out / 'report.json'}" + (f" and {', '.join(result['plots'])}" if result["plots"] else ""))
    return result


def _load_problem(args):
    """``(model, loss_fn, data)`` from MODULE:FUNCTION, or from a checkpoint of a built-in architecture."""
    if args.checkpoint:
        from .demo import digits_mlp, load_digits_tensors

        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model = digits_mlp(tuple(args.hidden)).double()
        model.load_state_dict(state)
        X, y = load_digits_tensors(dtype=torch.float64)
        n_train = int(0.8 * len(X))
        return model, torch.nn.CrossEntropyLoss(), list(zip(X[:n_train].split(512), y[:n_train].split(512)))
    if not args.target or ":" not in args.target:
        raise SystemExit("analyze expects MODULE:FUNCTION (e.g. my_project.setup:make_problem) or --checkpoint")
    module_name, _, function_name = args.target.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    return getattr(importlib.import_module(module_name), function_name)()


def _run_analyze(args) -> dict:
    model, loss_fn, data = _load_problem(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kfac = compute_kfac(model, loss_fn, data, curvature=args.curvature, layers=args.layers,
                        device=args.device, progress=not args.quiet and not args.json)
    _log(args, kfac.summary())
    report = compare(kfac, model, loss_fn, data, k=args.k, kind=args.kind, gauss_newton_residual=args.gauss_newton_residual)
    _log(args, "\n" + report.to_markdown())
    result = report.to_dict()
    result["skipped"] = kfac.skipped
    result["plots"] = _write_plots(args, report, out)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kfac-hessian", description="Layer-wise Hessians: Kronecker spectra validated on the exact path.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="kfac_demo_out", help="output folder for report.json and plots")
    common.add_argument("--k", type=int, default=20, help="top eigenpairs compared per layer")
    common.add_argument("--curvature", choices=["ggn", "mc", "empirical"], default="ggn")
    common.add_argument("--kind", choices=["hessian", "ggn"], default="hessian", help="exact block to compare against")
    common.add_argument("--device", default="cpu")
    common.add_argument("--json", action="store_true", help="print the report as JSON only")
    common.add_argument("--quiet", action="store_true")
    common.add_argument("--no-plots", action="store_true")
    demo = commands.add_parser("demo", parents=[common], help="digits MLP: validation, overlap across seeds, plots")
    demo.add_argument("--epochs", type=int, default=None)
    demo.add_argument("--quick", action="store_true", help="small data and few epochs (for tests)")
    analyze = commands.add_parser("analyze", parents=[common], help="validate a user's model given as MODULE:FUNCTION")
    analyze.add_argument("target", nargs="?", help="MODULE:FUNCTION returning (model, loss_fn, data)")
    analyze.add_argument("--checkpoint", help="state_dict of the built-in digits MLP (--arch), analysed on digits")
    analyze.add_argument("--arch", choices=["digits-mlp"], default="digits-mlp")
    analyze.add_argument("--hidden", type=int, nargs="+", default=[64, 32], help="hidden widths of --arch")
    analyze.add_argument("--layers", nargs="+", default=None)
    analyze.add_argument("--gauss-newton-residual", action="store_true", help="also report the Hessian − GGN split")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = _run_demo(args) if args.command == "demo" else _run_analyze(args)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
