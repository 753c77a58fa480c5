"""PAC-Bayes bounds with the posterior in the identity, Kronecker, iterative-Kronecker and exact layer-wise bases.

Usage: python -m benchmarks.pac_bayes_study [--seeds 2] [--jobs 1] [--epochs E] [--lr 0.01] [--n-samples 1000]
       [--quick] [--replicate] [--rows PATH [--render-only | --resume]]
Tasks: binary digits (0–4 vs 5–9) and breast cancer, true and random training labels, a 1-hidden-layer ReLU MLP
(width 50) trained with SGD. The same posterior optimization (RMSprop, same epochs and learning rate; by default
pac_bayes_bound's own: 2000 steps at lr 0.01) runs in every basis; only the basis differs. Every cell is the mean
over seeds ± the half-width of its 95 % t-interval (benchmarks.intervals); since every basis starts from the same
trained network in a seed, bases are also compared seed by seed: 'Δ vs identity' is the interval of the paired
differences bound(basis) − bound(identity). Seeds run outermost and the table is rewritten after each seed, so a run
cut short still leaves the seeds it finished. ``--replicate`` runs every cell again on ``seeds`` new seeds
(``seeds … 2·seeds − 1``, alternating with the first run's) and counts the cells whose two runs agree
(``benchmarks.intervals.count_agreement``), the paired differences against the identity basis among them; ``--rows``
keeps the per-seed rows as JSON (rewritten after each seed), from which ``--render-only`` rewrites the table without
measuring and ``--resume`` runs only the seeds a run cut short did not finish.
Writes docs/results/pac_bayes.md (--quick: prints only) and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from benchmarks.datasets import load_tabular
from benchmarks.intervals import Agreement, agreement_notes, count_agreement, mean_interval
from kfac_hessian.bounds import pac_bayes_bound
from kfac_hessian.demo import train_classifier

BASES = ("identity", "kronecker", "iterative", "exact-layerwise")
LABEL_NOISE = {"true": 0.0, "random": 1.0}  # the fraction of training labels replaced by random ones
OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "pac_bayes.md"


def trained_mlp(task: str, label_noise: float, seed: int, width: int, epochs: int):
    split = load_tabular(task, binary=True, label_noise=label_noise, seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(split.n_features, width), nn.ReLU(), nn.Linear(width, 1), nn.Flatten(0))
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss = nn.BCEWithLogitsLoss()
    train_classifier(model, loss, split.X_train, split.y_train, epochs, lr=0.05, batch_size=100, seed=seed,
                     optimizer="sgd")
    return split, model, init_state, loss


def replicate_seeds(seeds: int) -> range:
    """The seeds of the re-run: the next ``seeds`` integers, disjoint from the first run's ``range(seeds)``."""
    return range(seeds, 2 * seeds)


