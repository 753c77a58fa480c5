"""Figures for reports (needs the optional ``matplotlib``; imported only when plotting)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'kfac_hessian[plot]'") from error
    return plt


def save_figure(fig, path: Path, tight: bool = True) -> Path:
    """Lay out (unless ``tight=False``), write at 110 dpi and close ``fig``; the path written."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return Path(path)


def plot_spectra(report, path: Path) -> Path:
    """Per layer: histograms of log10 eigenvalues, Kronecker vs exact (dense spectrum or SLQ nodes)."""
    plt = pyplot()
    names = list(report.spectra)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        spec = report.spectra[name]
        top = max(spec["kronecker"].max(), spec["exact"].max())
        floor = 1e-10 * top
        bins = np.linspace(np.log10(floor), np.log10(top) + 0.1, 60)
        ax.hist(np.log10(np.maximum(spec["kronecker"], floor)), bins=bins, alpha=0.6, label="Kronecker G⊗A")
        exact_weights = spec["exact_weights"]
        if exact_weights is not None:
            exact_weights = exact_weights / exact_weights.sum() * len(spec["kronecker"])
        ax.hist(np.log10(np.maximum(spec["exact"], floor)), bins=bins, weights=exact_weights, alpha=0.6, label="exact")
        ax.set_yscale("log")
        ax.set_title(f"layer {name}")
        ax.set_xlabel("log10 eigenvalue")
    axes[0][0].set_ylabel("count")
    axes[0][0].legend()
    return save_figure(fig, path)


def plot_top_eigenvalues(report, path: Path) -> Path:
    """Per layer: the top-k eigenvalues of both sides against their rank."""
    plt = pyplot()
    rows = report.rows
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        ranks = np.arange(1, len(row["top_eigenvalues_exact"]) + 1)
        ax.semilogy(ranks, row["top_eigenvalues_exact"], "o-", label="exact")
        ax.semilogy(ranks, row["top_eigenvalues_kronecker"], "x--", label="Kronecker")
        ax.set_title(f"layer {row['layer']}: overlap {row['overlap']:.2f}")
        ax.set_xlabel("rank")
    axes[0][0].legend()
    return save_figure(fig, path)


def plot_overlap_matrices(matrices: dict[str, np.ndarray], labels: list[str], path: Path) -> Path:
    """Per layer: heatmap of the top-k eigenspace overlap between every pair of models."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.2), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(f"layer {name}")
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    return save_figure(fig, path, tight=False)  # tight_layout does not handle a colorbar shared by panels


def plot_tracked_metrics(records: list[dict], metrics: tuple[str, ...], path: Path) -> Path:
    """``SpectrumTracker`` records: one panel per metric (log scale where positive), one line per layer."""
    if not records:
        raise ValueError("nothing recorded yet")
    plt = pyplot()
    layers = list(dict.fromkeys(r["layer"] for r in records))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for layer in layers:
            rows = [r for r in records if r["layer"] == layer and metric in r]
            ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker=".", label=layer)
        if all(r.get(metric, 0) > 0 for r in records):
            ax.set_yscale("log")
        ax.set_title(metric)
        ax.set_xlabel("step")
    axes[0][0].legend(title="layer", fontsize="small")
    return save_figure(fig, path)
