"""How orthogonal initialization, skip connections and batch norm change the back-matching local Hessians.

Usage: python -m benchmarks.local_hessian_study [--seeds 5] [--depth 8] [--epochs 20] [--replicate]
A deep ReLU MLP on digits (64 → 64 ×depth → 10). Variants: default (PyTorch) init; orthogonal init (gain 1);
residual blocks h ← ReLU(h + W h); BatchNorm after every hidden Linear. For every hidden block we measure the
condition numbers of its local Hessians (kfac_hessian.analyses.back_matching_hessians) at initialization and
after SGD training, the ratio of gradient norms first/last hidden block at initialization, and the final
losses. Every cell is a mean with the half-width of its 95 % t-interval over seeds (``benchmarks/intervals.py``);
condition numbers span decades, so theirs is taken over log10 of the condition. ``--replicate`` reruns every cell
on as many new seeds and counts the cells that agree. Writes docs/results/local_hessians.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.datasets import load_tabular
from benchmarks.intervals import Agreement, chance_disagreement, count_agreement, mean_interval
from kfac_hessian.analyses import back_matching_hessians
from kfac_hessian.demo import train_classifier

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("default", "orthogonal", "residual", "batch_norm")
KEYS = ("init_input", "init_weight", "trained_input", "trained_weight", "grad_ratio", "train_loss", "test_acc")
CONDITION_KEYS = frozenset({"init_input", "init_weight", "trained_input", "trained_weight"})


class DeepMLP(nn.Module):
    def __init__(self, depth: int, width: int, residual: bool = False, batch_norm: bool = False):
        super().__init__()
        self.input = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(depth)) if batch_norm else None
        self.output = nn.Linear(width, 10)
        self.residual = residual

    def forward(self, x):
        h = torch.relu(self.input(x))
        for k, block in enumerate(self.blocks):
            z = block(h)
            if self.norms is not None:
                z = self.norms[k](z)
            h = torch.relu(h + z) if self.residual else torch.relu(z)
        return self.output(h)


def build(variant: str, depth: int, width: int, seed: int) -> DeepMLP:
    torch.manual_seed(seed)
    model = DeepMLP(depth, width, residual=variant == "residual", batch_norm=variant == "batch_norm")
    if variant == "orthogonal":
        for block in model.blocks:
            nn.init.orthogonal_(block.weight)
            nn.init.zeros_(block.bias)
    return model


def calibrate_batch_norm(model: DeepMLP, X: torch.Tensor) -> None:
    """Running statistics = the exact statistics of the training set at the current weights."""
    if model.norms is None:
        return
    was_training = model.training
    model.train()
    for bn in model.norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    with torch.no_grad():
        model(X)
    for bn in model.norms:
        bn.momentum = 0.1
    model.train(was_training)


def measure(model: DeepMLP, X: torch.Tensor, y: torch.Tensor) -> dict:
    calibrate_batch_norm(model, X)
    names = [f"blocks.{k}" for k in range(len(model.blocks))]
    bn = {f"blocks.{k}": f"norms.{k}" for k in range(len(model.blocks))} if model.norms is not None else {}
    model.eval()
    result = back_matching_hessians(model, (X, y), layers=names, residual=names if model.residual else (),
                                    batch_norm=bn)
    model.train()
    return {
        "input_condition": statistics.median(r.input_condition for r in result.values()),
        "weight_condition": statistics.median(r.weight_condition for r in result.values()),
    }


def gradient_ratio(model: DeepMLP, X, y) -> float:
    model.train()
    model.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    ratio = float(model.blocks[0].weight.grad.norm() / model.blocks[-1].weight.grad.norm())
    model.zero_grad(set_to_none=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--replicate", action="store_true", help="rerun every cell on as many new seeds")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "local_hessians.md")
    args = parser.parse_args()
    split = load_tabular("digits")
    rows = run_seeds(range(args.seeds), args, split)
    replicate = run_seeds(range(args.seeds, 2 * args.seeds), args, split) if args.replicate else None
    text = render(rows, args, replicate)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


def run_seeds(seeds: range, args, split) -> list[dict]:
    """One row per variant and seed: local-Hessian conditions at init and trained, gradient ratio, loss, accuracy."""
    rows = []
    for variant in VARIANTS:
        for seed in seeds:
            model = build(variant, args.depth, args.width, seed)
            at_init = measure(model, split.X_train, split.y_train)
            ratio = gradient_ratio(model, split.X_train, split.y_train)
            loss_fn = nn.CrossEntropyLoss()
            train_classifier(model, loss_fn, split.X_train, split.y_train, args.epochs, lr=args.lr, batch_size=64,
                             seed=seed, optimizer="sgd")
            trained = measure(model, split.X_train, split.y_train)
            model.eval()
            with torch.no_grad():
                train_loss = float(loss_fn(model(split.X_train), split.y_train))
                test_acc = float((model(split.X_test).argmax(1) == split.y_test).float().mean())
            rows.append({"variant": variant, "seed": seed, "init_input": at_init["input_condition"],
                         "init_weight": at_init["weight_condition"], "trained_input": trained["input_condition"],
                         "trained_weight": trained["weight_condition"], "grad_ratio": ratio,
                         "train_loss": train_loss, "test_acc": test_acc})
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    return rows


def cell_values(rows: list[dict], variant: str, key: str) -> list[float]:
    """The per-seed values of one cell; log10 for condition numbers (which span decades)."""
    values = [r[key] for r in rows if r["variant"] == variant]
    return [math.log10(v) for v in values] if key in CONDITION_KEYS else values


def summarize(values: list[float], log_scale: bool) -> str:
    """``mean ± h`` (95 % t-interval over seeds); on log10 values, the geometric mean with its interval as a factor.

    A singular local Hessian has condition ``inf``: a cell with any is reported as such, with how many seeds.
    """
    infinite = sum(math.isinf(v) for v in values)
    if infinite:
        return "inf" if infinite == len(values) else f"inf in {infinite} of {len(values)} seeds"
    mean, half = mean_interval(values)
    if log_scale:
        return f"{10 ** mean:.3g} ×/÷ {10 ** half:.2g}"
    return f"{mean:.3g} ± {half:.2g}"


def agreement(first: list[dict], second: list[dict]) -> Agreement:
    """``intervals.count_agreement`` over every variant and key (cells infinite in every seed are not counted)."""
    return count_agreement({f"{variant} {key}": (cell_values(first, variant, key), cell_values(second, variant, key))
                            for variant in VARIANTS for key in KEYS})


def render(rows: list[dict], args, replicate: list[dict] | None = None) -> str:
    seeds = len({r["seed"] for r in rows})
    lines = [
        "# Back-matching local Hessians by design choice (generated)", "",
        f"Command: `python -m benchmarks.local_hessian_study --seeds {args.seeds} --depth {args.depth} "
        f"--width {args.width} --epochs {args.epochs} --lr {args.lr}{' --replicate' if replicate else ''}` "
        f"({time.strftime('%Y-%m-%d')}, CPU).",
        f"Digits, MLP 64 → {args.width} ×{args.depth} → 10, SGD (momentum 0.9, lr {args.lr}, batch 64, "
        f"{args.epochs} epochs). "
        f"Conditions are medians over the hidden blocks, then the geometric mean over {seeds} seeds ×/÷ the factor of "
        "its 95 % t-interval (taken over log10 of the condition); other columns: mean ± half-width of the 95 % "
        "t-interval over seeds. inf: a singular local Hessian. Input Hessian: WᵀDW, (I+W)ᵀD(I+W) for residual "
        "blocks; weight Hessian: D ⊗ A (D = γ²/σ² with BatchNorm, else I).", "",
        "| variant | input cond. (init) | weight cond. (init) | input cond. (trained) | weight cond. (trained) | "
        "‖∇W_first‖/‖∇W_last‖ (init) | train loss | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        lines.append(f"| {variant} | " + " | ".join(
            summarize(cell_values(rows, variant, key), key in CONDITION_KEYS) for key in KEYS) + " |")
    if replicate:
        agreeing, compared, disagreeing = agreement(rows, replicate)
        new_seeds = sorted({r["seed"] for r in replicate})
        lines += ["", f"Replicate on {len(new_seeds)} new seeds ({new_seeds[0]}–{new_seeds[-1]}): **{agreeing} of "
                  f"{compared}** finite cells agree (difference of means within the combined 95 % half-width; "
                  f"{chance_disagreement(len(new_seeds), len(new_seeds)):.1%} of cells disagree by chance at equal "
                  "means)" + (f"; disagreeing: {', '.join(disagreeing)}." if disagreeing else "."),
                  "", "| variant | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
        for variant in VARIANTS:
            lines.append(f"| {variant} | " + " | ".join(
                summarize(cell_values(replicate, variant, key), key in CONDITION_KEYS) for key in KEYS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