def seed_order(seeds: int, replicate: bool) -> list[int]:
    """The seeds to run, in order: ``range(seeds)``, alternating with the replicate's so that a run cut short still
    has both halves to compare."""
    if not replicate:
        return list(range(seeds))
    return [seed for pair in zip(range(seeds), replicate_seeds(seeds)) for seed in pair]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="posterior optimization epochs (default: 2000 steps)")
    parser.add_argument("--train-epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="1 seed, 100 epochs, 100 draws (smoke run)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    parser.add_argument("--replicate", action="store_true",
                        help="rerun every cell on as many new seeds and count the cells that agree")
    parser.add_argument("--bases", nargs="+", choices=BASES, default=list(BASES),
                        help="a subset of the bases (with identity: the paired differences are against it)")
    parser.add_argument("--labels", nargs="+", choices=list(LABEL_NOISE), default=list(LABEL_NOISE),
                        help="true and/or random training labels")
    parser.add_argument("--output", type=Path, default=OUT)
    parser.add_argument("--rows", type=Path, help="write the measured rows here (JSON), rewritten after each seed")
    parser.add_argument("--render-only", action="store_true", help="render the table from --rows, measure nothing")
    parser.add_argument("--resume", action="store_true",
                        help="keep the seeds already in --rows (a run cut short, same settings) and run the others")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.n_samples, args.output = 1, 100, 100, None
    if args.replicate and args.seeds < 2:
        parser.error("--replicate needs --seeds ≥ 2 (an interval over seeds in each run); not with --quick")
    if "identity" not in args.bases:
        parser.error("--bases needs identity: every other basis is compared with it seed by seed")
    if (args.render_only or args.resume) and args.rows is None:
        parser.error("--render-only and --resume need --rows")
    if args.render_only:
        publish(json.loads(args.rows.read_text()), args)
        return
    rows = json.loads(args.rows.read_text()) if args.resume and args.rows.exists() else []
    finished = {r["seed"] for r in rows}
    table = publish(rows, args) if rows else ""
    # Seeds are independent: with --jobs they run in separate single-threaded processes, gathered in run order.
    with multiprocessing.get_context("spawn").Pool(max(1, args.jobs)) as pool:
        seeds = [seed for seed in seed_order(args.seeds, args.replicate) if seed not in finished]
        for seed_rows in pool.imap(partial(rows_of_seed, args=args), seeds):
            rows += seed_rows
            if args.rows is not None:
                args.rows.write_text(json.dumps(rows))
            table = publish(rows, args)
    print(table)


def publish(rows: list[dict], args: argparse.Namespace) -> str:
    """Render the seeds finished so far (the first run's, then the replicate's) and write them to ``args.output``."""
    first = [r for r in rows if r["seed"] < args.seeds]
    replicate = [r for r in rows if r["seed"] >= args.seeds]
    table = render(first, args, len({r["seed"] for r in first}), replicate or None)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    return table


def rows_of_seed(seed: int, args: argparse.Namespace) -> list[dict]:
    """Every task, label setting and basis for one seed (one trained network per task and labels)."""
    torch.set_num_threads(1)  # small matrices: threads only contend with the other seeds' processes
    rows = []
    for task in ("digits", "breast_cancer"):
        for labels in args.labels:
            noise = LABEL_NOISE[labels]
            split, model, init_state, loss = trained_mlp(task, noise, seed, args.width, args.train_epochs)
            data = list(zip(split.X_train.split(256), split.y_train.split(256)))
            for basis in (b for b in BASES if b in args.bases):
                r = pac_bayes_bound(model, init_state, loss, data, basis, test_data=(split.X_test, split.y_test),
                                    epochs=args.epochs, lr=args.lr, n_samples=args.n_samples, seed=seed,
                                    refresh_every=max(1, (args.epochs or 2000 // len(data)) // 10))
                rows.append({"task": task, "labels": labels, "seed": seed, **r.to_dict()})
                print(f"{task:13s} {labels:6s} seed {seed} {basis:15s} bound {r.bound:.3f} "
                      f"ê {r.train_error:.3f} test {r.test_error:.3f} KL {r.kl:8.1f} converged {r.converged} "
                      f"({r.seconds:.0f} s)", flush=True)
    return rows


def interval_cell(values: list[float], decimals: int = 3) -> str:
    """``"x̄ ± h"`` (95 % t-interval over seeds) with fixed ``decimals``; ``"x̄"`` alone for a single seed."""
    mean, half = mean_interval(values)
    if math.isnan(half):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {half:.{decimals}f}"


def paired_differences(rows: list[dict], basis: str, reference: str = "identity") -> dict[tuple[str, str], list[float]]:
    """Per (task, labels): ``bound(basis) − bound(reference)`` seed by seed, over the seeds both bases finished.

    Pairing removes the seed-to-seed spread of the trained network that both bases share.
    """
    bounds = {(r["task"], r["labels"], r["basis"], r["seed"]): r["bound"] for r in rows}
    differences: dict[tuple[str, str], list[float]] = {}
    for (task, labels, name, seed), bound in bounds.items():
        if name == basis and (task, labels, reference, seed) in bounds:
            differences.setdefault((task, labels), []).append(bound - bounds[task, labels, reference, seed])
    return differences


METRICS = ("bound", "train_error", "test_error", "mean_test_error", "kl")  # the compared columns, by row key


def cell_values(rows: list[dict]) -> dict[str, list[float]]:
    """Every compared cell of the table, by name, with its per-seed values: the metrics of each task, labels and
    basis, and the paired differences against the identity basis ("Δ vs identity"). Wall-clock seconds and the
    count of converged runs are not compared: they measure the machine's load and a yes/no, not the bound."""
    differences = {basis: paired_differences(rows, basis) for basis in BASES[1:]}
    cells = {}
    for (task, labels, basis), group in table_groups(rows):
        for metric in METRICS:
            cells[f"{task} {labels} {basis} {metric}"] = [g[metric] for g in group]
        if basis != "identity":
            cells[f"{task} {labels} {basis} Δ vs identity"] = differences[basis][task, labels]
    return cells


def table_groups(rows: list[dict]) -> list[tuple[tuple[str, str, str], list[dict]]]:
    """The rows of each table line — ``(task, labels, basis)`` in the table's order — skipping empty lines."""
    groups = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for labels in ("true", "random"):
            for basis in BASES:
                group = [r for r in rows if r["task"] == task and r["labels"] == labels and r["basis"] == basis]
                if group:
                    groups.append(((task, labels, basis), group))
    return groups


def agreement(first: list[dict], second: list[dict]) -> tuple[Agreement, dict]:
    """``intervals.count_agreement`` over the cells both runs have, and the paired cells."""
    a, b = cell_values(first), cell_values(second)
    cells = {name: (a[name], b[name]) for name in a if name in b}
    return count_agreement(cells), cells


def render(rows: list[dict], args, n_seeds: int, replicate: list[dict] | None = None) -> str:
    values = cell_values(rows)
    lines = [
        "# PAC-Bayes bounds by posterior basis (generated)",
        "",
        f"Command: `python -m benchmarks.pac_bayes_study --seeds {args.seeds}"
        f"{f' --epochs {args.epochs}' if args.epochs else ''} --lr {args.lr} --n-samples {args.n_samples}"
        f"{_subset_flags(args)}{' --replicate' if getattr(args, 'replicate', False) else ''}` "
        f"({time.strftime('%Y-%m-%d')}, CPU, float32); seeds finished: {n_seeds} (0–{n_seeds - 1}).",
        f"MLP d → {args.width} → 1, BCE surrogate, SGD {args.train_epochs} epochs; posterior: RMSprop lr {args.lr}, "
        f"{f'{args.epochs} epochs' if args.epochs else '2000 steps'}; δ = 0.025, δ' = 0.01, {args.n_samples} weight "
        "draws. Every cell: mean over seeds ± half-width of its 95 % t-interval; 'Δ vs identity' = the same interval "
        "of the paired per-seed differences bound(basis) − bound(identity) (negative = tighter; an interval excluding "
        "0 = a difference the seeds resolve); 'conv.' = the runs whose optimization had levelled off.",
        "Errors are fractions; 'SNN' = the stochastic network Q; 'det.' = the network at the posterior mean.",
        "",
        "| task | labels | basis | bound | Δ vs identity | SNN train ê | SNN test | det. test | KL | conv. | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, labels, basis), group in table_groups(rows):
        cell = {metric: interval_cell(values[f"{task} {labels} {basis} {metric}"], 0 if metric == "kl" else 3)
                for metric in METRICS}
        delta = "—" if basis == "identity" else interval_cell(values[f"{task} {labels} {basis} Δ vs identity"])
        lines.append(
            f"| {task} (m={group[0]['n_train']}) | {labels} | {basis} | **{cell['bound']}** | {delta} | "
            f"{cell['train_error']} | {cell['test_error']} | {cell['mean_test_error']} | {cell['kl']} | "
            f"{sum(g['converged'] for g in group)}/{len(group)} | {interval_cell([g['seconds'] for g in group], 0)} |"
        )
    if replicate:
        lines += ["", *_replicate_section(rows, replicate)]
    return "\n".join(lines) + "\n"


def _subset_flags(args: argparse.Namespace) -> str:
    """The ``--bases`` / ``--labels`` of a run restricted to a subset (empty for the whole study)."""
    flags = ""
    for flag, chosen, every in (("bases", getattr(args, "bases", BASES), BASES),
                                ("labels", getattr(args, "labels", LABEL_NOISE), LABEL_NOISE)):
        if set(chosen) != set(every):
            flags += f" --{flag} " + " ".join(chosen)
    return flags


def _replicate_section(first: list[dict], replicate: list[dict]) -> list[str]:
    seeds = sorted({r["seed"] for r in replicate})
    if len(seeds) < 2 or len({r["seed"] for r in first}) < 2:
        return ["## Re-run on new seeds", "", f"New seeds finished: {seeds}; each run needs ≥ 2 for an interval, "
                "so there is nothing to compare yet."]
    counted, cells = agreement(first, replicate)
    deltas = [name for name in cells if name.endswith("Δ vs identity")]
    delta_count = count_agreement({name: cells[name] for name in deltas})
    lines = ["## Re-run on new seeds", "",
             f"Every cell again on {len(seeds)} new seeds ({seeds[0]}–{seeds[-1]}, disjoint from the first run's): "
             f"**{counted.agreeing} of {counted.compared} cells agree** (the bound, the three errors, KL and 'Δ vs "
             "identity' of every row; agree = the difference of the two means lies within the combined 95 % "
             "half-width √(h₁² + h₂²), `benchmarks.intervals.agree`).", "",
             f"The paired differences against the identity basis: **{delta_count.agreeing} of {delta_count.compared} "
             "agree**; both runs side by side (an interval excluding 0 = a difference the seeds resolve):", "",
             "| cell | first run | re-run | agree |", "|---|---|---|---|"]
    lines += [f"| {name.removesuffix(' Δ vs identity')} | {interval_cell(cells[name][0])} "
              f"| {interval_cell(cells[name][1])} | {'**no**' if name in counted.disagreeing else 'yes'} |"
              for name in deltas]
    return [*lines, "", *agreement_notes(cells, counted, interval_cell)]


if __name__ == "__main__":
    main()
