"""SGD vs scale-amended SGD (kfac_hessian.optim.ScaleAmendedSGD) on a small CNN with batch norm.

Usage: python -m benchmarks.scale_amended_sgd [--seeds 3] [--epochs 15] [--lrs 0.02,0.1]
Digits (8×8 images, 10 classes), CNN conv16-BN-ReLU, conv32(stride 2)-BN-ReLU, conv32-BN-ReLU, global average
pool, linear. Same seeds, batches, momentum 0.9 and weight decay 5e-4 for both optimizers; every learning rate
is run for both. Writes docs/results/scale_amended_sgd.md and docs/figures/scale_amended_sgd.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.datasets import load_tabular
from kfac_hessian.optim import ScaleAmendedSGD

ROOT = Path(__file__).resolve().parent.parent


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
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lrs", default="0.02,0.1")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "scale_amended_sgd.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "scale_amended_sgd.png")
    args = parser.parse_args()
    split = load_tabular("digits")
    lrs = [float(v) for v in args.lrs.split(",")]
    runs = []
    for lr in lrs:
        for seed in range(args.seeds):
            for name in ("sgd", "scale-amended"):
                runs.append(train(name, lr, seed, args.epochs, split))
                r = runs[-1]
                print(f"lr {lr} seed {seed} {name:14s} train loss {r['train_loss']:.4f} test acc {r['test_acc']:.4f} "
                      f"({r['seconds']:.1f} s)", flush=True)
    plot(runs, lrs, args.figure)
    text = render(runs, lrs, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


def plot(runs, lrs, path: Path) -> None:
    from kfac_hessian.plotting import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.5 * len(lrs), 3.3), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for name, color in (("sgd", "C0"), ("scale-amended", "C1")):
            for r in (r for r in runs if r["lr"] == lr and r["optimizer"] == name):
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], color=color, alpha=0.7,
                        label=name if r["seed"] == 0 else None)
        ax.set_yscale("log")
        ax.set_title(f"lr {lr}")
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("mean training loss")
    axes[0][0].legend()
    save_figure(fig, path)


def render(runs, lrs, args) -> str:
    def stat(group, key, digits=4):
        values = [g[key] for g in group]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    lines = [
        "# SGD vs scale-amended SGD (generated)", "",
        f"Command: `python -m benchmarks.scale_amended_sgd --seeds {args.seeds} --epochs {args.epochs} "
        f"--lrs {args.lrs}` ({time.strftime('%Y-%m-%d')}, CPU). Digits 8×8, BN CNN, momentum 0.9, weight decay 5e-4, "
        "batch 64. Mean ± standard deviation over seeds; figure: docs/figures/scale_amended_sgd.png.", "",
        "| lr | optimizer | final train loss | test accuracy | seconds |", "|---|---|---|---|---|",
    ]
    for lr in lrs:
        for name in ("sgd", "scale-amended"):
            group = [r for r in runs if r["lr"] == lr and r["optimizer"] == name]
            lines.append(f"| {lr} | {name} | {stat(group, 'train_loss')} | {stat(group, 'test_acc')} | "
                         f"{stat(group, 'seconds', 1)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
