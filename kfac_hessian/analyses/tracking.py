"""Per-layer spectral metrics of the Kronecker blocks, tracked through training.

For one layer with eigenvalues ``λ_1 ≥ … ≥ λ_P ≥ 0`` of ``G ⊗ A`` (products ``μ_j λ_i``):

* ``top_eigenvalue`` ``λ_1``; ``trace`` ``Σλ = tr(A)·tr(G)``;
* ``effective_rank`` ``exp(−Σ p log p)`` with ``p = λ/Σλ`` (spectral entropy). For ``G ⊗ A`` the products'
  distribution is the product of the factors', so the entropy adds and ``erank(G ⊗ A) = erank(A)·erank(G)``
  exactly (``BlockEigen.effective_rank``);
* ``stable_rank`` ``trace / λ_1``; ``top_k_condition`` ``λ_1 / λ_k'`` over the top ``k`` eigenvalues above round-off
  (``P·ε·λ_1``, ``resolved_condition``);
* ``outliers``: eigenvalues above the widest log-gap among the top 50 (``find_outliers``), and ``outlier_gap_ratio``,
  that gap's ratio ``λ_i/λ_{i+1}`` (how clearly the count stands: near the threshold 2 it is fragile);
* optionally ``exact_trace`` (± ``exact_trace_stderr``): a Hutchinson estimate of the *exact* block's trace;
* optionally (``exact_top_k = k > 0``) the exact top-k beside the Kronecker one: ``top_eigenvalues`` (the block's
  ``k`` largest, a list), ``exact_top_eigenvalues`` (Lanczos on the layer's exact operator, warm-started from the
  block's top-k eigenvectors), ``exact_top_eigenvalue``, ``top_k_overlap`` (``‖V_K V_Eᵀ‖_F²/k``),
  ``exact_converged`` and ``exact_matvecs``.

Every block of the ``KFAC`` result is tracked with the same metrics (``BlockEigen``).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..blocks import BlockEigen
from ..data import Data, OutputSelector, require_reiterable
from ..exact import hutchinson_trace, lanczos, layer_operator
from ..factors import compute_kfac
from ..model_state import preserved_model_state
from .outliers import find_outliers
from .overlap import eigenspace_overlap

METRICS = ("top_eigenvalue", "trace", "effective_rank", "stable_rank", "top_k_condition", "outliers",
           "outlier_gap_ratio")


def resolved_condition(values: torch.Tensor, num_params: int) -> float:
    """``λ_1 / λ_k'`` over the leading eigenvalues ``values`` (descending) that stand above round-off, ``P·ε·λ_1``
    (``ε`` of their dtype): a numerically singular block otherwise reports a condition of ~1e15 (or infinity) that
    is the floating-point format's, not the network's. 1 when only ``λ_1`` is resolved; NaN when ``λ_1 ≤ 0``."""
    lam1 = float(values[0])
    if not lam1 > 0:
        return math.nan
    kept = values[values > num_params * torch.finfo(values.dtype).eps * lam1]
    return lam1 / float(kept[-1])


def spectral_metrics(eig: BlockEigen, top_k: int = 10) -> dict[str, float]:
    """The metrics of the module docstring for one block's eigen-structure (no eigenvectors needed)."""
    k = min(top_k, eig.num_params)
    values = eig.top_eigenvalues(min(51, eig.num_params))
    lam1, trace = float(values[0]), float(eig.trace())
    outliers = find_outliers(values, null=None)  # the top 51 only: no bulk to fit a null to
    return {
        "top_eigenvalue": lam1,
        "trace": trace,
        "effective_rank": eig.effective_rank() if trace > 0 else 0.0,
        "stable_rank": trace / lam1 if lam1 > 0 else 0.0,
        "top_k_condition": resolved_condition(values[:k], eig.num_params),
        "outliers": outliers.count,
        "outlier_gap_ratio": outliers.gap_ratio,
    }


def _exact_top_k(eig: BlockEigen, op, k: int, tol: float, seed: int) -> dict:
    """The block's top-k beside the exact operator's (Lanczos warm-started from the block's eigenvectors)."""
    values, vectors = eig.topk(k)
    exact = lanczos(op, k, tol=tol, seed=seed, start=vectors)
    return {
        "top_eigenvalues": [float(v) for v in values],
        "exact_top_eigenvalues": [float(v) for v in exact.eigenvalues],
        "exact_top_eigenvalue": float(exact.eigenvalues[0]),
        "top_k_overlap": eigenspace_overlap(vectors.to(exact.eigenvectors.dtype), exact.eigenvectors),
        "exact_converged": exact.converged,
        "exact_matvecs": exact.n_matvecs,
    }


