"""Do independently trained models share their top layer-wise Hessian eigenspaces (Wu et al. 2020)? Exact vs KFAC.

Usage: python -m benchmarks.overlap_study [--pairs 5] [--epochs 20] [--quick] [--replicate]
       [--rows PATH [--render-only]]

Setting: scikit-learn's digits (fixed split, 1437 training samples, 10 classes), a ReLU MLP 64-24-24-10 in float64
trained with Adam (lr 3e-3, batches of 64) from ``2·pairs`` seeds on the same data, every curvature block (exact and
approximate) on the first 512 training samples; seeds ``2i`` and ``2i+1`` form
pair ``i`` (disjoint pairs: independent samples for the 95 % t-interval over pairs). Per layer ("0", "2": hidden,
"4": output) and pair:

* top-k eigenspace overlap ``‖V_a V_bᵀ‖²_F / k`` (k = 10) across the two models, of the EXACT layer Hessian block
  (``layer_operator`` + ``lanczos``; for ReLU networks the layer block of the Hessian equals that of the GGN) and of
  each approximation (KFAC ``G ⊗ A``, EKFAC, the nearest Kronecker product), **without and with** the hidden units
  of model b aligned to model a first (``benchmarks.alignment``: Hungarian matching of pre-activations; the
  permutation maps eigenvectors in public parameter order);
* the overlap per side: the top-k eigenvectors reshaped to ``X_i`` (``d_out × (d_in + 1)``) give the output-side
  matrix ``Σ X_i X_iᵀ`` (the G side) and the input-side matrix ``Σ X_iᵀ X_i`` (the A side) — the partial traces of the
  projector onto the eigenspace; their top-``r`` eigenvectors (r = 3) are compared across models;
* ``cos²(u₁(A), ā)``: how close A's top eigenvector is to the normalized mean augmented input ``[ā, 1]``;
* the ReLU rescaling confounder: the overlap of model a with itself after a function-preserving per-unit rescaling
  (factors ``e^{U(−1, 1)}``), which no permutation undoes;
* within each model: the overlap of each approximation's top-k with the exact top-k, and the low-rank structure of
  the exact eigenvectors (``low_rank_structure``: energy share of the top singular value of the reshaped vector);
* the decoupling error per layer through training: ``‖B − H‖_F / ‖H‖_F`` for each approximation ``B`` against the
  dense exact block ``H`` at a few epochs, on the first model of every pair.

``--replicate`` reruns the whole study on ``pairs`` new pairs (seeds ``2·pairs … 4·pairs − 1``, disjoint from the first
run's) and counts the rendered cells whose two runs agree (``benchmarks.intervals.count_agreement``). ``--rows``
keeps every measured value (both runs) as JSON, from which ``--render-only`` rewrites the tables without measuring.
Writes docs/results/overlap.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import kfac_hessian as kh
from benchmarks.alignment import align_vectors, match_hidden_units, rescale_hidden_units
from benchmarks.datasets import load_tabular
from benchmarks.intervals import Agreement, agreement_notes, count_agreement, format_interval

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("exact", "kfac", "ekfac", "fit")
APPROXIMATIONS = METHODS[1:]
WIDTHS = (64, 24, 24, 10)
CURVATURE_SAMPLES = 512  # the first training samples: the data of every curvature block (exact and approximate)


@dataclass(frozen=True)
class Settings:
    pairs: int
    epochs: int
    k: int
    side_rank: int
    checkpoints: tuple[int, ...]  # epochs at which the decoupling error is measured
    decoupling_layers: tuple[str, ...]


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers += [nn.Linear(a, b), nn.ReLU()] if i < len(WIDTHS) - 2 else [nn.Linear(a, b)]
    return nn.Sequential(*layers).double()


def layer_names(model: nn.Sequential) -> list[str]:
    return [name for name, m in model.named_children() if isinstance(m, nn.Linear)]


def train(seed: int, data: tuple[Tensor, Tensor], settings: Settings, on_checkpoint=None) -> nn.Sequential:
    """Adam from ``seed`` (initialization and batch order); ``on_checkpoint(epoch, model)`` at the checkpoints."""
    X, y = data
    model, loss_fn = make_model(seed), nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(settings.epochs + 1):
        if on_checkpoint is not None and epoch in settings.checkpoints:
            on_checkpoint(epoch, model)
        if epoch == settings.epochs:
            break
        for idx in torch.randperm(len(X), generator=generator).split(64):
            optimizer.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            optimizer.step()
    return model


@dataclass
class LayerSpectra:
    """One model's layer: top-k eigenvectors ``(k, P)`` of every method, the KFAC eigen-structure and mean input."""

    vectors: dict[str, Tensor]
    kfac_eig: object
    a_top_mean_cos2: float


