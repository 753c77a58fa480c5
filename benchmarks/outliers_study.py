"""Sagun et al. 2017 on the exact path, over seeds: a bulk near zero plus about C − 1 outliers?

Small ReLU MLPs ``d → w → w → C`` (``d = 10``) are trained with Adam on Gaussian clusters
(``benchmarks/clusters.py``); around a base setting one factor is varied at a time — classes ``C``, clusters per
class ``K``, width ``w``, separability, training stage (epochs, from initialization to interpolation). For each
trained model the whole-model Hessian and GGN are formed densely in float64 (``layer_operator(model, …, None)``;
≤ 1.6 k parameters) and every layer block is read off the whole-model Hessian (its diagonal block; for a ReLU network
a layer's Hessian block equals its GGN block). The outlier statistic of each spectrum is ``find_outliers`` (the widest
log-gap among the 50 largest positive eigenvalues: its position, its ratio; outliers when the ratio is ≥ 2). Beside
each layer's exact statistic: KFAC (``compute_kfac``, GGN), EKFAC (``compute_ekfac``) and the nearest Kronecker product
(``compute_kronecker_fit``). Also the same-basin claim — training loss and whole-model ``λ₁`` along the straight path
between a small-batch and a large-batch solution from the same initialization, beside the path between two
small-batch solutions from different initializations — and the scikit-learn digits demo (``kfac_hessian/demo.py``)
over seeds. Every cell is a mean with the half-width of its 95 % t-interval over seeds (``benchmarks/intervals.py``);
``--replicate`` reruns every cell on as many new seeds and says whether the two runs agree. Beside each count, the
counts above two nulls: the default null of ``find_outliers`` (a Marchenko–Pastur bulk fitted to the spectrum) and,
where the study measures it anyway (the training-stage factor, whose epoch 0 is the same model at initialization),
the largest eigenvalue of the same spectrum at initialization.

    python -m benchmarks.outliers_study                # 5 seeds + 5 replicate seeds → docs/results/outliers.md
    python -m benchmarks.outliers_study --quick        # 3 seeds, fewer settings, printed only (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import torch
from torch import Tensor, nn

import kfac_hessian as kh
from kfac_hessian.analyses.outliers import OutlierResult, find_outliers, unseen_spectrum
from kfac_hessian.demo import relu_mlp, train_classifier, train_digits_mlp

from .clusters import ClusterData, gaussian_clusters
from .intervals import count_agreement, format_interval

LAYERS = ("0", "2", "4")  # the Linear layers of relu_mlp((d, w, w, C))
APPROXIMATIONS = ("kfac", "ekfac", "fit")
LEARNING_RATE, BATCH_SIZE = 1e-2, 100
COMPARED = ("model/hessian", "model/ggn", *(f"{n}/exact" for n in LAYERS), *(f"4/{a}" for a in APPROXIMATIONS))


@dataclass(frozen=True)
class Setting:
    """One point of the study: the data (C, K, separation), the width and the training stage (Adam epochs)."""

    n_classes: int = 5
    clusters_per_class: int = 2
    width: int = 16
    separation: float = 4.0
    epochs: int = 25
    dim: int = 10
    n_train: int = 500

    def model_description(self) -> str:
        return f"ReLU MLP {self.dim}-{self.width}-{self.width}-{self.n_classes}"


BASE = Setting()
FACTORS: dict[str, tuple[str, tuple]] = {
    "classes C": ("n_classes", (2, 5, 10)),
    "clusters per class K": ("clusters_per_class", (1, 2, 4)),
    "width w": ("width", (8, 16, 32)),
    "separation": ("separation", (2.0, 4.0, 8.0)),
    "epochs (training stage)": ("epochs", (0, 1, 5, 25, 200)),
}
QUICK_FACTORS: dict[str, tuple[str, tuple]] = {
    "classes C": ("n_classes", (2, 5, 10)),
    "epochs (training stage)": ("epochs", (0, 25)),
}


@dataclass
class Measurement:
    """The outlier statistics of one trained model: ``spectra`` maps ``"model/hessian"``, ``"model/ggn"``,
    ``"<layer>/exact"`` and ``"<layer>/<approximation>"`` to ``find_outliers`` results (with the default null), and
    ``values`` the same keys to the eigenvalues themselves, descending (at initialization: a null for later stages)."""

    spectra: dict[str, OutlierResult]
    values: dict[str, Tensor]
    train_accuracy: float
    test_accuracy: float
    train_loss: float
    hessian_ggn_difference: float  # ‖H − GGN‖_F / ‖H‖_F of the whole model
    layer_hessian_ggn_difference: float  # the largest of the same over the layer blocks (0 up to round-off: ReLU)
    top_hessian: Tensor  # the largest whole-model Hessian eigenvalues, descending


def _accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


def _dense(model: nn.Module, loss_fn: nn.Module, data, kind: str) -> Tensor:
    """The whole-model curvature matrix (public order: ``model.parameters()``), symmetrized."""
    P = sum(p.numel() for p in model.parameters())
    matrix = kh.layer_operator(model, loss_fn, data, None, kind=kind).to_dense(max_params=P)
    return 0.5 * (matrix + matrix.T)


def _layer_slices(model: nn.Module) -> dict[str, slice]:
    """Each Linear layer's range in ``model.parameters()`` order (its weight, then its bias)."""
    slices, start = {}, 0
    for name in LAYERS:
        size = sum(p.numel() for p in model.get_submodule(name).parameters())
        slices[name] = slice(start, start + size)
        start += size
    return slices


