"""Which per-layer spectral metrics separate under-parameterized, well-sized and overfitting networks, over data sets?

Usage: python -m benchmarks.diagnostics_study [--seeds 1] [--epochs 30] [--quick] [--seed-shift S]
       [--rows PATH [--render-only]] [--replicate-rows PATH]

Data: 28 data sets — scikit-learn's four bundled classification sets (iris, wine, breast cancer, digits) and 24
generated ones, four from each of six generator families (``make_classification``, ``make_moons``,
``make_circles``, ``make_blobs``, ``make_gaussian_quantiles`` and the Gaussian clusters of
``benchmarks.clusters``); see ``DATASETS``. Per data set, four regimes of a 1-hidden-layer ReLU MLP trained with
Adam (batches of 32): "under" (width 2), "well" (width 32), "wide" (width 256) on the full training set, and
"overfit" (width 256, 60 training samples, 20 % label noise) — "wide" and "overfit" differ only in the data, "well"
and "wide" only in the width — ``--seeds`` seeds each (split, initialization, batch order, MC labels).

Measured at three checkpoints (10 %, 50 %, 100 % of the epochs), on a fixed probe batch (the first ≤ 256 training
samples), for the hidden ('first') and output ('last') layer: metrics of the MC-Fisher Kronecker block (KFAC-MC, the
block ``SpectrumTracker`` tracks) from all its eigenvalues, and of the exact layer Hessian block from its top-k
(``layer_operator`` + ``lanczos``, float64). Round-off is kept out: a condition number ``λ₁/λ_k`` only counts
eigenvalues above ``P·ε·λ₁`` (``P`` the block size, ``ε`` float64's machine epsilon), and above the Lanczos accuracy
for the exact top-k. Outliers of each block's top-10 (``find_outliers``, exact and KFAC-MC alike): the count (widest
ratio ≥ 2), the gap's position and ratio, and the count above the default null (the Marchenko–Pastur bulk fitted to
the whole spectrum; for the exact top-10 the rest of the spectrum enters by Hutchinson, ``unseen_spectrum``).
Reported: the metrics per regime, and the Spearman correlation of every final metric with the
generalization gap (train − test accuracy) over all runs, within regimes and within data sets — each with a 95 %
bootstrap interval that resamples DATA SETS (all runs of a data set together), not runs.

Re-run on new seeds: ``--seed-shift S`` adds ``S`` to every seed (training seeds: split, initialization, batch order,
MC labels) and ``100·S`` to every generated set's ``random_state`` (a new draw of each generated set; the bundled sets
are re-split and re-initialized by the training seed); ``--replicate-rows`` (the rows of such a run, ``--rows`` of
it) adds to the report whether each table cell with an interval agrees between the two runs.
Writes docs/results/diagnostics.md and docs/figures/tracking_digits_{under,well,wide,overfit}.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn import datasets as generators
from torch import Tensor, nn

import kfac_hessian as kh
from benchmarks.clusters import gaussian_clusters
from benchmarks.datasets import TabularSplit, load_tabular, split_tabular
from kfac_hessian.analyses import SpectrumTracker
from kfac_hessian.analyses.outliers import OutlierResult, find_outliers, unseen_spectrum

ROOT = Path(__file__).resolve().parent.parent
REGIMES = {"under": {"width": 2}, "well": {"width": 32}, "wide": {"width": 256},
           "overfit": {"width": 256, "n_train": 60, "label_noise": 0.2}}
LAYERS = {"0": "first", "2": "last"}
PROBE_SAMPLES = 256
TOP_K = 10
LANCZOS_TOL = 1e-6
CHECKPOINTS = (0.1, 0.5, 1.0)  # fractions of the epochs
GENERATED_SAMPLES = 600
HUTCHINSON_PROBES = 16  # Rademacher vectors for the power sums of the exact spectrum beyond the top-10


@dataclass(frozen=True)
class DataSet:
    """A bundled set (``family="bundled"``) or one draw of a generator with fixed parameters and ``random_state``."""

    name: str
    family: str
    parameters: dict = field(default_factory=dict)

    def arrays(self, random_state: int) -> tuple[np.ndarray, np.ndarray]:
        n = GENERATED_SAMPLES
        if self.family == "clusters":
            data = gaussian_clusters(n_train=n, n_test=0, seed=random_state, **self.parameters)
            return data.X_train.numpy(), data.y_train.numpy()
        generator = {"classification": generators.make_classification, "moons": generators.make_moons,
                     "circles": generators.make_circles, "blobs": generators.make_blobs,
                     "quantiles": generators.make_gaussian_quantiles}[self.family]
        return generator(n_samples=n, random_state=random_state, **self.parameters)


def _family(family: str, settings: list[dict]) -> list[DataSet]:
    return [DataSet(f"{family}-{i}", family, s) for i, s in enumerate(settings)]


DATASETS = [
    *(DataSet(name, "bundled") for name in ("iris", "wine", "breast_cancer", "digits")),
    *_family("classification", [
        {"n_features": 20, "n_informative": 10, "n_classes": 3, "class_sep": 2.0},
        {"n_features": 20, "n_informative": 5, "n_classes": 3, "class_sep": 0.7, "flip_y": 0.05},
        {"n_features": 30, "n_informative": 15, "n_classes": 5, "class_sep": 1.0},
        {"n_features": 10, "n_informative": 4, "n_classes": 2, "class_sep": 1.0, "flip_y": 0.1}]),
    *_family("moons", [{"noise": 0.1}, {"noise": 0.2}, {"noise": 0.3}, {"noise": 0.45}]),
    *_family("circles", [{"noise": 0.05, "factor": 0.5}, {"noise": 0.1, "factor": 0.5}, {"noise": 0.1, "factor": 0.8},
                         {"noise": 0.2, "factor": 0.6}]),
    *_family("blobs", [{"centers": 3, "n_features": 2, "cluster_std": 1.0},
                       {"centers": 5, "n_features": 10, "cluster_std": 2.0},
                       {"centers": 8, "n_features": 20, "cluster_std": 4.0},
                       {"centers": 4, "n_features": 5, "cluster_std": 3.0}]),
    *_family("quantiles", [{"n_classes": 2, "n_features": 2}, {"n_classes": 3, "n_features": 5},
                           {"n_classes": 4, "n_features": 10}, {"n_classes": 2, "n_features": 20}]),
    *_family("clusters", [{"n_classes": 3, "clusters_per_class": 1, "dim": 10, "separation": 2.0},
                          {"n_classes": 5, "clusters_per_class": 2, "dim": 20, "separation": 3.0},
                          {"n_classes": 2, "clusters_per_class": 4, "dim": 10, "separation": 2.0},
                          {"n_classes": 10, "clusters_per_class": 1, "dim": 30, "separation": 4.0}]),
]
RANDOM_STATE = {d.name: 1000 + i for i, d in enumerate(DATASETS)}  # one fixed draw per generated set
DRAW_SHIFT = 100  # a seed shift S draws every generated set anew from random_state + 100·S (> len(DATASETS))


def load(dataset: DataSet, regime: dict, seed: int, seed_shift: int = 0) -> TabularSplit:
    """The split of ``seed``; the data of a generated set are the same draw for every seed and regime of one
    ``seed_shift`` (module docstring)."""
    options = {"n_train": regime.get("n_train"), "label_noise": regime.get("label_noise", 0.0), "seed": seed}
    if dataset.family == "bundled":
        return load_tabular(dataset.name, dtype=torch.float64, **options)
    X, y = dataset.arrays(RANDOM_STATE[dataset.name] + DRAW_SHIFT * seed_shift)
    return split_tabular(np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64), dataset.name,
                         dtype=torch.float64, **options)


def resolved(values: Tensor, num_params: int, floor: float = 0.0) -> Tensor:
    """The leading eigenvalues (descending) above ``max(P·ε, floor)·λ₁``: those not made of round-off."""
    threshold = max(num_params * torch.finfo(torch.float64).eps, floor) * float(values[0])
    return values[values > threshold]


def top_k_condition(values: Tensor, num_params: int, floor: float = 0.0) -> float:
    """``λ₁ / λ_k'`` over the resolved top ``k' ≤ TOP_K`` eigenvalues (1 when only λ₁ is resolved)."""
    kept = resolved(values[:TOP_K], num_params, floor)
    return float(kept[0] / kept[-1]) if len(kept) else math.nan


def outlier_metrics(outliers: OutlierResult) -> dict[str, float]:
    """The outlier statistic of a top-10 as row entries: count (ratio ≥ 2), gap position and ratio, and the count
    above the default (Marchenko–Pastur) null's edge."""
    return {"outliers": outliers.count, "gap_position": outliers.gap_position, "gap_ratio": outliers.gap_ratio,
            "outliers_above_null": outliers.null.count_above}