def model_spectra(model: nn.Sequential, data: tuple[Tensor, Tensor], k: int) -> dict[str, LayerSpectra]:
    loss_fn = nn.CrossEntropyLoss()
    kfac = kh.compute_kfac(model, loss_fn, data, curvature="ggn")
    approximations = {"kfac": kfac, "ekfac": kh.compute_ekfac(model, loss_fn, data, kfac=kfac),
                      "fit": kh.compute_kronecker_fit(model, loss_fn, data, kfac=kfac, iterations=4)}
    out = {}
    for position, name in enumerate(layer_names(model)):
        vectors = {m: result[name].eig(dtype=torch.float64).topk(k)[1] for m, result in approximations.items()}
        exact = kh.lanczos(kh.layer_operator(model, loss_fn, data, name, kind="hessian"), k, seed=0, tol=1e-8)
        vectors["exact"] = exact.eigenvectors
        kfac_eig = kfac[name].eig(dtype=torch.float64)
        out[name] = LayerSpectra(vectors, kfac_eig, _top_a_vs_mean_input(model, data[0], position, kfac_eig))
    return out


def _top_a_vs_mean_input(model: nn.Sequential, X: Tensor, position: int, eig) -> float:
    """``cos²`` between A's top eigenvector and the mean augmented input ``[ā, 1]`` of the ``position``-th layer."""
    linear = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)][position]
    with torch.no_grad():
        inputs = model[:linear](X)
    mean = torch.cat([inputs.mean(0), torch.ones(1, dtype=inputs.dtype)])
    top = eig.factor_vectors("A", 1)[0][:, 0]
    return float((top @ mean) ** 2 / (mean @ mean))


def side_bases(vectors: Tensor, layout, rank: int) -> tuple[Tensor, Tensor]:
    """Top-``rank`` eigenvectors (rows) of the output-side ``Σ X_i X_iᵀ`` and input-side ``Σ X_iᵀ X_i`` partial
    traces of the projector onto the rows of ``vectors`` reshaped to ``X_i`` (one group)."""
    matrices = layout.to_matrices(vectors)[:, 0]  # (k, d_out, width)
    bases = []
    for side in (torch.einsum("kow,kpw->op", matrices, matrices), torch.einsum("kow,kov->wv", matrices, matrices)):
        _, eigenvectors = torch.linalg.eigh(side)
        bases.append(eigenvectors[:, -rank:].T)
    return bases[0], bases[1]


def pair_rows(model_a, model_b, spectra_a, spectra_b, data, settings: Settings) -> list[dict]:
    """Per layer and method: cross-model overlaps (whole, G side, A side) without and with alignment."""
    perms = match_hidden_units(model_a, model_b, data[0])
    rows = []
    for name, a in spectra_a.items():
        b, layout = spectra_b[name], a.kfac_eig.layout
        for method in METHODS:
            va = a.vectors[method]
            row = {"layer": name, "method": method, "P": va.shape[1]}
            for aligned, vb in ((False, b.vectors[method]), (True, align_vectors(b.vectors[method], model_b, name,
                                                                                   perms))):
                tag = "aligned" if aligned else "unaligned"
                row[f"overlap_{tag}"] = kh.eigenspace_overlap(va, vb)
                for side, base_a, base_b in zip(("G", "A"), side_bases(va, layout, settings.side_rank),
                                                side_bases(vb, layout, settings.side_rank)):
                    row[f"{side}_{tag}"] = kh.eigenspace_overlap(base_a, base_b)
            rows.append(row)
    return rows


def rescaling_rows(model: nn.Sequential, spectra, data, k: int, seed: int) -> list[dict]:
    """Exact overlap of ``model`` with a function-preserving per-unit rescaling of itself."""
    g = torch.Generator().manual_seed(seed)
    hidden = layer_names(model)[:-1]
    scales = {n: torch.exp(2 * torch.rand(model.get_submodule(n).out_features, generator=g, dtype=torch.float64) - 1)
              for n in hidden}
    rescaled = rescale_hidden_units(model, scales)
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for name, layer in spectra.items():
        op = kh.layer_operator(rescaled, loss_fn, data, name, kind="hessian")
        vectors = kh.lanczos(op, k, seed=0, tol=1e-8).eigenvectors
        rows.append({"layer": name, "overlap": kh.eigenspace_overlap(layer.vectors["exact"], vectors)})
    return rows


