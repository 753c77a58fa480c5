"""Which per-layer spectral metrics separate under-parameterized, well-sized and overfitting networks?

Usage: python -m benchmarks.diagnostics_study [--seeds 2] [--epochs 150] [--quick]
Data: scikit-learn's bundled digits, wine, breast_cancer, iris and two make_classification tasks. Per data set
three regimes of a 1-hidden-layer ReLU MLP trained with Adam: "under" (width 2), "well" (width 32, full
training set), "overfit" (width 512, 60 training samples, 20 % label noise). A SpectrumTracker (MC Fisher)
records every layer's metrics through training. Reported: metrics per regime at the end of training, and the
Spearman rank correlation of each final metric with the generalization gap (train − test accuracy) over all
runs. Writes docs/results/diagnostics.md and docs/figures/tracking_digits.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from benchmarks.datasets import load_tabular
from kfac_hessian.analyses import SpectrumTracker
from kfac_hessian.analyses.tracking import METRICS

ROOT = Path(__file__).resolve().parent.parent
REGIMES = {"under": {"width": 2}, "well": {"width": 32}, "overfit": {"width": 512, "n_train": 60, "label_noise": 0.2}}
DATASETS = {
    "digits": {}, "wine": {}, "breast_cancer": {}, "iris": {},
    "synthetic-easy": {"synthetic_options": {"class_sep": 2.0}},
    "synthetic-hard": {"synthetic_options": {"n_informative": 5, "flip_y": 0.05, "class_sep": 0.7}},
}


def run(dataset: str, regime: str, seed: int, epochs: int, every: int):
    options = REGIMES[regime]
    name = "synthetic" if dataset.startswith("synthetic") else dataset
    split = load_tabular(name, n_train=options.get("n_train"), label_noise=options.get("label_noise", 0.0),
                         seed=seed, **DATASETS[dataset])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(split.n_features, options["width"]), nn.ReLU(),
                          nn.Linear(options["width"], split.n_classes))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    tracker = SpectrumTracker(model, loss_fn, (split.X_train, split.y_train), every=every, curvature="mc", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(split.X_train), generator=generator).split(32):
            opt.zero_grad()
            loss = loss_fn(model(split.X_train[idx]), split.y_train[idx])
            loss.backward()
            opt.step()
            tracker(step, train_loss=loss.item())
            step += 1
    with torch.no_grad():
        train_acc = float((model(split.X_train).argmax(1) == split.y_train).float().mean())
        test_acc = float((model(split.X_test).argmax(1) == split.y_test).float().mean())
    final = tracker.record(step)
    return tracker, final, train_acc, test_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--every", type=int, default=200, help="tracker period in steps")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "diagnostics.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "tracking_digits.png")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 20
    runs, costs = [], []
    for dataset in DATASETS:
        for regime in REGIMES:
            for seed in range(args.seeds):
                start = time.perf_counter()
                tracker, final, train_acc, test_acc = run(dataset, regime, seed, args.epochs, args.every)
                costs.extend(r["seconds"] for r in tracker.records)
                row = {"dataset": dataset, "regime": regime, "seed": seed, "train_acc": train_acc, "test_acc": test_acc,
                       "gap": train_acc - test_acc}
                for layer_row, position in zip(final, ("first", "last")):
                    row.update({f"{position}.{m}": layer_row[m] for m in METRICS})
                runs.append(row)
                print(f"{dataset:15s} {regime:8s} seed {seed}: train {train_acc:.3f} test {test_acc:.3f} "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
                if dataset == "digits" and seed == 0:
                    path = args.figure.with_name(f"{args.figure.stem}_{regime}{args.figure.suffix}")
                    tracker.plot(path, title=f"digits, {regime} regime ({REGIMES[regime]}): per-layer MC Fisher "
                                              "spectra through training")
    text = render(runs, costs, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


def render(runs: list[dict], costs: list[float], args) -> str:
    keys = [f"{p}.{m}" for p in ("first", "last") for m in METRICS]
    lines = [
        "# Spectral diagnostics by training regime (generated)", "",
        f"Command: `python -m benchmarks.diagnostics_study --seeds {args.seeds} --epochs {args.epochs} "
        f"--every {args.every}` ({time.strftime('%Y-%m-%d')}, CPU). {len(runs)} runs; metrics of the MC-Fisher "
        "Kronecker blocks at the end of training ('first' = hidden layer, 'last' = output layer).",
        f"Tracker cost per call: median {1e3 * statistics.median(costs):.1f} ms, max {1e3 * max(costs):.1f} ms "
        "(one compute_kfac pass over the training set + eigenvalues of all factors).", "",
        "## Median per regime (over data sets and seeds)", "",
        "| metric | " + " | ".join(REGIMES) + " |", "|---|" + "---|" * len(REGIMES),
    ]
    for key in ["train_acc", "test_acc", "gap", *keys]:
        cells = [statistics.median(r[key] for r in runs if r["regime"] == g) for g in REGIMES]
        lines.append(f"| {key} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")
    lines += ["", "## Rank correlation with the generalization gap", "",
              "Spearman ρ over all runs (p-value), and within each data set (median ρ over data sets, "
              "3·seeds runs each).", "",
              "| metric | ρ (all runs) | p | median ρ within data set |", "|---|---|---|---|"]
    gaps = np.array([r["gap"] for r in runs])
    for key in keys:
        values = np.array([r[key] for r in runs])
        rho, p = spearmanr(values, gaps)
        within = []
        for dataset in DATASETS:
            sub = [r for r in runs if r["dataset"] == dataset]
            if len({r[key] for r in sub}) > 1 and len({r["gap"] for r in sub}) > 1:
                within.append(spearmanr([r[key] for r in sub], [r["gap"] for r in sub])[0])
        lines.append(f"| {key} | {rho:+.2f} | {p:.2g} | {np.median(within):+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
