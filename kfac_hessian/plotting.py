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


def _grid(plt, n: int, columns: int, width: float, height: float):
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, min(columns, n), figsize=(width * min(columns, n), height * rows), squeeze=False,
                             layout="constrained")
    flat = axes.flatten()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_spectra(report, path: Path, title: str = "") -> Path:
    """Per layer: the distribution of log10 eigenvalues, the approximation's (every eigenvalue, histogram) against the
    exact block's (every eigenvalue for a dense block; a stochastic Lanczos quadrature *estimate* for larger ones,
    drawn as a line). Eigenvalues below 10⁻¹⁰·λ_max (zeros and round-off) are counted in the legend, not drawn."""
    plt = pyplot()
    names = list(report.spectra)
    rows = {row["layer"]: row for row in report.rows}
    fig, axes = _grid(plt, len(names), 3, 4.8, 3.6)
    for ax, name in zip(axes, names):
        spec = report.spectra[name]
        approx, exact, weights = spec["kronecker"], spec["exact"], spec["exact_weights"]
        top = max(approx.max(), exact.max())
        floor = 1e-10 * top
        bins = np.linspace(np.log10(floor), np.log10(top) + 0.1, 60)
        below = int((approx < floor).sum())
        ax.hist(np.log10(approx[approx >= floor]), bins=bins, alpha=0.55, color="tab:blue",
                label=f"approximation ({below} below 1e-10·λmax)" if below else "approximation")
        kept = exact >= floor
        if weights is None:
            below = int((~kept).sum())
            ax.hist(np.log10(exact[kept]), bins=bins, alpha=0.55, color="tab:orange",
                    label=f"exact, dense ({below} below 1e-10·λmax)" if below else "exact, dense")
        else:  # SLQ: quadrature weights sum to 1 per probe; scaled to the number of eigenvalues
            counts, _ = np.histogram(np.log10(exact[kept]), bins=bins,
                                     weights=weights[kept] / weights.sum() * len(approx))
            centers = 0.5 * (bins[1:] + bins[:-1])
            ax.plot(centers, np.where(counts > 0, counts, np.nan), color="tab:orange", marker=".", lw=1.2,
                    label="exact, SLQ estimate")
        ax.set_yscale("log")
        row = rows.get(name, {})
        ax.set_title(f"layer {name} (P={row.get('P', len(approx))})", fontsize=10)
        ax.set_xlabel("log10 eigenvalue")
        ax.set_ylabel("eigenvalues per bin")
        ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, tight=False)


def plot_top_eigenvalues(report, path: Path, title: str = "") -> Path:
    """Per layer: the top-k eigenvalues of both sides against their rank."""
    plt = pyplot()
    rows = report.rows
    fig, axes = _grid(plt, len(rows), 3, 4.5, 3.4)
    for ax, row in zip(axes, rows):
        ranks = np.arange(1, len(row["top_eigenvalues_exact"]) + 1)
        ax.semilogy(ranks, row["top_eigenvalues_exact"], "o-", ms=3, label="exact")
        ax.semilogy(ranks, row["top_eigenvalues_kronecker"], "x--", ms=4, label="approximation")
        ax.set_title(f"layer {row['layer']}: top-{row['k']} overlap {row['overlap']:.2f}", fontsize=10)
        ax.set_xlabel("rank")
        ax.set_ylabel("eigenvalue")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, tight=False)


def plot_overlap_matrices(matrices: dict[str, np.ndarray], labels: list[str], path: Path, k: int,
                          baselines: dict[str, float] | None = None) -> Path:
    """Per layer: the top-k eigenspace overlap (in each model's Kronecker eigenbasis) between every pair of models,
    with the random-subspace baseline ``k/P`` in the panel title."""
    plt = pyplot()
    fig, axes = _grid(plt, len(matrices), 3, 3.4, 3.2)
    for n, (ax, (name, matrix)) in enumerate(zip(axes, matrices.items())):
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_yticks(range(len(labels)), labels if n == 0 else [""] * len(labels), fontsize=8)
        baseline = f", random {baselines[name]:.3f}" if baselines and name in baselines else ""
        ax.set_title(f"layer {name}{baseline}", fontsize=9)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if matrix[i, j] > 0.55 else "white")
    bar = fig.colorbar(image, ax=list(axes), shrink=0.85)
    bar.set_label(f"top-{k} eigenspace overlap")
    fig.suptitle(f"Top-{k} Kronecker eigenspaces (eigenvectors of each layer's G⊗A) of models trained from different "
                 "seeds: overlap ‖V₁V₂ᵀ‖²/k", fontsize=9)
    return save_figure(fig, path, tight=False)