def kfac_metrics(eig) -> dict[str, float]:
    """Metrics of a Kronecker block from all its eigenvalues; its outliers among its top-10, like the exact ones."""
    values = eig.top_eigenvalues(eig.num_params)
    lam1, trace, lam_k = float(values[0]), float(eig.trace()), float(values[:TOP_K][-1])
    return {"top_eigenvalue": lam1, "trace": trace, "effective_rank": eig.effective_rank(),
            "stable_rank": trace / lam1 if lam1 > 0 else math.nan,
            "top_k_condition": top_k_condition(values, eig.num_params),
            "naive_top_k_condition": lam1 / lam_k if lam_k > 0 else math.inf,
            **outlier_metrics(find_outliers(values, search=TOP_K - 1))}


def exact_metrics(model: nn.Module, data, layer: str, seed: int) -> dict[str, float]:
    """λ₁, the resolved top-k condition and the outliers of the exact Hessian block's top-10 (Lanczos: eigenvalues
    below ``LANCZOS_TOL · 10⁻⁶ · ‖H‖`` are not resolved, see ``lanczos``' tolerance); the default null's fit takes
    the rest of the spectrum from ``HUTCHINSON_PROBES`` products with the deflated operator."""
    op = kh.layer_operator(model, nn.CrossEntropyLoss(), data, layer, kind="hessian")
    result = kh.lanczos(op, min(TOP_K, op.shape[0]), seed=seed, tol=LANCZOS_TOL)
    values = result.eigenvalues
    unseen = unseen_spectrum(op, result, probes=HUTCHINSON_PROBES, seed=seed)
    outliers = outlier_metrics(find_outliers(result, search=TOP_K - 1, unseen=unseen))
    return {"exact_top_eigenvalue": float(values[0]),
            "exact_top_k_condition": top_k_condition(values, op.shape[0], floor=LANCZOS_TOL * 1e-6),
            **{f"exact_{key}": value for key, value in outliers.items()}}