def measure(model: nn.Module, data: ClusterData) -> Measurement:
    """Every outlier statistic of one trained model on its training set (module docstring)."""
    loss_fn = nn.CrossEntropyLoss()
    train = (data.X_train, data.y_train)
    hessian, ggn = _dense(model, loss_fn, train, "hessian"), _dense(model, loss_fn, train, "ggn")
    values = {"model/hessian": torch.linalg.eigvalsh(hessian).flip(0), "model/ggn": torch.linalg.eigvalsh(ggn).flip(0)}
    layer_difference = 0.0
    for name, part in _layer_slices(model).items():
        values[f"{name}/exact"] = torch.linalg.eigvalsh(hessian[part, part]).flip(0)
        layer_difference = max(layer_difference,
                               float((hessian[part, part] - ggn[part, part]).norm() / hessian[part, part].norm()))
    kfac = kh.compute_kfac(model, loss_fn, train, curvature="ggn")
    approximations = {"kfac": kfac, "ekfac": kh.compute_ekfac(model, loss_fn, train, kfac=kfac),
                      "fit": kh.compute_kronecker_fit(model, loss_fn, train, kfac=kfac)}
    for label, result in approximations.items():
        for name in LAYERS:
            values[f"{name}/{label}"] = result[name].eig().eigenvalues.detach().double()
    spectra = {key: find_outliers(spectrum) for key, spectrum in values.items()}
    with torch.no_grad():
        train_loss = float(loss_fn(model(data.X_train), data.y_train))
    return Measurement(spectra, values, _accuracy(model, *train), _accuracy(model, data.X_test, data.y_test),
                       train_loss, float((hessian - ggn).norm() / hessian.norm()), layer_difference,
                       values["model/hessian"][:20])