def within_model_rows(spectra) -> list[dict]:
    """Approximation vs exact top-k overlap, exact low-rank structure, cos²(u₁(A), ā)."""
    rows = []
    for name, layer in spectra.items():
        structure = kh.low_rank_structure(layer.vectors["exact"], layer.kfac_eig)
        row = {"layer": name, "energy_share_mean": float(structure.energy_share.mean()),
               "energy_share_first": float(structure.energy_share[0]), "a_top_mean_cos2": layer.a_top_mean_cos2}
        for method in APPROXIMATIONS:
            row[f"vs_exact_{method}"] = kh.eigenspace_overlap(layer.vectors[method], layer.vectors["exact"])
        rows.append(row)
    return rows


def decoupling_errors(model: nn.Sequential, data, layers: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``‖B − H‖_F / ‖H‖_F`` per layer for every approximation ``B`` against the dense exact Hessian block ``H``."""
    loss_fn = nn.CrossEntropyLoss()
    kfac = kh.compute_kfac(model, loss_fn, data, curvature="ggn")
    approximations = {"kfac": kfac, "ekfac": kh.compute_ekfac(model, loss_fn, data, kfac=kfac),
                      "fit": kh.compute_kronecker_fit(model, loss_fn, data, kfac=kfac, iterations=4)}
    errors = {}
    for name in layers:
        exact = kh.layer_operator(model, loss_fn, data, name, kind="hessian").to_dense()
        errors[name] = {m: float((r[name].to_dense() - exact).norm() / exact.norm()) for m, r in approximations.items()}
    return errors


def pair_seeds(pair: int) -> tuple[int, int]:
    """The training seeds of pair ``pair``: ``2·pair`` and ``2·pair + 1`` (pairs never share a seed)."""
    return 2 * pair, 2 * pair + 1


def replicate_pairs(pairs: int) -> range:
    """The pairs of the re-run: the next ``pairs`` pair indices, so its seeds are disjoint from the first run's."""
    return range(pairs, 2 * pairs)


def measure(pair_indices: range, split, settings: Settings) -> dict:
    """Every table's rows over the pairs ``pair_indices`` (seeds ``pair_seeds(i)``), with the test accuracies."""
    train_data = (split.X_train, split.y_train)
    data = (split.X_train[:CURVATURE_SAMPLES], split.y_train[:CURVATURE_SAMPLES])
    start = time.perf_counter()
    pairs, rescaled, within, decoupling, accuracy = [], [], [], [], []
    for pair in pair_indices:
        models, spectra = [], []
        for position, seed in enumerate(pair_seeds(pair)):
            def checkpoint(epoch, model, first=position == 0):
                if first:  # the decoupling error is measured on the first model of each pair
                    for layer, errors in decoupling_errors(model, data, settings.decoupling_layers).items():
                        decoupling.append({"epoch": epoch, "layer": layer, **errors})

            model = train(seed, train_data, settings, checkpoint)
            with torch.no_grad():
                accuracy.append(float((model(split.X_test).argmax(1) == split.y_test).float().mean()))
            models.append(model)
            spectra.append(model_spectra(model, data, settings.k))
            within.extend(within_model_rows(spectra[-1]))
        pairs.extend(pair_rows(*models, *spectra, data, settings))
        rescaled.extend(rescaling_rows(models[0], spectra[0], data, settings.k, seed=100 + pair))
        print(f"pair {pair} done ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"pairs": pairs, "rescaled": rescaled, "within": within, "decoupling": decoupling,
            "accuracy": accuracy, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="independent model pairs (2·pairs seeds)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="fewer epochs, decoupling error on the small layers")
    parser.add_argument("--replicate", action="store_true",
                        help="rerun every cell on as many new pairs (new seeds) and count the cells that agree")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "overlap.md")
    parser.add_argument("--rows", type=Path, help="write the measured rows here (JSON)")
    parser.add_argument("--render-only", action="store_true", help="render the tables from --rows, measure nothing")
    args = parser.parse_args()
    if args.pairs < 2:
        parser.error("--pairs must be ≥ 2 for an interval over pairs")
    epochs = 10 if args.quick else args.epochs
    settings = Settings(args.pairs, epochs, args.k, side_rank=3, checkpoints=(0, 2, epochs),
                        decoupling_layers=("2", "4") if args.quick else ("0", "2", "4"))
    if args.render_only:
        if args.rows is None:
            parser.error("--render-only needs --rows")
        write(render(settings, **json.loads(args.rows.read_text()), args=args), args.output)
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))
    split = load_tabular("digits", seed=0, dtype=torch.float64)
    measured = measure(range(settings.pairs), split, settings)
    if args.rows is not None:  # the first run survives a replicate cut short
        args.rows.write_text(json.dumps(measured))
    if args.replicate:
        print("replicate pairs:", flush=True)
        measured["replicate"] = measure(replicate_pairs(settings.pairs), split, settings)
        if args.rows is not None:
            args.rows.write_text(json.dumps(measured))
    write(render(settings, **measured, args=args), args.output)