class SpectrumTracker:
    """A training-loop callback recording per-layer spectral metrics every ``every`` steps.

    ``tracker(step)`` computes Kronecker factors of ``model`` on ``data`` (``compute_kfac`` with
    ``curvature``, in eval mode: dropout off, BatchNorm on running statistics), eigenvalues of every factor,
    and the metrics of ``spectral_metrics``; it appends one row per layer to ``records`` (a tidy list of
    dicts with ``step``, ``layer``, the metrics, ``seconds`` and any keyword given, e.g. ``train_loss``).
    Steps that are not multiples of ``every`` return ``None`` at no cost. The model (mode, flags, ``.grad``,
    weights), the optimizer and the global random state are left as they were.

    Args:
        hutchinson_probes: if > 0, also estimate the exact block's trace (``exact_kind`` "hessian" or "ggn") with
            that many Rademacher probes — a check of the Kronecker trace, at the cost of
            ``probes`` Hessian-vector products per layer.
        exact_top_k: if > 0, also the exact block's top ``exact_top_k`` eigenpairs (``exact_kind``) by Lanczos
            (``tol`` ``exact_tol``, seeded with ``seed``, warm-started from the block's eigenvectors), beside the
            block's own (module docstring) — a few dozen products per layer and call.
        output: picks the model's output tensor, as in ``compute_kfac``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Data,
        every: int = 100,
        curvature: str = "mc",
        layers: list[str] | None = None,
        top_k: int = 10,
        hutchinson_probes: int = 0,
        exact_top_k: int = 0,
        exact_tol: float = 1e-6,
        exact_kind: str = "ggn",
        seed: int = 0,
        output: OutputSelector | None = None,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if hutchinson_probes < 0:
            raise ValueError(f"hutchinson_probes must be ≥ 0, got {hutchinson_probes!r}")
        if isinstance(exact_top_k, bool) or not isinstance(exact_top_k, int) or exact_top_k < 0:
            raise ValueError(f"exact_top_k must be an integer ≥ 0 (0: no exact top-k), got {exact_top_k!r}")
        require_reiterable(data)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.curvature, self.layers, self.top_k = every, curvature, layers, top_k
        self.hutchinson_probes, self.exact_kind, self.seed, self.output = hutchinson_probes, exact_kind, seed, output
        self.exact_top_k, self.exact_tol = exact_top_k, exact_tol
        self.records: list[dict] = []

    def __call__(self, step: int, **extra) -> list[dict] | None:
        if step % self.every:
            return None
        return self.record(step, **extra)

    def record(self, step: int, **extra) -> list[dict]:
        """Measure now, whatever the step; returns the rows added."""
        start = time.perf_counter()
        with preserved_model_state(self.model):
            self.model.eval()
            kfac = compute_kfac(self.model, self.loss_fn, self.data, curvature=self.curvature, layers=self.layers,
                                seed=self.seed, dtype=torch.float64, output=self.output)
            factor_seconds = time.perf_counter() - start
            eigs = kfac.eig()
            rows = []
            for name, eig in eigs.items():
                row = {"step": step, "layer": name, "num_params": eig.num_params, **spectral_metrics(eig, self.top_k)}
                if self.hutchinson_probes or self.exact_top_k:
                    op = layer_operator(self.model, self.loss_fn, self.data, kfac.parameter_names.get(name, name),
                                        kind=self.exact_kind, output=self.output)
                if self.hutchinson_probes:
                    estimate = hutchinson_trace(op, self.hutchinson_probes, seed=self.seed)
                    row["exact_trace"], row["exact_trace_stderr"] = float(estimate.value), float(estimate.stderr)
                if self.exact_top_k:
                    row.update(_exact_top_k(eig, op, min(self.exact_top_k, eig.num_params), self.exact_tol, self.seed))
                rows.append(row)
        seconds = time.perf_counter() - start
        for row in rows:
            row.update({"seconds": seconds, "factor_seconds": factor_seconds, **extra})
        self.records.extend(rows)
        return rows

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        columns = list(dict.fromkeys(k for r in self.records for k in r))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.records)
        return path

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.records, indent=1))
        return path

    def plot(self, path: str | Path, metrics: tuple[str, ...] = METRICS, title: str | None = None) -> Path:
        """One panel per metric, one line per layer, over the recorded steps (needs matplotlib); ``title`` above
        them (default: what the blocks are)."""
        from ..plotting import plot_tracked_metrics  # the plotting edge, only when a figure is asked for

        title = title or f"per-layer spectra through training ({self.curvature} blocks)"
        return plot_tracked_metrics(self.records, metrics, Path(path), title)