def _new_model(setting: Setting, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return relu_mlp((setting.dim, setting.width, setting.width, setting.n_classes)).double()


def train_and_measure(setting: Setting, epochs: Iterable[int], seed: int) -> dict[int, Measurement]:
    """One training run of ``setting`` (its ``epochs`` ignored), measured at each of ``epochs``."""
    data = gaussian_clusters(setting.n_classes, setting.clusters_per_class, setting.dim, setting.separation,
                             setting.n_train, n_test=500, seed=seed)
    model, done, results = _new_model(setting, seed), 0, {}
    for stage in sorted(set(epochs)):
        # each stretch shuffles with its own seed: deterministic, so a stage is the same model in every table
        train_classifier(model, nn.CrossEntropyLoss(), data.X_train, data.y_train, stage - done, lr=LEARNING_RATE,
                         batch_size=BATCH_SIZE, seed=seed + stage)
        done = stage
        results[stage] = measure(model, data)
    return results


def run_settings(factors: dict[str, tuple[str, tuple]], seeds: list[int],
                 log: Callable[[str], None]) -> dict[Setting, list[Measurement]]:
    """Every setting of ``factors`` (one field of ``BASE`` changed at a time) measured for every seed; settings that
    differ only in ``epochs`` share one training run."""
    settings = {replace(BASE, **{field: value}) for field, values in factors.values() for value in values}
    runs: dict[Setting, set[int]] = {}
    for setting in settings:
        runs.setdefault(replace(setting, epochs=0), set()).add(setting.epochs)
    measured: dict[Setting, list[Measurement]] = {s: [] for s in settings}
    for run, stages in sorted(runs.items(), key=lambda item: repr(item[0])):
        start = time.perf_counter()
        for seed in seeds:
            for stage, measurement in train_and_measure(run, stages, seed).items():
                measured[replace(run, epochs=stage)].append(measurement)
        log(f"  {run} at epochs {sorted(stages)}: {len(seeds)} seeds in {time.perf_counter() - start:.0f}s")
    return measured


# ----------------------------------------------------------------------------------------------- same basin


@dataclass
class PathMeasurement:
    """Training loss and whole-model Hessian ``λ₁`` at ``alphas`` along ``(1 − α) θ_a + α θ_b``."""

    alphas: list[float]
    losses: list[float]
    top_eigenvalues: list[float]

    @property
    def barrier(self) -> float:
        """Highest loss on the path above the higher end point (0 when the path never rises above its ends)."""
        return max(self.losses) - max(self.losses[0], self.losses[-1])


def _path(model_a: nn.Module, model_b: nn.Module, data: ClusterData, points: int, seed: int) -> PathMeasurement:
    loss_fn, train = nn.CrossEntropyLoss(), (data.X_train, data.y_train)
    end_a, end_b = nn.utils.parameters_to_vector(model_a.parameters()), nn.utils.parameters_to_vector(
        model_b.parameters())
    probe = copy.deepcopy(model_a)
    alphas = [i / (points - 1) for i in range(points)]
    losses, tops = [], []
    for alpha in alphas:
        nn.utils.vector_to_parameters((1 - alpha) * end_a + alpha * end_b, probe.parameters())
        with torch.no_grad():
            losses.append(float(loss_fn(probe(data.X_train), data.y_train)))
        operator = kh.layer_operator(probe, loss_fn, train, None, kind="hessian")
        tops.append(float(kh.lanczos(operator, 1, tol=1e-8, seed=seed).eigenvalues[0]))
    return PathMeasurement(alphas, losses, tops)


def same_basin(seeds: list[int], points: int, log: Callable[[str], None]) -> dict[str, list[PathMeasurement]]:
    """Small-batch (10) vs large-batch (full, 500) SGD solutions from one initialization, and, as the contrast, two
    small-batch solutions from different initializations; the base data (``BASE``), SGD with momentum 0.9."""
    paths: dict[str, list[PathMeasurement]] = {"small ↔ large batch, same init": [],
                                               "small ↔ small batch, different inits": []}
    start = time.perf_counter()
    for seed in seeds:
        data = gaussian_clusters(BASE.n_classes, BASE.clusters_per_class, BASE.dim, BASE.separation, BASE.n_train,
                                 n_test=0, seed=seed)
        solutions = {}
        for label, init_seed, batch, epochs, lr in (("small", seed, 10, 50, 0.01),
                                                    ("large", seed, BASE.n_train, 500, 0.1),
                                                    ("other", seed + 1000, 10, 50, 0.01)):
            model = _new_model(BASE, init_seed)
            train_classifier(model, nn.CrossEntropyLoss(), data.X_train, data.y_train, epochs, lr=lr,
                             batch_size=batch, seed=seed, optimizer="sgd")
            solutions[label] = model
        for label, other in zip(paths, ("large", "other")):
            paths[label].append(_path(solutions["small"], solutions[other], data, points, seed))
    log(f"  same basin: {len(seeds)} seeds in {time.perf_counter() - start:.0f}s")
    return paths


# ----------------------------------------------------------------------------------------------- digits demo


@dataclass
class DigitsMeasurement:
    """The demo's model (``train_digits_mlp``, float64): its output layer's exact Hessian block and KFAC block,
    and the top of its whole-model Hessian (Lanczos)."""

    output_exact: OutlierResult
    output_kfac: OutlierResult
    model_top: OutlierResult
    test_accuracy: float


def digits_demo(seeds: list[int], epochs: int, model_top: int, log: Callable[[str], None]) -> list[DigitsMeasurement]:
    results = []
    start = time.perf_counter()
    for seed in seeds:
        problem = train_digits_mlp(epochs=epochs, seed=seed, dtype=torch.float64)
        model, loss_fn, train = problem.model, problem.loss_fn, problem.train
        output = kh.layer_operator(model, loss_fn, train, "4", kind="hessian")
        kfac = kh.compute_kfac(model, loss_fn, train, curvature="ggn")
        whole = kh.layer_operator(model, loss_fn, train, None, kind="hessian")
        top = kh.lanczos(whole, model_top, tol=1e-6, seed=seed)
        # the default null of a top-k: the rest of the spectrum from Hutchinson probes of the deflated operator
        unseen = unseen_spectrum(whole, top, probes=32, seed=seed)
        results.append(DigitsMeasurement(find_outliers(torch.linalg.eigvalsh(output.to_dense())),
                                         find_outliers(kfac["4"].eig()), find_outliers(top, unseen=unseen),
                                         problem.test_accuracy))
    log(f"  digits demo: {len(seeds)} seeds in {time.perf_counter() - start:.0f}s")
    return results


# ----------------------------------------------------------------------------------------------- tables


def _cell(values: list[float], digits: int = 2) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return format_interval(finite, digits) if finite else "–"


def _gap_cell(results: list[OutlierResult]) -> str:
    """``position (ratio)``: where the widest gap falls and how wide it is, each mean ± half-width."""
    return f"{_cell([r.gap_position for r in results])} ({_cell([r.gap_ratio for r in results])})"


def _hits(results: list[OutlierResult], n_classes: int) -> str:
    """Seeds whose count (a gap of ratio ≥ 2) is C − 1, and C."""
    return (f"{sum(r.count == n_classes - 1 for r in results)} / {sum(r.count == n_classes for r in results)}"
            f" of {len(results)}")


def _factor_rows(measured: dict[Setting, list[Measurement]], factors: dict[str, tuple[str, tuple]]):
    for factor, (field, values) in factors.items():
        for value in values:
            setting = replace(BASE, **{field: value})
            yield factor, f"{field}={value}" + (" (base)" if setting == BASE else ""), setting, measured[setting]


def whole_model_table(measured, factors) -> list[str]:
    lines = ["| factor | setting | train acc | test acc | train loss | Hessian: gap after (ratio) "
             "| Hessian: = C−1 / = C | GGN: gap after (ratio) | GGN: = C−1 / = C | ‖H−GGN‖/‖H‖ "
             "| layers: ‖H−GGN‖/‖H‖ | λ₁ (H) | λ_C (H) | λ_min/λ₁ (H) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for factor, label, setting, runs in _factor_rows(measured, factors):
        hessian = [m.spectra["model/hessian"] for m in runs]
        ggn = [m.spectra["model/ggn"] for m in runs]
        C = setting.n_classes
        lines.append(
            f"| {factor} | {label} | {_cell([m.train_accuracy for m in runs], 3)} "
            f"| {_cell([m.test_accuracy for m in runs], 3)} | {_cell([m.train_loss for m in runs])} "
            f"| {_gap_cell(hessian)} | {_hits(hessian, C)} | {_gap_cell(ggn)} | {_hits(ggn, C)} "
            f"| {_cell([m.hessian_ggn_difference for m in runs])} "
            f"| {max(m.layer_hessian_ggn_difference for m in runs):.1e} "
            f"| {_cell([float(m.top_hessian[0]) for m in runs])} "
            f"| {_cell([float(m.top_hessian[C - 1]) for m in runs])} "
            f"| {_cell([(r.most_negative or 0.0) / float(m.top_hessian[0]) for r, m in zip(hessian, runs)])} |")
    return lines


def layer_table(measured, factors) -> list[str]:
    lines = ["| factor | setting | layer | exact: gap after (ratio) | exact: = C−1 / = C | KFAC: gap after (ratio) "
             "| EKFAC: gap after (ratio) | fit: gap after (ratio) | KFAC / EKFAC / fit: = C−1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for factor, label, setting, runs in _factor_rows(measured, factors):
        C = setting.n_classes
        for name in LAYERS:
            exact = [m.spectra[f"{name}/exact"] for m in runs]
            approx = {a: [m.spectra[f"{name}/{a}"] for m in runs] for a in APPROXIMATIONS}
            approx_hits = " / ".join(str(sum(r.count == C - 1 for r in approx[a])) for a in APPROXIMATIONS)
            lines.append(f"| {factor} | {label} | {name} | {_gap_cell(exact)} | {_hits(exact, C)} "
                         f"| {_gap_cell(approx['kfac'])} | {_gap_cell(approx['ekfac'])} | {_gap_cell(approx['fit'])} "
                         f"| {approx_hits} of {len(runs)} |")
    return lines


def _above_null(results: list[OutlierResult]) -> list[float]:
    """Eigenvalues above the default (Marchenko–Pastur) null's edge, per seed."""
    return [r.null.count_above if r.null is not None else math.nan for r in results]


def null_table(measured, factors) -> list[str]:
    """Each count beside the counts above the nulls: the default null's edge (its fitted γ beside it) and, where the
    same seeds' models are measured at initialization (epoch 0 of the training-stage factor), the largest eigenvalue
    of the same spectrum at initialization."""
    lines = ["| factor | setting | spectrum | count (ratio ≥ 2) | above the fitted MP edge | fitted γ "
             "| above λ₁ at initialization |", "|---|---|---|---|---|---|---|"]
    for factor, label, setting, runs in _factor_rows(measured, factors):
        init = measured.get(replace(setting, epochs=0))
        for key in COMPARED:
            results = [m.spectra[key] for m in runs]
            above_init = "–" if init is None else _cell(
                [float((m.values[key] > m0.values[key][0]).sum()) for m, m0 in zip(runs, init)])
            lines.append(f"| {factor} | {label} | {key} | {_cell([r.count for r in results])} "
                         f"| {_cell(_above_null(results))} "
                         f"| {_cell([r.null.aspect_ratio if r.null else math.nan for r in results])} | {above_init} |")
    return lines


def agreement_table(first, second, factors) -> list[str]:
    """For each setting and spectrum: do the gap position and ratio, and the count above the default null, of the
    replicate seeds agree with the first?"""
    cells, rows = {}, []
    statistics = {"position": lambda rs: [r.gap_position for r in rs], "ratio": lambda rs: [r.gap_ratio for r in rs],
                  "above MP edge": _above_null}
    for factor, label, setting, runs in _factor_rows(first, factors):
        for key in COMPARED:
            a = [m.spectra[key] for m in runs]
            b = [m.spectra[key] for m in second[setting]]
            name = f"{factor} {label} {key}"
            for stat, of in statistics.items():
                cells[f"{name} {stat}"] = [of(a), of(b)]
            rows.append((factor, label, key, name))
    counted = count_agreement(cells)
    lines = ["| factor | setting | spectrum | gap after: first / replicate | agree | ratio: first / replicate "
             "| agree | above MP edge: first / replicate | agree |",
             "|---|---|---|---|---|---|---|---|---|"]
    for factor, label, key, name in rows:
        row = ""
        for stat in statistics:
            first_values, second_values = cells[f"{name} {stat}"]
            verdict = "**no**" if f"{name} {stat}" in counted.disagreeing else "yes"
            row += f" | {_cell(first_values)} / {_cell(second_values)} | {verdict}"
        lines.append(f"| {factor} | {label} | {key}{row} |")
    return [f"{counted.agreeing} of {counted.compared} cells agree (difference of means within the combined "
            "half-width).", "", *lines]


def basin_table(paths: dict[str, list[PathMeasurement]]) -> list[str]:
    lines = ["| path | loss at α = 0 | loss at α = 0.5 | loss at α = 1 | barrier (max − higher end) | λ₁ at α = 0 "
             "| max λ₁ on the path | λ₁ at α = 1 |", "|---|---|---|---|---|---|---|---|"]
    for label, runs in paths.items():
        middle = len(runs[0].alphas) // 2
        lines.append(f"| {label} | {_cell([r.losses[0] for r in runs])} | {_cell([r.losses[middle] for r in runs])} "
                     f"| {_cell([r.losses[-1] for r in runs])} | {_cell([r.barrier for r in runs])} "
                     f"| {_cell([r.top_eigenvalues[0] for r in runs])} "
                     f"| {_cell([max(r.top_eigenvalues) for r in runs])} "
                     f"| {_cell([r.top_eigenvalues[-1] for r in runs])} |")
    return lines


def digits_table(results: list[DigitsMeasurement]) -> list[str]:
    lines = ["| spectrum | gap after (ratio) | count (ratio ≥ 2) = 9 | count = 10 | count = 0 "
             "| above the fitted MP edge | fitted γ |", "|---|---|---|---|---|---|---|"]
    for label, key in (("output layer 4, exact Hessian (330 × 330)", "output_exact"),
                       ("output layer 4, KFAC", "output_kfac"), ("whole model, Hessian top-30 (Lanczos)", "model_top")):
        rs = [getattr(r, key) for r in results]
        hits = " | ".join(f"{sum(r.count == n for r in rs)} of {len(rs)}" for n in (9, 10, 0))
        lines.append(f"| {label} | {_gap_cell(rs)} | {hits} | {_cell(_above_null(rs))} "
                     f"| {_cell([r.null.aspect_ratio for r in rs])} |")
    per_seed = ", ".join(f"{r.output_exact.gap_position} ({r.output_exact.gap_ratio:.2f})" for r in results)
    return [*lines, "", f"Output layer, exact, per seed — gap after (ratio): {per_seed}."]


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outliers_study", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 5; --quick: 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed, first-seed + 1, …")
    parser.add_argument("--replicate", action=argparse.BooleanOptionalAction, default=None,
                        help="rerun every cell on as many new seeds and check agreement (default: on, off in --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer settings and seeds; printed, not written")
    parser.add_argument("--factors", nargs="*", choices=list(FACTORS), default=None,
                        help="vary only these factors (default: all; --quick: classes and two training stages)")
    parser.add_argument("--no-basin", action="store_true", help="skip the same-basin paths")
    parser.add_argument("--no-digits", action="store_true", help="skip the digits demo")
    parser.add_argument("--out", default=None, help="markdown file (default docs/results/outliers.md; --quick: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    return parser


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    n_seeds = args.seeds or (3 if args.quick else 5)
    if n_seeds < 2:
        raise ValueError("a confidence interval over seeds needs --seeds ≥ 2")
    replicate = (not args.quick) if args.replicate is None else args.replicate
    factors = QUICK_FACTORS if args.quick else FACTORS
    if args.factors is not None:
        factors = {name: FACTORS[name] for name in args.factors}
    out = args.out if args.out is not None else (None if args.quick else "docs/results/outliers.md")
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    new_seeds = list(range(seeds[-1] + 1, seeds[-1] + 1 + n_seeds))
    log = print
    command = " ".join(["python -m benchmarks.outliers_study", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    log(f"outlier study: seeds {seeds}" + (f", replicate seeds {new_seeds}" if replicate else ""))
    measured = run_settings(factors, seeds, log)
    sections = [
        "# Outliers above the bulk, over seeds (generated)", "",
        f"Command: `{command}` ({date.today()}, CPU, float64, torch {torch.__version__}). Seeds {seeds}"
        + (f"; replicate seeds {new_seeds}." if replicate else "."),
        "",
        f"Data: `benchmarks.clusters.gaussian_clusters` — C classes × K Gaussian clusters in R^{BASE.dim}, cluster "
        f"means of norm `separation` in random directions, unit noise; {BASE.n_train} training and 500 test samples. "
        f"Model: {BASE.model_description()} at the base setting (width and C varied below), Adam lr {LEARNING_RATE}, "
        f"batch {BATCH_SIZE}. Base: C = {BASE.n_classes}, K = {BASE.clusters_per_class}, w = {BASE.width}, "
        f"separation {BASE.separation}, {BASE.epochs} epochs; one factor varied at a time.",
        "",
        "Statistic (`kfac_hessian.analyses.outliers.find_outliers`): the widest ratio λ_i/λ_(i+1) among the 50 largest "
        "positive eigenvalues above 1e-8·λ₁. *gap after* = its position i (how many eigenvalues stand above it), "
        "*ratio* = its width; the *count* is i when the ratio is ≥ 2, else 0. '= C−1 / = C' = the seeds whose count is "
        "C − 1, and C. Every cell: mean ± half-width of the 95 % t-interval over seeds.",
        "",
        "## Whole model",
        "",
        "What it answers: does the Hessian of **all** parameters (what Sagun et al. measured) have C − 1 (or C) "
        "eigenvalues above a gap? The GGN beside it (the whole-model Hessian adds cross-layer second-order terms); "
        "λ_C = the first eigenvalue after C − 1 (the top of the bulk if the claim holds); λ_min/λ₁ = the most negative "
        "Hessian eigenvalue relative to the largest (negative eigenvalues are reported, not dropped).",
        "",
        *whole_model_table(measured, factors),
        "",
        "## Layer blocks: exact vs the Kronecker family",
        "",
        "What it answers: does each **layer's** diagonal block of the Hessian (= its GGN block, ReLU network) have the "
        "C − 1 gap, and do the Kronecker approximations of that block (KFAC `G ⊗ A`, EKFAC, the nearest Kronecker "
        "product) put their widest gap in the same place? Layer 0 = input, 4 = output.",
        "",
        *layer_table(measured, factors),
        "",
        "## Counts against the nulls",
        "",
        "What it answers: does a count mean more than a bulk of the same spread would give, and more than the same "
        "spectrum had before training? *Above the fitted MP edge*: eigenvalues above the upper edge σ²(1 + √γ)² of "
        "a Marchenko–Pastur bulk whose σ² and γ are fitted to the spectrum's own bulk (mean σ², variance γσ⁴; the "
        "fewest largest eigenvalues set aside so that the rest lies within its edge) — `find_outliers`' default "
        "null. A Hessian's bulk is not a Wishart spectrum: the fitted γ is a shape parameter, not a sample ratio, "
        "and a heavy upper tail puts tail eigenvalues above the edge (large counts here say 'not Marchenko–Pastur-"
        "shaped', not 'that many outliers'); read it beside the gap. *Above λ₁ at initialization*: eigenvalues above "
        "the largest eigenvalue of the same spectrum of the same seed's model before training — measured only "
        "where the study trains that model from epoch 0 anyway (the base setting, in every factor, and the "
        "training-stage factor); '–' elsewhere. Spectra: the whole model, each layer's exact block and the output "
        "layer's approximations.",
        "",
        *null_table(measured, factors),
    ]
    if replicate:
        log("replicate seeds:")
        again = run_settings(factors, new_seeds, log)
        sections += ["", "## Re-run on new seeds", "",
                     f"Seeds {new_seeds} against {seeds}, every setting; whole-model spectra, the exact layer blocks, "
                     "and the output layer's approximations: the widest gap's position and ratio, and the count above "
                     "the fitted Marchenko–Pastur edge.", "", *agreement_table(measured, again, factors)]
    if not args.no_basin:
        paths = same_basin(seeds, 11, log)
        sections += ["", "## Same basin: small- vs large-batch solutions", "",
                     "What it answers: Sagun et al.'s claim that small- and large-batch solutions from one "
                     "initialization lie in one connected basin (no loss barrier on the straight path between them). "
                     "Base data; SGD with momentum 0.9: batch 10 at lr 0.01 for 50 epochs (2 500 steps) vs full "
                     f"batch ({BASE.n_train}) at lr 0.1 for 500 steps; the contrast path joins two batch-10 "
                     "solutions from different initializations. "
                     "Training loss and the whole-model Hessian's λ₁ (Lanczos) at 11 points α ∈ [0, 1].", "",
                     *basin_table(paths)]
    if not args.no_digits:
        digits = digits_demo(seeds, 5 if args.quick else 60, 30, log)
        sections += ["", "## The digits demo over seeds", "",
                     "What it answers: how often the demo's claim '9 = C − 1 outliers in the output layer' holds. "
                     "`kfac_hessian.demo.train_digits_mlp` (ReLU MLP 64-64-32-10, Adam, "
                     f"{5 if args.quick else 60} epochs, float64), seeds {seeds}; mean test accuracy "
                     f"{_cell([r.test_accuracy for r in digits], 3)}.", "", *digits_table(digits)]
    sections += ["", f"Total time: {time.perf_counter() - start:.0f} s (torch threads: {args.threads})."]
    text = "\n".join(sections) + "\n"
    if out is not None:
        Path(out).write_text(text)
        log(f"wrote {out}")
    else:
        log(text)
    return text


if __name__ == "__main__":
    main()