def write(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)


TAGS = ("unaligned", "aligned")
WITHIN_KEYS = {**{f"vs_exact_{m}": f"{m} vs exact" for m in APPROXIMATIONS},  # row key → the cell's name
               "energy_share_mean": "rank-one share (mean over k)", "energy_share_first": "rank-one share (v₁)",
               "a_top_mean_cos2": "cos²(u₁(A), ā)"}


def cell_values(pairs, rescaled, within, decoupling, accuracy, decoupling_layers: tuple[str, ...],
                **_) -> dict[str, list[float]]:
    """Every cell the tables render, by name, with its values over the pairs (or models): what ``render`` formats
    and what a re-run on new seeds is compared on, cell by cell."""
    layers = list(dict.fromkeys(r["layer"] for r in pairs))
    cells = {"test accuracy": list(accuracy)}
    for layer in layers:
        for method in METHODS:
            for tag in TAGS:
                cells[f"layer {layer}: {method} overlap, {tag}"] = _values(pairs, f"overlap_{tag}", layer=layer,
                                                                           method=method)
    for layer in layers:
        for side in ("G", "A"):
            for method in METHODS:
                for tag in TAGS:
                    cells[f"layer {layer}: {method} {side} side, {tag}"] = _values(pairs, f"{side}_{tag}",
                                                                                   layer=layer, method=method)
    for layer in layers:
        for key, label in WITHIN_KEYS.items():
            cells[f"layer {layer}: {label}"] = _values(within, key, layer=layer)
    for layer in layers:
        cells[f"layer {layer}: overlap with the rescaled copy"] = _values(rescaled, "overlap", layer=layer)
    for layer in decoupling_layers:
        for method in APPROXIMATIONS:
            for epoch in sorted({r["epoch"] for r in decoupling}):
                cells[f"layer {layer}: {method} decoupling error, epoch {epoch}"] = _values(decoupling, method,
                                                                                            layer=layer, epoch=epoch)
    return cells


def agreement(first: dict, second: dict, settings: Settings) -> tuple[Agreement, dict]:
    """``intervals.count_agreement`` over every rendered cell of two runs on disjoint seeds, and the paired cells."""
    a, b = (cell_values(**run, decoupling_layers=settings.decoupling_layers) for run in (first, second))
    cells = {name: (a[name], b[name]) for name in a}
    return count_agreement(cells), cells


