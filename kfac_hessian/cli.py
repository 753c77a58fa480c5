"""``kfac-hessian``: the command line.

* ``kfac-hessian demo``: train a small MLP on scikit-learn's bundled digits for a few seconds, validate the
  Kronecker approximation of every layer against the exact Hessian, compare the top eigenspaces of models
  trained from different seeds, print the tables and write ``report.json`` and PNG plots.
* ``kfac-hessian analyze MODULE:FUNCTION``: the same validation for a user's model; ``FUNCTION()`` returns
  ``(model, loss_fn, data)`` or ``(model, loss_fn, data, output)`` (``output`` as ``compute_kfac`` takes it);
  ``MODULE`` is an importable module or a path to a ``.py`` file. Or ``analyze --checkpoint state.pt --arch
  digits-mlp --hidden 64 32``: a saved ``state_dict`` of the built-in digits MLP, analysed on the digits training
  split. The pass's plan (``kfac_hessian.plan``: backward passes, factor sizes, peak memory, time) is printed first;
  ``--plan-only`` stops there, and a plan above the budgets is refused (exit code 2) with the cheaper choices named.

A wrong command line or target is answered with one line saying what is wrong and what is expected, and exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, compute_ekfac, compute_kfac, compute_kronecker_fit
from .analyses.overlap import overlap_by_layer
from .analyses.report import ValidationReport, compare, json_ready
from .demo import digits_mlp, digits_mlp_description, load_digits_tensors, train_digits_mlp
from .factors.plan import PlanExceedsBudget, plan
from .limits import COMPARE_DENSE_LIMIT


class UsageError(Exception):
    """A wrong command line or target (exit code 2)."""


def _log(args, message: str) -> None:
    if not args.quiet and not args.json:
        print(message, flush=True)


def _meta(args, data: str, model: nn.Module, architecture: str) -> dict:
    return {
        "command": " ".join(["kfac-hessian", *args.argv]),
        "data": data,
        "architecture": architecture,
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"kfac_hessian": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_plots(args, report: ValidationReport, out: Path, title: str, overlaps=None, labels=None,
                 baselines=None) -> list[str]:
    if args.no_plots:
        return []
    try:
        from .plotting import plot_overlap_matrices, plot_spectra, plot_top_eigenvalues
    except ImportError:  # pragma: no cover
        _log(args, "matplotlib is not installed: no plots (pip install 'kfac_hessian[plot]')")
        return []
    files = [plot_spectra(report, out / "spectra.png", title),
             plot_top_eigenvalues(report, out / "top_eigenvalues.png", title)]
    if overlaps:
        files.append(plot_overlap_matrices(overlaps, labels, out / "overlap_across_seeds.png", args.k, baselines))
    return [str(f) for f in files]


def _run_demo(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_samples = 400 if args.quick else None
    epochs = args.epochs if args.epochs is not None else (5 if args.quick else 60)
    dense_limit = 1000 if args.quick else COMPARE_DENSE_LIMIT
    seeds = list(range(2 if args.quick else 3))
    problems = []
    for seed in seeds:
        _log(args, f"training seed {seed} ({epochs} epochs) …")
        problem = train_digits_mlp(epochs=epochs, seed=seed, n_samples=n_samples, device=args.device,
                                   dtype=torch.float64)
        _log(args, f"seed {seed}: trained in {problem.seconds:.1f}s, "
                   f"train acc {problem.train_accuracy:.3f}, test acc {problem.test_accuracy:.3f}")
        problems.append(problem)
    main = problems[0]
    start = time.perf_counter()
    kfacs = [compute_kfac(p.model, p.loss_fn, p.train, curvature=args.curvature,
                          progress=not args.quiet and not args.json)
             for p in problems]
    _log(args, f"Kronecker factors ({args.curvature}) of {len(problems)} models in {time.perf_counter() - start:.2f}s")
    _log(args, f"\nexact {args.kind} blocks of seed 0 (dense up to P={dense_limit}, Lanczos above) — "
               "the longest phase:")
    report = compare(kfacs[0], main.model, main.loss_fn, main.train, k=args.k, kind=args.kind, n_classes=10,
                     dense_limit=dense_limit, progress=lambda line: _log(args, line))
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
    n_train = sum(len(y) for _, y in main.train)
    data = (f"scikit-learn digits, {'first 400 images, ' if args.quick else ''}{n_train} training images "
            f"(8×8, standardized), 10 classes")
    result = {"meta": _meta(args, data, main.model, digits_mlp_description()), **report.to_dict()}
    result["models"] = [
        {"seed": s, "train_accuracy": p.train_accuracy, "test_accuracy": p.test_accuracy, "train_seconds": p.seconds}
        for s, p in zip(seeds, problems)
    ]
    result["overlap_across_seeds"] = {name: overlaps[name].tolist() for name in names}
    title = f"digits MLP ({digits_mlp_description()}), N={n_train}, {args.curvature} factors vs exact {args.kind}"
    baselines = {row["layer"]: row["random_baseline"] for row in pair_rows[0, 1]}
    result["plots"] = _write_plots(args, report, out, title, overlaps, [f"seed {s}" for s in seeds], baselines)
    (out / "report.json").write_text(json.dumps(json_ready(result), indent=2, allow_nan=False) + "\n")
    _log(args, f"\nwrote {out / 'report.json'}" + (f" and {', '.join(result['plots'])}" if result["plots"] else ""))
    return result


def _load_target(target: str):
    """``FUNCTION`` of ``MODULE:FUNCTION``, ``MODULE`` importable or a path to a ``.py`` file."""
    if not target or ":" not in target:
        raise UsageError("expected MODULE:FUNCTION (e.g. my_project.setup:make_problem or "
                         f"path/to/setup.py:make_problem), got {target!r}")
    module_name, _, function_name = target.rpartition(":")
    if not module_name or not function_name:
        raise UsageError(f"expected MODULE:FUNCTION, got {target!r}")
    try:
        if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"{module_name}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(path.resolve().parent))
            spec.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 — whatever the user's module raised on import
        raise UsageError(f"cannot import {module_name}: {type(error).__name__}: {error}") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"{module_name} has no function {function_name!r}")
    return function


def _load_problem(args):
    """``(model, loss_fn, data, output, data description)`` from MODULE:FUNCTION, or from a checkpoint."""
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise UsageError(f"--checkpoint {path}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = digits_mlp(tuple(args.hidden)).double()
            model.load_state_dict(state)
        except Exception as error:  # noqa: BLE001
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"--checkpoint {path} is not a state_dict of the digits MLP with --hidden "
                             f"{' '.join(map(str, args.hidden))}: {first}") from error
        X, y = load_digits_tensors(dtype=torch.float64)
        n_train = int(0.8 * len(X))
        data = list(zip(X[:n_train].split(512), y[:n_train].split(512)))
        return model, nn.CrossEntropyLoss(), data, None, f"scikit-learn digits, {n_train} training images"
    if not args.target:
        raise UsageError("analyze expects MODULE:FUNCTION (e.g. my_project.setup:make_problem) or --checkpoint FILE")
    problem = _load_target(args.target)()
    if not isinstance(problem, tuple) or len(problem) not in (3, 4):
        raise UsageError(f"{args.target} must return (model, loss_fn, data) or (model, loss_fn, data, output), "
                         f"got {type(problem).__name__}"
                         f"{f' of length {len(problem)}' if isinstance(problem, tuple) else ''}")
    model, loss_fn, data, output = (*problem, None) if len(problem) == 3 else problem
    if not isinstance(model, nn.Module) or not isinstance(loss_fn, nn.Module):
        raise UsageError(f"{args.target} must return (model: nn.Module, loss_fn: nn.Module, data, …), got "
                         f"({type(model).__name__}, {type(loss_fn).__name__}, …)")
    return model, loss_fn, data, output, f"returned by {args.target}"


def _run_analyze(args) -> dict:
    model, loss_fn, data, output, description = _load_problem(args)
    cost = plan(model, loss_fn, data, curvature=args.curvature, layers=args.layers, output=output)
    _log(args, str(cost) + "\n")
    if args.plan_only:
        return {"plan": str(cost)}
    cost.check()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _log(args, "Kronecker factors …")
    kfac = compute_kfac(model, loss_fn, data, curvature=args.curvature, layers=args.layers, output=output,
                        device=args.device, progress=not args.quiet and not args.json)
    _log(args, kfac.summary())
    also = {}
    if "ekfac" in args.also:
        _log(args, "EKFAC: eigenvalue correction pass …")
        also["ekfac"] = compute_ekfac(model, loss_fn, data, kfac=kfac, seed=0, output=output)
    if "fit" in args.also:
        _log(args, "nearest Kronecker product: power-iteration passes …")
        also["fit"] = compute_kronecker_fit(model, loss_fn, data, kfac=kfac, seed=0, output=output)
    _log(args, f"\nexact {args.kind} blocks (the longest phase):")
    report = compare(kfac, model, loss_fn, data, k=args.k, kind=args.kind,
                     gauss_newton_residual=args.gauss_newton_residual, output=output,
                     progress=lambda line: _log(args, line), also=also)
    _log(args, "\n" + report.to_markdown())
    result = {"meta": _meta(args, description, model, type(model).__name__), **report.to_dict()}
    result["skipped"] = kfac.skipped
    title = f"{type(model).__name__}, {args.curvature} factors vs exact {args.kind}"
    result["plots"] = _write_plots(args, report, out, title)
    (out / "report.json").write_text(json.dumps(json_ready(result), indent=2, allow_nan=False) + "\n")
    return result


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="kfac-hessian", formatter_class=formatter,
                                     description="Layer-wise Hessians: Kronecker spectra validated on the exact path.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False, formatter_class=formatter)
    common.add_argument("--out", default="kfac_demo_out", help="output folder for report.json and the plots")
    common.add_argument("--k", type=_positive, default=20,
                        help="top eigenpairs compared per layer (all of a layer with fewer parameters)")
    common.add_argument("--curvature", choices=["ggn", "mc", "empirical"], default="ggn",
                        help="the output Hessian in the factors: exact Gauss-Newton, Monte-Carlo or empirical Fisher")
    common.add_argument("--kind", choices=["hessian", "ggn"], default="hessian", help="exact block to compare against")
    common.add_argument("--device", default="cpu", help="torch device for the model and the computations")
    common.add_argument("--json", action="store_true", help="print the report as JSON only")
    common.add_argument("--quiet", action="store_true", help="print nothing but errors")
    common.add_argument("--no-plots", action="store_true", help="write report.json only")
    demo = commands.add_parser("demo", parents=[common], formatter_class=formatter,
                               help="digits MLP: validation, overlap across seeds, plots")
    demo.add_argument("--epochs", type=_positive, default=None,
                      help="training epochs per seed (default: 60; 5 with --quick)")
    demo.add_argument("--quick", action="store_true",
                      help="400 images, 5 epochs, 2 seeds, exact blocks dense up to 1000 parameters (for tests)")
    analyze = commands.add_parser("analyze", parents=[common], formatter_class=formatter,
                                  help="validate a user's model given as MODULE:FUNCTION")
    analyze.add_argument("target", nargs="?",
                         help="MODULE:FUNCTION returning (model, loss_fn, data[, output]); "
                              "MODULE importable or a .py file")
    analyze.add_argument("--checkpoint", help="state_dict of the built-in digits MLP (--arch), analysed on digits")
    analyze.add_argument("--arch", choices=["digits-mlp"], default="digits-mlp", help="architecture of --checkpoint")
    analyze.add_argument("--hidden", type=_positive, nargs="+", default=[64, 32], help="hidden widths of --arch")
    analyze.add_argument("--layers", nargs="+", default=None, help="block names to factor (default: every parameter)")
    analyze.add_argument("--plan-only", action="store_true",
                         help="print the pass's plan (backward passes, factor sizes, peak memory, time) and stop")
    analyze.add_argument("--gauss-newton-residual", action="store_true", help="also report the Hessian − GGN split")
    analyze.add_argument("--also", nargs="+", choices=["ekfac", "fit"], default=[],
                         help="measure further approximations beside KFAC: eigenvalue-corrected (EKFAC) and the "
                              "nearest Kronecker product (fit); columns ekfac_…, fit_…")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        result = _run_demo(args) if args.command == "demo" else _run_analyze(args)
    except (UsageError, PlanExceedsBudget) as error:
        print(f"kfac-hessian {args.command}: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json_ready(result), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