def measure(model: nn.Module, probe, seed: int) -> dict[str, float]:
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), probe, curvature="mc", seed=seed, dtype=torch.float64)
    row = {}
    for layer, position in LAYERS.items():
        metrics = {**kfac_metrics(kfac[layer].eig()), **exact_metrics(model, probe, layer, seed)}
        metrics["kfac_over_exact_top_eigenvalue"] = metrics["top_eigenvalue"] / metrics["exact_top_eigenvalue"]
        row.update({f"{position}.{key}": value for key, value in metrics.items()})
    return row


def run(dataset: DataSet, regime: str, seed: int, epochs: int, figure: Path | None, seed_shift: int = 0) -> list[dict]:
    """Train one model; one row per checkpoint (metrics, accuracies, gap)."""
    options = REGIMES[regime]
    split = load(dataset, options, seed, seed_shift)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(split.n_features, options["width"]), nn.ReLU(),
                          nn.Linear(options["width"], split.n_classes)).double()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    probe = (split.X_train[:PROBE_SAMPLES], split.y_train[:PROBE_SAMPLES])
    tracker = SpectrumTracker(model, loss_fn, probe, every=20, seed=seed) if figure else None
    checkpoints = {max(1, round(f * epochs)): f for f in CHECKPOINTS}
    generator = torch.Generator().manual_seed(seed)
    rows, step = [], 0
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(split.X_train), generator=generator).split(32):
            optimizer.zero_grad()
            loss = loss_fn(model(split.X_train[idx]), split.y_train[idx])
            loss.backward()
            optimizer.step()
            if tracker is not None:
                tracker(step, train_loss=loss.item())
            step += 1
        if epoch in checkpoints:
            with torch.no_grad():
                train_acc = float((model(split.X_train).argmax(1) == split.y_train).double().mean())
                test_acc = float((model(split.X_test).argmax(1) == split.y_test).double().mean())
            rows.append({"dataset": dataset.name, "family": dataset.family, "regime": regime, "seed": seed,
                         "classes": split.n_classes,
                         "checkpoint": checkpoints[epoch], "train_acc": train_acc, "test_acc": test_acc,
                         "gap": train_acc - test_acc, **measure(model, probe, seed)})
    if tracker is not None:
        tracker.plot(figure, metrics=("top_eigenvalue", "trace", "effective_rank", "stable_rank"),
                     title=f"{dataset.name}, {regime} regime ({options}): per-layer MC Fisher spectra through training")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples of the data sets")
    parser.add_argument("--quick", action="store_true", help="10 data sets (one per family), 5 epochs, no figures")
    parser.add_argument("--seed-shift", type=int, default=0,
                        help="add S to every seed and 100·S to every generated set's random_state (a re-run)")
    parser.add_argument("--rows", type=Path, help="write the measured rows here (JSON)")
    parser.add_argument("--render-only", action="store_true", help="render the tables from --rows, measure nothing")
    parser.add_argument("--replicate-rows", type=Path,
                        help="rows (JSON) of a re-run with another --seed-shift: report which cells agree")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "diagnostics.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "tracking_digits.png")
    args = parser.parse_args()
    datasets = DATASETS
    if args.quick:
        args.seeds, args.epochs, args.bootstrap = 1, 5, min(args.bootstrap, 200)
        datasets = [d for i, d in enumerate(DATASETS) if d.family == "bundled" or d.name.endswith("-0")]
    replicate = json.loads(args.replicate_rows.read_text()) if args.replicate_rows else None
    if args.render_only:
        if args.rows is None:
            parser.error("--render-only needs --rows")
        saved = json.loads(args.rows.read_text())
        args.seed_shift = saved.get("seed_shift", 0)
        write(render(saved["rows"], args, saved["seconds"], replicate), args.output)
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start, rows = time.perf_counter(), []
    for dataset in datasets:
        for regime in REGIMES:
            for seed in range(args.seed_shift, args.seed_shift + args.seeds):
                figure = None
                if dataset.name == "digits" and seed == 0 and not args.quick:
                    figure = args.figure.with_name(f"{args.figure.stem}_{regime}{args.figure.suffix}")
                rows.extend(run(dataset, regime, seed, args.epochs, figure, args.seed_shift))
                final = rows[-1]
                print(f"{dataset.name:16s} {regime:8s} seed {seed}: train {final['train_acc']:.3f} test "
                      f"{final['test_acc']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    if args.rows is not None:
        args.rows.write_text(json.dumps({"rows": rows, "seconds": seconds, "seed_shift": args.seed_shift}))
    write(render(rows, args, seconds, replicate), args.output)


def write(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)


KEYS = [f"{p}.{m}" for p in LAYERS.values() for m in (
    "top_eigenvalue", "trace", "effective_rank", "stable_rank", "top_k_condition", "exact_top_eigenvalue",
    "exact_top_k_condition")]


@dataclass
class Bootstrap:
    """Statistics of runs grouped by data set, with percentile intervals from resampling the data sets."""

    runs: list[dict]
    resamples: int
    seed: int = 0

    def __post_init__(self):
        self.names = sorted({r["dataset"] for r in self.runs})
        self.by_dataset = {n: [r for r in self.runs if r["dataset"] == n] for n in self.names}
        rng = np.random.default_rng(self.seed)
        self.draws = rng.integers(0, len(self.names), (self.resamples, len(self.names)))
        # the resampled runs, built once: every table cell reuses them
        self.samples = [[r for i in draw for r in self.by_dataset[self.names[i]]] for draw in self.draws]

    def interval(self, statistic) -> tuple[float, float, float]:
        """``statistic(runs)`` on the data, and the 2.5/97.5 % percentiles over resampled data sets."""
        value = statistic(self.runs)
        samples = np.array([statistic(sample) for sample in self.samples], dtype=float)
        samples = samples[np.isfinite(samples)]
        low, high = np.percentile(samples, [2.5, 97.5]) if len(samples) else (math.nan, math.nan)
        return value, float(low), float(high)

    def mean_interval(self, per_dataset: dict[str, float]) -> tuple[float, float, float]:
        """The mean over data sets of a value computed per data set (e.g. a ρ within it), with its interval."""
        values = np.array([per_dataset[n] for n in self.names], dtype=float)
        samples = np.nanmean(values[self.draws], axis=1)
        samples = samples[np.isfinite(samples)]
        low, high = np.percentile(samples, [2.5, 97.5]) if len(samples) else (math.nan, math.nan)
        return float(np.nanmean(values)), float(low), float(high)


def _rho(runs: list[dict], key: str, against: str = "gap") -> float:
    """Spearman ρ of ``key`` with ``against`` (the generalization gap) over ``runs``."""
    values = np.array([r[key] for r in runs], dtype=float)
    gaps = np.array([r[against] for r in runs], dtype=float)
    keep = np.isfinite(values)
    if keep.sum() < 3 or np.ptp(values[keep]) == 0 or np.ptp(gaps[keep]) == 0:
        return math.nan
    # Spearman ρ = Pearson correlation of the (tie-averaged) ranks; thousands of bootstrap calls, so no spearmanr
    return float(np.corrcoef(_ranks(values[keep]), _ranks(gaps[keep]))[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1…n, ties given their average rank (``scipy.stats.rankdata``'s default, without its per-call cost)."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(1, len(values) + 1)
    _, tie, size = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=ranks) / size)[tie]


def _mean_within_regimes(runs: list[dict], key: str, against: str = "gap") -> float:
    """Mean over regimes of the Spearman ρ within each regime."""
    groups = {}
    for r in runs:
        groups.setdefault(r["regime"], []).append(r)
    values = [_rho(g, key, against) for g in groups.values()]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _regime_median(runs: list[dict], key: str, regime: str) -> float:
    values = [r[key] for r in runs if r["regime"] == regime and np.isfinite(r[key])]
    return float(np.median(values)) if values else math.nan


def _kfac_exact_rho(runs: list[dict], position: str) -> float:
    """Spearman ρ between the KFAC-MC and the exact λ₁ of one layer over runs."""
    return float(spearmanr([r[f"{position}.top_eigenvalue"] for r in runs],
                           [r[f"{position}.exact_top_eigenvalue"] for r in runs])[0])


def _fmt(triple: tuple[float, float, float], signed: bool = False) -> str:
    value, low, high = triple
    spec = "+.2f" if signed else ".3g"
    return f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"


OUTLIER_KEYS = [f"{p}.{source}{m}" for p in LAYERS.values() for source in ("", "exact_") for m in (
    "outliers", "gap_position", "gap_ratio", "outliers_above_null")]
Triple = tuple[float, float, float]  # a statistic and its 95 % bootstrap interval (low, high)


def _regime_mean(runs: list[dict], key: str, regime: str) -> float:
    values = [r[key] for r in runs if r["regime"] == regime and np.isfinite(r[key])]
    return float(np.mean(values)) if values else math.nan


def _share_at_classes_minus_one(runs: list[dict], key: str, regime: str) -> float:
    """Share of a regime's runs whose count is ``C − 1`` (``C`` the data set's classes)."""
    values = [r[key] == r["classes"] - 1 for r in runs if r["regime"] == regime]
    return float(np.mean(values)) if values else math.nan


@cache
def input_dimension(name: str) -> int:
    """The number of features of a data set (the same for every seed and shift)."""
    return load(next(d for d in DATASETS if d.name == name), {}, 0).n_features


def interval_cells(rows: list[dict], resamples: int) -> dict[str, dict[tuple[str, str], Triple]]:
    """Every table cell that carries a bootstrap interval, by table and (row, column): what is rendered, and what a
    re-run is compared on."""
    final = [{**r, "features": input_dimension(r["dataset"])} for r in rows if r["checkpoint"] == 1.0]
    boot = Bootstrap(final, resamples)
    ratios = [f"{p}.kfac_over_exact_top_eigenvalue" for p in LAYERS.values()]
    cells: dict[str, dict[tuple[str, str], Triple]] = {"regime": {}, "correlation": {}, "outliers": {},
                                                       "checkpoints": {}}
    for key in ["train_acc", "test_acc", "gap", *KEYS, *ratios]:
        for g in REGIMES:
            cells["regime"][key, g] = boot.interval(partial(_regime_median, key=key, regime=g))
    for key in KEYS:
        cells["correlation"][key, "all runs"] = boot.interval(partial(_rho, key=key))
        cells["correlation"][key, "within regime"] = boot.interval(partial(_mean_within_regimes, key=key))
        cells["correlation"][key, "within data set"] = boot.mean_interval(
            {n: _rho(runs, key) for n, runs in boot.by_dataset.items()})
        cells["correlation"][key, "input dimension"] = boot.interval(
            partial(_mean_within_regimes, key=key, against="features"))
    for g in REGIMES:
        cells["outliers"]["classes C − 1", g] = boot.interval(
            lambda runs, g=g: float(np.mean([r["classes"] - 1 for r in runs if r["regime"] == g])))
        for key in OUTLIER_KEYS:
            cells["outliers"][key, g] = boot.interval(partial(_regime_mean, key=key, regime=g))
            if key.endswith(".outliers") or key.endswith("exact_outliers"):
                cells["outliers"][f"{key} = C − 1 (share)", g] = boot.interval(
                    partial(_share_at_classes_minus_one, key=key, regime=g))
    for position in LAYERS.values():
        for fraction in CHECKPOINTS:
            at = Bootstrap([r for r in rows if r["checkpoint"] == fraction], resamples)
            ratio = f"{position}.kfac_over_exact_top_eigenvalue"
            row = f"{position} {fraction:g}"
            for g in REGIMES:
                cells["checkpoints"][row, g] = at.interval(partial(_regime_median, key=ratio, regime=g))
            cells["checkpoints"][row, "ρ"] = at.interval(partial(_kfac_exact_rho, position=position))
    return cells


def cells_agree(first: Triple, second: Triple) -> bool | None:
    """``benchmarks.intervals.agree``'s rule on bootstrap intervals: ``|x₁ − x₂| ≤ √(h₁² + h₂²)``, ``h`` the half-width
    ``(high − low)/2`` of the percentile interval; ``None`` when a value or an interval is not finite."""
    if not all(np.isfinite([*first, *second])):
        return None
    return abs(first[0] - second[0]) <= math.hypot((first[2] - first[1]) / 2, (second[2] - second[1]) / 2)


def agreement_lines(first: dict, second: dict, shifts: tuple[int, int]) -> list[str]:
    """The re-run section: per table, how many cells agree, and the cells that do not."""
    verdicts = {table: {cell: cells_agree(first[table][cell], second[table][cell])
                        for cell in first[table] if cell in second[table]} for table in first}
    compared = [v for own in verdicts.values() for v in own.values() if v is not None]
    lines = ["## Re-run on new seeds", "",
             f"Seed shift {shifts[1]} against {shifts[0]}: every training seed moved (split, initialization, batch "
             "order, MC labels; the bundled sets re-split and re-initialized) and every generated set drawn anew "
             f"(`random_state + {DRAW_SHIFT}·shift`). A cell agrees when the difference of the two values lies within "
             "the combined half-width √(h₁² + h₂²) of their bootstrap intervals (the rule of "
             "`benchmarks/intervals.py`, with h = half the percentile interval's width); cells whose value or "
             "interval is not finite are not compared.", "",
             f"**{sum(compared)} of {len(compared)} cells agree.**", "",
             "| table | cells agree | cells that do not: first [interval] / re-run [interval] |", "|---|---|---|"]
    for table in first:
        own = {cell: v for cell, v in verdicts[table].items() if v is not None}
        misses = "; ".join(f"{row} / {column}: {_fmt(first[table][row, column])} vs {_fmt(second[table][row, column])}"
                           for (row, column), v in own.items() if not v)
        lines.append(f"| {table} | {sum(own.values())} of {len(own)} | {misses or '—'} |")
    return lines


def render(rows: list[dict], args, seconds: float, replicate: dict | None = None) -> str:
    final = [r for r in rows if r["checkpoint"] == 1.0]
    names = sorted({r["dataset"] for r in final})
    cells = interval_cells(rows, args.bootstrap)
    quick = " --quick" if args.quick else ""
    shift = f" --seed-shift {args.seed_shift}" if args.seed_shift else ""
    families = sorted({d.family for d in DATASETS})
    naive = [r[f"{p}.naive_top_k_condition"] for r in final for p in LAYERS.values()]
    lines = [
        f"# Spectral diagnostics by training regime over {len(names)} data sets (generated)", "",
        f"Command: `python -m benchmarks.diagnostics_study --seeds {args.seeds} --epochs {args.epochs} "
        f"--bootstrap {args.bootstrap}{quick}{shift}` ({time.strftime('%Y-%m-%d')}, CPU, {seconds / 60:.1f} min). "
        f"{len(final)} runs on {len(names)} data sets ({len(REGIMES)} regimes × {args.seeds} seed(s) each): a "
        "1-hidden-layer ReLU MLP, Adam, batches of 32, float64; 'first' = hidden layer, 'last' = output layer. "
        "Regimes: " + "; ".join(f"{k} {v}" for k, v in REGIMES.items()) + ". Metrics on a fixed probe batch (the "
        f"first ≤ {PROBE_SAMPLES} training samples): KFAC-MC = the Monte-Carlo Fisher Kronecker block (one label per "
        "sample), all eigenvalues; exact = the layer's Hessian block, top-10 by Lanczos. Brackets: 95 % bootstrap "
        f"interval over data sets ({args.bootstrap} resamples of the {len(names)} data sets, each with all its "
        "runs).", "",
        "## What this answers, and what it does not", "",
        "It answers which per-layer spectral metrics move with the generalization gap across training regimes and "
        "data sets, and how far the KFAC-MC metrics that `SpectrumTracker` records are from the exact block's. It "
        "does not show that a metric *predicts* generalization: the regimes change the width, the training set "
        "size and the label noise, and the gap is driven mostly by the last two (the overfit regime's 60 noisy "
        "samples) while the spectral scale is driven by the width — so a correlation over all runs is "
        "largely a regime effect (confounder: regime; 'wide' vs 'overfit' changes the data only, 'well' vs 'wide' "
        "the width only). Within a data set the runs differ only by regime and seed, so the within-data-set ρ is "
        "also a regime contrast; the within-regime ρ (runs of one regime over data "
        "sets) asks whether the metric tracks the gap when the architecture and recipe are fixed, where the data "
        "set is the confounder (its size, dimension and difficulty move both). The epochs are the same in every "
        "regime, so the overfit regime (60 samples: 2 steps per epoch) takes far fewer optimizer steps than the "
        "others and need not reach interpolation — training length is a further confounder. One architecture "
        "family, one optimizer, short training; one seed per (data set, regime) by default, since the intervals "
        "come from resampling data sets.", "",
        "## Data sets", "",
        f"Bundled: iris, wine, breast cancer, digits. Generated ({GENERATED_SAMPLES} samples each; families: "
        f"{', '.join(f for f in families if f != 'bundled')}): two generated sets are distinct "
        "when their family or their generator parameters differ — every set below has its own (family, parameters) "
        "and its own fixed `random_state`, drawn once and shared by all runs, regimes and seeds of one seed shift "
        "(seeds change the train/test split, initialization, batch order and MC labels only; a seed shift S draws "
        f"every generated set anew from `random_state + {DRAW_SHIFT}·S`).", "",
        "| data set | family | parameters | features | classes |", "|---|---|---|---|---|",
    ]
    for dataset in (d for d in DATASETS if d.name in names):
        split = load(dataset, {}, 0)
        params = ", ".join(f"{k}={v}" for k, v in dataset.parameters.items()) or "—"
        lines.append(f"| {dataset.name} | {dataset.family} | {params} | {split.n_features} | {split.n_classes} |")
    lines += ["", "## Per regime at the end of training", "",
              "Median over runs [bootstrap interval over data sets].", "",
              "| metric | " + " | ".join(REGIMES) + " |", "|---|" + "---|" * len(REGIMES)]
    ratios = [f"{p}.kfac_over_exact_top_eigenvalue" for p in LAYERS.values()]
    for key in ["train_acc", "test_acc", "gap", *KEYS, *ratios]:
        lines.append(f"| {key} | " + " | ".join(_fmt(cells["regime"][key, g]) for g in REGIMES) + " |")
    lines += ["", "## Rank correlation with the generalization gap", "",
              "Spearman ρ of each final metric with the gap [bootstrap interval over data sets]: over all runs; the "
              "mean of the ρ within each regime (runs of one regime across data sets); the mean of the ρ within "
              "each data set (its runs across regimes and seeds). Last column: the data-set confounder made "
              "visible — the mean within-regime ρ of the metric with the data set's input dimension instead of "
              "the gap.", "",
              "| metric | ρ all runs | ρ within regime | ρ within data set | ρ with input dimension, within regime |",
              "|---|---|---|---|---|"]
    for key in KEYS:
        row = [_fmt(cells["correlation"][key, column], signed=True)
               for column in ("all runs", "within regime", "within data set", "input dimension")]
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    lines += ["", "## Exact top-k beside KFAC-MC through training", "",
              "Median of KFAC-MC λ₁ ÷ exact λ₁ [bootstrap interval over data sets], per checkpoint (fraction of the "
              "epochs), and the Spearman ρ between the KFAC-MC and the exact λ₁ over all runs at that checkpoint.", "",
              "| layer | checkpoint | " + " | ".join(REGIMES) + " | ρ(KFAC-MC λ₁, exact λ₁) |",
              "|---|---|" + "---|" * (len(REGIMES) + 1)]
    for position in LAYERS.values():
        for fraction in CHECKPOINTS:
            row = f"{position} {fraction:g}"
            lines.append(f"| {position} | {fraction:g} | " + " | ".join(_fmt(cells["checkpoints"][row, g])
                                                                       for g in REGIMES)
                         + f" | {_fmt(cells['checkpoints'][row, 'ρ'], True)} |")
    lines += ["", "## Outliers of the top-10 by regime", "",
              "Mean over a regime's final runs [bootstrap interval over data sets] of the outlier statistic "
              "(`find_outliers`) of each layer block's top-10 eigenvalues — KFAC-MC (its top-10 of all its "
              "eigenvalues) and exact (the Lanczos top-10 of the Hessian block): `outliers` = the count (the widest "
              "ratio λ_i/λ_(i+1) among the top-10 is ≥ 2, else 0), `gap_position` = where that widest gap falls, "
              "`gap_ratio` its width, `outliers_above_null` = eigenvalues above the upper edge of the default null "
              "(a Marchenko–Pastur bulk with σ² and γ fitted to the bulk's mean and variance; for the exact block "
              f"the spectrum beyond the top-10 enters by {HUTCHINSON_PROBES} Hutchinson probes of the deflated "
              "operator, and only the top-10 are known: 10 means all of them stand above the edge, a lower bound; "
              "KFAC-MC's counts run over all its eigenvalues); `= C − 1 (share)` = the share of runs whose count "
              "is the data set's C − 1, beside the mean "
              "C − 1 itself. A search among 10 eigenvalues finds at most 9 outliers: for the 10-class sets (digits, "
              "clusters-3) C − 1 = 9 is the ceiling. The Marchenko–Pastur bulk is a reference shape, not a "
              "model of a Hessian (see `kfac_hessian.analyses.outliers`): `outliers_above_null` counts eigenvalues "
              "further from the bulk than a Wishart bulk of the same mean and spread would reach.", "",
              "| statistic | " + " | ".join(REGIMES) + " |", "|---|" + "---|" * len(REGIMES)]
    for key in dict.fromkeys(row for row, _ in cells["outliers"]):
        lines.append(f"| {key} | " + " | ".join(_fmt(cells["outliers"][key, g]) for g in REGIMES) + " |")
    huge, infinite = sum(v > 1e12 for v in naive), sum(math.isinf(v) for v in naive)
    lines += ["", "## Round-off in the condition number", "",
              f"`λ₁/λ_{TOP_K}` over all eigenvalues, as the previous version of this study reported it, exceeds 1e12 "
              f"in {huge} of {len(naive)} final layer blocks ({infinite} of them infinite: λ_{TOP_K} ≤ 0): "
              f"there λ_{TOP_K} is round-off (e.g. `G`'s null direction `1` under cross-entropy, a block of rank "
              f"below {TOP_K}), and the ratio measures float64's epsilon, not the network. `top_k_condition` above "
              f"counts only eigenvalues above `P·ε·λ₁`."]
    if replicate is not None:
        again = interval_cells(replicate["rows"], args.bootstrap)
        shifts = (args.seed_shift, replicate.get("seed_shift", 0))
        base = f"python -m benchmarks.diagnostics_study --seeds {args.seeds} --epochs {args.epochs} --bootstrap " \
               f"{args.bootstrap}{quick}"
        lines += ["", *agreement_lines(cells, again, shifts), "",
                  f"Commands: `{base} --seed-shift {shifts[0]} --rows first.json`, `{base} --seed-shift {shifts[1]} "
                  f"--rows rerun.json` ({replicate['seconds'] / 60:.1f} min), then `{base} --render-only --rows "
                  "first.json --replicate-rows rerun.json` (this page)."]
    return "\n".join(lines) + "\n"




if __name__ == "__main__":
    main()