def render(settings: Settings, pairs, rescaled, within, decoupling, accuracy, seconds: float, args,
           replicate: dict | None = None) -> str:
    measured = {"pairs": pairs, "rescaled": rescaled, "within": within, "decoupling": decoupling, "accuracy": accuracy}
    cells = cell_values(**measured, decoupling_layers=settings.decoupling_layers)
    cell = {name: format_interval(values) for name, values in cells.items()}
    layers = list(dict.fromkeys(r["layer"] for r in pairs))
    size = {r["layer"]: r["P"] for r in pairs}
    quick = " --quick" if args.quick else ""
    epochs_flag = "" if args.quick else f" --epochs {args.epochs}"  # --quick sets the epochs itself
    replicate_flag = " --replicate" if replicate else ""
    minutes = (seconds + (replicate["seconds"] if replicate else 0.0)) / 60
    k, r = settings.k, settings.side_rank
    dims = {name: (out, inp + 1) for name, inp, out in zip(layers, WIDTHS[:-1], WIDTHS[1:])}
    lines = [
        "# Top eigenspaces across seeds: exact vs Kronecker approximations (generated)", "",
        f"Command: `python -m benchmarks.overlap_study --pairs {settings.pairs}{epochs_flag} --k {k}{quick}"
        f"{replicate_flag}` ({time.strftime('%Y-%m-%d')}, CPU, {minutes:.1f} min). Digits, ReLU MLP "
        f"{'-'.join(map(str, WIDTHS))} (float64, Adam, {settings.epochs} epochs), {2 * settings.pairs} seeds "
        f"(0–{2 * settings.pairs - 1}) on the "
        f"same data in {settings.pairs} disjoint pairs; test accuracy {cell['test accuracy']}; every block on the "
        f"first {CURVATURE_SAMPLES} training samples. Every cell: mean "
        "± half-width of the 95 % t-interval over the pairs (or over the models). Layers: '0' and '2' hidden, '4' "
        "the output layer. Exact = the layer's Hessian block (equal to its GGN block for a ReLU network), top-k by "
        "Lanczos in float64; KFAC = `G ⊗ A` (exact GGN factors); EKFAC = `compute_ekfac`; fit = "
        "`compute_kronecker_fit` (4 passes).", "",
        "## What this answers, and what it does not", "",
        "It answers whether two models trained from different seeds on the same data share the top-k eigenspace of "
        "each layer's exact Hessian block, how much of the sharing the Kronecker approximations report instead, how "
        "much of it needs the hidden units aligned first, and which side (output units: G; inputs: A) carries it. "
        "It does not answer it for other architectures, widths, data or training lengths (one setting), nor for "
        "models that differ by more than a permutation: ReLU units can also be rescaled per unit (row of `W_ℓ` and "
        "`b_ℓ` times α > 0, column of `W_{ℓ+1}` divided by α) without changing the function, which changes both "
        "blocks, and no permutation removes that — the rescaling table below measures how much it alone lowers the "
        "exact overlap. The alignment (Hungarian matching of pre-activation correlations on the training inputs) is "
        "one heuristic (matching by weights, or on other inputs, can give other aligned numbers); on a permuted "
        "copy of a network it recovers the permutation exactly and the exact overlap becomes 1 "
        "(`tests/benchmarks/test_alignment.py::test_exact_overlap_with_a_permuted_copy_is_one_after_alignment`), and "
        "a rescaled copy computes the same function with another block "
        "(`tests/benchmarks/test_alignment.py::test_rescaled_relu_units_keep_the_function_but_not_the_block`).", "",
        f"## Cross-model top-{k} overlap, without → with alignment", "",
        "| layer | P | random k/P | " + " | ".join(METHODS) + " | KFAC ÷ exact |", "|---|---|---|" + "---|" * 5,
    ]
    for layer in layers:
        row = [f"{cell[f'layer {layer}: {m} overlap, unaligned']} → {cell[f'layer {layer}: {m} overlap, aligned']}"
               for m in METHODS]
        ratio = [f"{_ratio(pairs, layer, tag):.2f}" for tag in TAGS]
        lines.append(f"| {layer} | {size[layer]} | {k / size[layer]:.4f} | " + " | ".join(row)
                     + f" | {ratio[0]} → {ratio[1]} |")
    lines += ["", "In short: " + _in_short(pairs, rescaled, layers) + " (last table)."]
    lines += ["", f"## Per side: overlap of the top-{r} output-side (G) and input-side (A) subspaces", "",
              f"Layer {layers[0]}'s inputs are the data themselves: its A is the same matrix in every model and no "
              "permutation acts on it (the A side differs between models only through which of A's eigenvectors "
              "the top-k pairs with G's). The output layer's G side is indexed "
              "by the classes, which no permutation touches either.", "",
              f"Random baseline {r}/d: " + ", ".join(f"layer {n}: G {r / dims[n][0]:.2f}, A {r / dims[n][1]:.3f}"
                                                     for n in layers) + ". Without → with alignment.", "",
              "| layer | side | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * 4]
    for layer in layers:
        for side in ("G", "A"):
            row = [f"{cell[f'layer {layer}: {m} {side} side, unaligned']} → "
                   f"{cell[f'layer {layer}: {m} {side} side, aligned']}" for m in METHODS]
            lines.append(f"| {layer} | {side} | " + " | ".join(row) + " |")
    lines += ["", "## Within each model", "",
              f"Overlap of each approximation's top-{k} with the exact top-{k}; the exact top-{k} eigenvectors "
              "reshaped to `[W b]`: energy share of the top singular value (1 = rank one; mean over the k vectors, "
              "and the first vector); `cos²(u₁(A), ā)`: A's top eigenvector vs the mean augmented input "
              f"(over the {2 * settings.pairs} models).", "",
              "| layer | KFAC vs exact | EKFAC vs exact | fit vs exact | rank-one share (mean over k) | rank-one share "
              "(v₁) | cos²(u₁(A), ā) |", "|---|---|---|---|---|---|---|"]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(cell[f"layer {layer}: {label}"] for label in WITHIN_KEYS.values())
                     + " |")
    lines += ["", "## The confounder no permutation removes: per-unit ReLU rescaling", "",
              f"Exact top-{k} overlap of a model with itself after rescaling every hidden unit by `e^u`, "
              "`u ~ U(−1, 1)` (the same function; the first model of each pair).", "",
              "| layer | exact overlap with the rescaled copy |", "|---|---|"]
    lines += [f"| {layer} | {cell[f'layer {layer}: overlap with the rescaled copy']} |" for layer in layers]
    epochs = sorted({r["epoch"] for r in decoupling})
    lines += ["", "## Decoupling error through training", "",
              "`‖B − H‖_F / ‖H‖_F` of each approximation `B` against the dense exact block `H`, on the first model of "
              "each pair, at epochs " + ", ".join(map(str, epochs)) + ".", "",
              "| layer | method | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
              "|---|---|" + "---|" * len(epochs)]
    for layer in settings.decoupling_layers:
        for method in APPROXIMATIONS:
            lines.append(f"| {layer} | {method} | "
                         + " | ".join(cell[f"layer {layer}: {method} decoupling error, epoch {e}"] for e in epochs)
                         + " |")
    if replicate:
        lines += ["", *_replicate_section(measured, replicate, settings)]
    return "\n".join(lines) + "\n"


