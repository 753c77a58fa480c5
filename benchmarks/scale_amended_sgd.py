"""SGD vs scale-amended SGD (kfac_hessian.optim.ScaleAmendedSGD) on a small CNN with batch norm.

Usage: python -m benchmarks.scale_amended_sgd [--seeds 5] [--epochs 15] [--lrs 0.02,0.1] [--replicate]
Digits (8×8 images, 10 classes), CNN conv16-BN-ReLU, conv32(stride 2)-BN-ReLU, conv32-BN-ReLU, global average
pool, linear. Same seeds, batches, momentum 0.9 and weight decay 5e-4 for both optimizers; every learning rate
is run for both. Every cell is a mean with the half-width of its 95 % t-interval over seeds
(``benchmarks/intervals.py``); ``--replicate`` reruns every cell on as many new seeds and counts the cells that
agree. Writes docs/results/scale_amended_sgd.md and docs/figures/scale_amended_sgd.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.datasets import load_tabular
from benchmarks.intervals import Agreement, chance_disagreement, count_agreement, mean_interval
from kfac_hessian.optim import ScaleAmendedSGD

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("sgd", "scale-amended")
METRICS = {"train_loss": 4, "test_acc": 4, "seconds": 1}  # metric → decimals printed


def bn_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def train(optimizer_name: str, lr: float, seed: int, epochs: int, split) -> dict:
    model = bn_cnn(seed)
    X, y = split.X_train.reshape(-1, 1, 8, 8), split.y_train
    X_test, y_test = split.X_test.reshape(-1, 1, 8, 8), split.y_test
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = ScaleAmendedSGD(model, lr=lr, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    curve = []
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        losses = []
        for idx in torch.randperm(len(X), generator=generator).split(64):
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curve.append(statistics.mean(losses))
    seconds = time.perf_counter() - start
    if isinstance(opt, ScaleAmendedSGD):
        opt.remove_hooks()
    model.eval()
    with torch.no_grad():
        test_acc = float((model(X_test).argmax(1) == y_test).float().mean())
        train_loss = float(loss_fn(model(X), y))
    return {"optimizer": optimizer_name, "lr": lr, "seed": seed, "curve": curve, "train_loss": train_loss,
            "test_acc": test_acc, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lrs", default="0.02,0.1")
    parser.add_argument("--replicate", action="store_true", help="rerun every cell on as many new seeds")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "scale_amended_sgd.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "scale_amended_sgd.png")
    args = parser.parse_args()
    split = load_tabular("digits")
    lrs = [float(v) for v in args.lrs.split(",")]
    runs = run_seeds(range(args.seeds), lrs, args.epochs, split)
    replicate = run_seeds(range(args.seeds, 2 * args.seeds), lrs, args.epochs, split) if args.replicate else None
    plot(runs, lrs, args.figure)
    text = render(runs, lrs, args, replicate)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


def run_seeds(seeds: range, lrs: list[float], epochs: int, split) -> list[dict]:
    """Both optimizers at every learning rate and seed (same initialization and batches for both)."""
    runs = []
    for lr in lrs:
        for seed in seeds:
            for name in OPTIMIZERS:
                runs.append(train(name, lr, seed, epochs, split))
                r = runs[-1]
                print(f"lr {lr} seed {seed} {name:14s} train loss {r['train_loss']:.4f} test acc {r['test_acc']:.4f} "
                      f"({r['seconds']:.1f} s)", flush=True)
    return runs


def cell_values(runs: list[dict], lr: float, optimizer: str, metric: str) -> list[float]:
    return [r[metric] for r in runs if r["lr"] == lr and r["optimizer"] == optimizer]


def summarize(values: list[float], decimals: int) -> str:
    """``mean ± h``: the mean over seeds and the half-width of its 95 % t-interval."""
    mean, half = mean_interval(values)
    return f"{mean:.{decimals}f} ± {half:.{decimals}f}"


def agreement(first: list[dict], second: list[dict], lrs: list[float]) -> Agreement:
    """``intervals.count_agreement`` over the cells (learning rate, optimizer, train loss or test accuracy). Wall-clock
    seconds are not compared: they measure the machine's load, not the optimizer."""
    return count_agreement({f"lr {lr} {name} {metric}": (cell_values(first, lr, name, metric),
                                                         cell_values(second, lr, name, metric))
                            for lr in lrs for name in OPTIMIZERS for metric in ("train_loss", "test_acc")})


def plot(runs, lrs, path: Path) -> None:
    from kfac_hessian.plotting import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.5 * len(lrs), 3.3), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for name, color in zip(OPTIMIZERS, ("C0", "C1")):
            for r in (r for r in runs if r["lr"] == lr and r["optimizer"] == name):
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], color=color, alpha=0.7,
                        label=name if r["seed"] == 0 else None)
        ax.set_yscale("log")
        ax.set_title(f"lr {lr}")
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("mean training loss")
    axes[0][0].legend()
    save_figure(fig, path)


def render(runs, lrs, args, replicate: list[dict] | None = None) -> str:
    def table(group: list[dict]) -> list[str]:
        rows = ["| lr | optimizer | final train loss | test accuracy | seconds |", "|---|---|---|---|---|"]
        for lr in lrs:
            for name in OPTIMIZERS:
                rows.append(f"| {lr} | {name} | " + " | ".join(
                    summarize(cell_values(group, lr, name, metric), decimals) for metric, decimals in METRICS.items())
                    + " |")
        return rows

    seeds = len({r["seed"] for r in runs})
    lines = [
        "# SGD vs scale-amended SGD (generated)", "",
        f"Command: `python -m benchmarks.scale_amended_sgd --seeds {args.seeds} --epochs {args.epochs} "
        f"--lrs {args.lrs}{' --replicate' if replicate else ''}` ({time.strftime('%Y-%m-%d')}, CPU). Digits 8×8, "
        f"BN CNN, momentum 0.9, weight decay 5e-4, batch 64. Mean ± half-width of the 95 % t-interval over {seeds} "
        "seeds; figure (training-loss curves of these seeds): docs/figures/scale_amended_sgd.png.", "",
        *table(runs),
    ]
    if replicate:
        agreeing, compared, disagreeing = agreement(runs, replicate, lrs)
        new_seeds = sorted({r["seed"] for r in replicate})
        lines += ["", f"Replicate on {len(new_seeds)} new seeds ({new_seeds[0]}–{new_seeds[-1]}): **{agreeing} of "
                  f"{compared}** cells (train loss, test accuracy) agree (difference of means within the combined 95 % "
                  f"half-width; {chance_disagreement(len(new_seeds), len(new_seeds)):.1%} of cells disagree by chance "
                  "at equal means)"
                  + (f"; disagreeing: {', '.join(disagreeing)}." if disagreeing else "."), "", *table(replicate)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