METRIC_LABELS = {  # metric → (panel title, y-axis label)
    "top_eigenvalue": ("top eigenvalue", "λ₁"),
    "trace": ("trace", "Σ λ"),
    "effective_rank": ("effective rank", "exp(spectral entropy)"),
    "stable_rank": ("stable rank", "tr / λ₁"),
    "top_k_condition": ("top-k condition", "λ₁ / λ_k"),
    "outliers": ("outliers above the bulk", "count"),
    "outlier_gap_ratio": ("widest gap among the top 50", "λ_i / λ_(i+1)"),
    "exact_trace": ("exact trace (Hutchinson)", "tr"),
    "exact_top_eigenvalue": ("exact top eigenvalue (Lanczos)", "λ₁"),
    "top_k_overlap": ("top-k overlap with the exact block", "‖V_K V_Eᵀ‖² / k"),
}


def plot_tracked_metrics(records: list[dict], metrics: tuple[str, ...], path: Path, title: str = "") -> Path:
    """``SpectrumTracker`` records: one panel per metric (log scale where positive), one line per layer."""
    if not records:
        raise ValueError("nothing recorded yet")
    plt = pyplot()
    layers = list(dict.fromkeys(r["layer"] for r in records))
    fig, axes = _grid(plt, len(metrics), 3, 4.0, 3.0)
    for ax, metric in zip(axes, metrics):
        for layer in layers:
            rows = [r for r in records if r["layer"] == layer and metric in r]
            ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker=".", label=layer)
        if all(r.get(metric, 0) > 0 for r in records):
            ax.set_yscale("log")
        panel, unit = METRIC_LABELS.get(metric, (metric, metric))
        if unit == "count":
            from matplotlib.ticker import MaxNLocator

            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(unit)
        ax.set_xlabel("step")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, title="layer", fontsize="small", loc="outside right upper")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, tight=False)


def plot_model_spectrum(spectrum, path: Path, title: str = "") -> Path:
    """A ``ModelSpectrum``: the SLQ density (an estimate, per unit of the grid's variable, integrating to ``P``) with
    the exact top-k eigenvalues marked below it and the widest gap among them shaded; beside it the top-k (and the
    smallest eigenvalues, when computed) against their rank."""
    from .analyses.outliers import find_outliers  # the statistic drawn, only when a figure is asked for

    plt = pyplot()
    fig, (left, right) = _grid(plt, 2, 2, 5.0, 3.6)
    density = spectrum.density
    grid = density.grid.cpu().double().numpy()
    left.semilogy(grid, np.maximum(density.density.cpu().double().numpy(), 1e-300), color="tab:orange", lw=1.2,
                  label=f"SLQ density ({density.weights.shape[0]} probes)")
    top = spectrum.eigenvalues.cpu().double().numpy()
    positions = np.log10(top[top > 0]) if density.log else top
    for x in positions:
        left.axvline(x, ymax=0.08, color="tab:blue", lw=1.0)
    outliers = find_outliers(spectrum)  # a top-k: no bulk to fit a null to
    if outliers.count:
        edges = (top[outliers.count], top[outliers.count - 1])
        left.axvspan(*(np.log10(edges) if density.log else edges), color="tab:green", alpha=0.15,
                     label=f"widest gap: {outliers.count} above (ratio {outliers.gap_ratio:.2f})")
    left.set_xlabel("log10 eigenvalue" if density.log else "eigenvalue")
    left.set_ylabel("density (eigenvalues per unit)")
    left.set_ylim(bottom=max(1e-6, float(density.density.max()) * 1e-8))
    left.legend(fontsize=7)
    ranks = np.arange(1, len(top) + 1)
    right.plot(ranks, top, "o-", ms=3, label=f"top-{len(top)} (Lanczos)")
    if spectrum.bottom is not None:
        bottom = spectrum.bottom.eigenvalues.cpu().double().numpy()
        after_a_break = len(top) + 2 + np.arange(len(bottom))  # ranks P − m + 1 … P, drawn right of the top-k
        right.plot(after_a_break, bottom, "s-", ms=3, label=f"smallest {len(bottom)} (ranks P−{len(bottom) - 1}…P)")
    right.set_yscale("symlog", linthresh=max(float(np.abs(top).max()) * 1e-3, 1e-300))  # linear within 1e-3·|λ|
    right.set_xlabel("rank")
    right.set_ylabel("eigenvalue")
    right.legend(fontsize=7)
    fig.suptitle(title or f"whole-model {spectrum.kind} spectrum (P={spectrum.num_params})", fontsize=11)
    return save_figure(fig, path, tight=False)