def _replicate_section(first: dict, replicate: dict, settings: Settings) -> list[str]:
    counted, cells = agreement(first, replicate, settings)
    layers = list(dict.fromkeys(r["layer"] for r in replicate["pairs"]))
    seeds = [seed for pair in replicate_pairs(settings.pairs) for seed in pair_seeds(pair)]
    lines = ["## Re-run on new seeds", "",
             f"The whole study again on {settings.pairs} new pairs (seeds {seeds[0]}–{seeds[-1]}, disjoint from the "
             f"first run's): **{counted.agreeing} of {counted.compared} cells agree** (every interval cell of the "
             "tables above; agree = the difference of the two means lies within the combined 95 % half-width "
             "√(h₁² + h₂²), `benchmarks.intervals.agree`).", "",
             "The re-run in short: " + _in_short(replicate["pairs"], replicate["rescaled"], layers) + ".", "",
             *agreement_notes(cells, counted)]
    return lines


def _values(rows: list[dict], key: str, **where) -> list[float]:
    return [r[key] for r in rows if all(r[k] == v for k, v in where.items())]


def _mean(rows: list[dict], key: str, **where) -> float:
    values = _values(rows, key, **where)
    return sum(values) / len(values)


def _ratio(pairs: list[dict], layer: str, tag: str) -> float:
    """Mean KFAC overlap ÷ mean exact overlap."""
    key = f"overlap_{tag}"
    return _mean(pairs, key, layer=layer, method="kfac") / _mean(pairs, key, layer=layer, method="exact")


def _in_short(pairs: list[dict], rescaled: list[dict], layers: list[str]) -> str:
    """The headline: KFAC ÷ exact overlap, the exact overlap without → with alignment, the rescaled self-overlap."""
    ratios = {tag: [_ratio(pairs, layer, tag) for layer in layers] for tag in TAGS}
    exact = {tag: [_mean(pairs, f"overlap_{tag}", layer=layer, method="exact") for layer in layers] for tag in TAGS}
    return ("KFAC's cross-model overlap is " + _span(ratios["unaligned"]) + "× the exact one without alignment and "
            + _span(ratios["aligned"]) + "× with it; aligning the hidden units raises the exact overlap from "
            + _span(exact["unaligned"]) + " to " + _span(exact["aligned"]) + " (layers " + ", ".join(layers)
            + "); a model and its own rescaled copy overlap only "
            + _span([_mean(rescaled, "overlap", layer=layer) for layer in layers]))


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


if __name__ == "__main__":
    main()
