"""Validation report: how good is the Kronecker approximation of each layer, measured on the exact path.

Per layer, with ``k`` top eigenpairs on each side:

* ``eig_rel_err``: ``|λ_i^K − λ_i| / λ_i`` for the i-th largest eigenvalues (max and median over i ≤ k);
* ``overlap``: top-k eigenspace overlap ``‖V_K V_Eᵀ‖_F²/k`` and its random baseline ``k/P``;
* ``trace_ratio``: ``tr(G ⊗ A) / tr(H)`` (``exact_trace`` with its standard error when estimated);
* ``frobenius_rel_err``: ``‖G ⊗ A − H‖_F / ‖H‖_F`` (dense layers only);
* ``log_spectrum_w1``: Wasserstein-1 distance between the two spectra as distributions of ``log10 λ``
  (eigenvalues below ``1e-10·λ_max`` are floored there, as they are round-off for PSD blocks);
* ``outliers``: eigenvalues above the bulk edge on each side (``find_outliers``), beside ``C``, with the widest gap's
  ratio (``outlier_gap_ratio_*``: near the threshold 2 the count is fragile);
* ``energy_share``: mean share of the top singular value of the exact top eigenvectors reshaped to the
  weight (1 = exactly rank one, as every Kronecker eigenvector is; Kronecker blocks only);
* ``residual_frobenius``, ``residual_trace_share`` (optional): the Hessian − Gauss-Newton split;
* cost: seconds and matrix-vector products of each side.

Every block of ``kfac`` is measured against the exact block of the same parameters
(``KFAC.parameter_names``). Blocks with ``P ≤ dense_limit`` are measured densely (exact full spectrum); larger
ones with Lanczos (top-k), SLQ (density) and Hutchinson (trace).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from torch import nn

from ..blocks import KroneckerEigen
from ..data import Data, OutputSelector
from ..exact import hutchinson_trace, lanczos, layer_operator, slq_density
from ..factors import KFAC
from ..limits import COMPARE_DENSE_LIMIT
from .low_rank import low_rank_structure
from .outliers import DEFAULT_NULL, find_outliers
from .overlap import eigenspace_overlap


def json_ready(value):
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN or Infinity)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _log_floor(values: np.ndarray, top: float) -> np.ndarray:
    return np.log10(np.maximum(values, 1e-10 * top))


@dataclass
class ValidationReport:
    """Rows of per-layer measurements (plain floats/ints/strings), plus the settings that produced them."""

    rows: list[dict]
    settings: dict = field(default_factory=dict)
    spectra: dict = field(default_factory=dict, repr=False)  # per layer: arrays for plots

    def __repr__(self) -> str:
        names = [r["layer"] for r in self.rows]
        shown = ", ".join(names[:6]) + (f", … ({len(names)} layers)" if len(names) > 6 else "")
        return f"ValidationReport(layers=[{shown}], settings={self.settings})"

    def to_dict(self) -> dict:
        """The settings and the rows, JSON-ready: a measurement that does not exist (NaN: e.g. the Frobenius error of
        a layer measured with Lanczos) is ``None`` (``null`` in JSON)."""
        return json_ready({"settings": self.settings, "layers": self.rows})

    def to_json(self, path=None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    # (key in the rows and in report.json — also the table header —, format, meaning for the legend)
    COLUMNS = [
        ("layer", "{}", "block name (a module, or a parameter for a per-sample block)"),
        ("P", "{}", "parameters in the block"),
        ("k", "{}", "top eigenpairs compared (at most the requested k, all P of a smaller block)"),
        ("exact", "{}", "how the exact block was measured: dense eigh, or Lanczos (top-k) + SLQ (density)"),
        ("max_eig_rel_err", "{:.2f}", "largest |λᵢ(approx) − λᵢ(exact)| / λᵢ(exact) over the top k"),
        ("median_eig_rel_err", "{:.2f}", "median of the same over the top k"),
        ("overlap", "{:.3f}", "top-k eigenspace overlap ‖V_K V_Eᵀ‖²_F / k (1 = same subspace)"),
        ("random_baseline", "{:.4f}", "the overlap of a random k-subspace, k/P"),
        ("trace_ratio", "{:.3f}", "tr(approx) / tr(exact) (Hutchinson estimate for Lanczos blocks)"),
        ("frobenius_rel_err", "{:.3f}", "‖approx − exact‖_F / ‖exact‖_F (dense blocks only)"),
        ("log_spectrum_w1", "{:.3f}", "Wasserstein-1 distance between the log10 spectra (decades)"),
        ("outliers_kronecker", "{}", "eigenvalues above the widest log-gap, approximation"),
        ("outliers_exact", "{}", "the same for the exact block"),
        ("energy_share", "{:.3f}", "mean σ₁²/Σσ² of the exact top eigenvectors as weight matrices (1 = rank one; "
         "Kronecker blocks)"),
        ("residual_frobenius", "{:.3f}", "‖H − GGN‖_F / ‖H‖_F (with gauss_newton_residual)"),
        ("seconds_kronecker", "{:.3f}", "seconds for the approximation's top-k (after the eigenvalues of all blocks, "
         "computed together)"),
        ("seconds_exact", "{:.2f}", "seconds for the exact measurements"),
        ("matvecs_exact", "{}", "exact block-vector products used"),
    ]

    def to_markdown(self, legend: bool = True) -> str:
        """The rows as a markdown table whose headers are the row keys (as in ``report.json``), with a legend."""
        meanings = {key: meaning for key, _, meaning in self.COLUMNS}
        extra = [(f"{label}_{key}", spec, f"{meanings[key]}, for {label}")
                 for label in self.settings.get("also", []) for key, spec, _ in self.COLUMNS if key in ALSO_MEASURES]
        at = next(i for i, c in enumerate(self.COLUMNS) if c[0] == "log_spectrum_w1") + 1
        columns = [c for c in self.COLUMNS[:at] + extra + self.COLUMNS[at:]
                   if any(row.get(c[0]) is not None for row in self.rows)]
        lines = ["| " + " | ".join(key for key, _, _ in columns) + " |", "|" + "---|" * len(columns)]
        for row in self.rows:
            cells = []
            for key, spec, _ in columns:
                value = row.get(key)
                cells.append("–" if value is None or (isinstance(value, float) and math.isnan(value))
                             else spec.format(value))
            lines.append("| " + " | ".join(cells) + " |")
        if legend:
            lines += ["", "Columns (– = not measured):"] + [f"  {key}: {meaning}" for key, _, meaning in columns]
        return "\n".join(lines)


def compare(
    kfac: KFAC,
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    k: int = 20,
    kind: str = "hessian",
    dense_limit: int = COMPARE_DENSE_LIMIT,
    n_classes: int | None = None,
    seed: int = 0,
    gauss_newton_residual: bool = False,
    output: OutputSelector | None = None,
    progress: Callable[[str], None] | None = None,
    also: Mapping[str, KFAC] | None = None,
) -> ValidationReport:
    """Measure every layer of ``kfac`` against the exact ``kind`` block (``"hessian"`` or ``"ggn"``), with at most ``k``
    eigenpairs per layer (all ``P`` of a smaller one, as ``topk``; each row records the ``k`` it used).

    ``gauss_newton_residual`` (with ``kind="hessian"``) adds the Hessian − GGN split per layer:
    ``residual_frobenius = ‖H − GGN‖_F/‖H‖_F`` (dense layers) and ``residual_trace_share = tr(H − GGN)/tr(H)``
    (Hutchinson on ``H − GGN`` for larger layers). It is zero for piecewise-linear activations. ``output`` picks the
    model's output tensor, as in ``compute_kfac``. ``progress`` receives a line per layer as it starts and ends (the
    exact measurements take most of the time). ``also`` — e.g. ``{"ekfac": compute_ekfac(…), "fit":
    compute_kronecker_fit(…)}`` — measures further approximations of the same blocks against the same exact blocks:
    columns ``{label}_max_eig_rel_err``, ``{label}_overlap``, ``{label}_trace_ratio``, ``{label}_frobenius_rel_err``
    and ``{label}_log_spectrum_w1``.
    """
    if gauss_newton_residual and kind != "hessian":
        raise ValueError("gauss_newton_residual needs kind='hessian'")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer (at most k eigenpairs per layer; each row records its k)")
    rows, spectra = [], {}
    eigs = kfac.eig()  # every block's eigenvalues at once: batched by size, concurrent on the CPU
    also_eigs = {label: approximation.eig() for label, approximation in (also or {}).items()}
    for name, block in kfac.items():
        P = block.num_params
        k_layer = min(k, P)
        split: dict = {}
        start = time.perf_counter()
        eig = eigs[name]
        k_vals, k_vecs = eig.topk(k_layer)
        seconds_k = time.perf_counter() - start
        k_all = eig.eigenvalues.cpu().double().numpy()
        params = kfac.parameter_names.get(name, name)
        op = layer_operator(model, loss_fn, data, params, kind=kind, output=output)
        if progress is not None:
            how = "dense eigh" if P <= dense_limit else "Lanczos + SLQ + Hutchinson"
            progress(f"  exact {kind} of layer {name} (P={P}, {how}) …")
        start = time.perf_counter()
        if P <= dense_limit:
            dense = op.to_dense(max_params=dense_limit)
            e_all, e_vecs_all = torch.linalg.eigh(0.5 * (dense + dense.T))
            e_all, e_vecs_all = e_all.flip(0), e_vecs_all.flip(1)
            e_vals, e_vecs = e_all[:k_layer], e_vecs_all[:, :k_layer].T
            exact_trace, trace_stderr = float(torch.trace(dense)), 0.0
            if gauss_newton_residual:
                residual = dense - layer_operator(model, loss_fn, data, params, kind="ggn", output=output).to_dense(
                    max_params=dense_limit)
                split = {
                    "residual_frobenius": float(residual.norm() / dense.norm()),
                    "residual_trace": float(torch.trace(residual)),
                    "residual_trace_stderr": 0.0,
                    "residual_trace_share": float(torch.trace(residual)) / exact_trace,
                }
            e_dist_values, e_dist_weights = e_all.cpu().double().numpy(), None
            mode = "dense"
        else:
            result = lanczos(op, k_layer, tol=1e-6, seed=seed)
            e_vals, e_vecs = result.eigenvalues, result.eigenvectors
            estimate = hutchinson_trace(op, n_probes=100, seed=seed)
            exact_trace, trace_stderr = estimate.value, estimate.stderr
            slq = slq_density(op, n_probes=4, n_iter=min(60, P), seed=seed)
            used = slq.weights > 0
            e_dist_values = slq.nodes[used].cpu().double().numpy()
            e_dist_weights = slq.weights[used].cpu().double().numpy()
            dense = None
            mode = "lanczos+slq"
            if gauss_newton_residual:
                difference = op - layer_operator(model, loss_fn, data, params, kind="ggn", output=output)
                residual_trace = hutchinson_trace(difference, n_probes=100, seed=seed)
                split = {
                    "residual_frobenius": float("nan"),
                    "residual_trace": residual_trace.value,
                    "residual_trace_stderr": residual_trace.stderr,
                    "residual_trace_share": residual_trace.value / exact_trace,
                }
        seconds_e = time.perf_counter() - start
        if progress is not None:
            progress(f"  … layer {name} done in {seconds_e:.1f}s ({op.n_matvecs} products)")
        exact = _Exact(e_vals.cpu().double().numpy(), e_vecs, exact_trace, dense if mode == "dense" else None,
                       e_dist_values, e_dist_weights)
        measures = _measures(block, eig, k_vals, k_vecs, k_all, exact, dense_limit)
        k_np = k_vals.cpu().double().numpy()
        energy = float(low_rank_structure(e_vecs, eig).energy_share.mean()) if isinstance(eig, KroneckerEigen) else None
        others = {}
        for label, approximation in (also or {}).items():
            if name in approximation:
                other = approximation[name]
                other_eig = also_eigs[label][name]
                o_vals, o_vecs = other_eig.topk(k_layer)
                o_all = other_eig.eigenvalues.cpu().double().numpy()
                others |= {f"{label}_{key}": value for key, value in
                           _measures(other, other_eig, o_vals, o_vecs, o_all, exact, dense_limit).items()
                           if key in ALSO_MEASURES}
        outliers_k = find_outliers(torch.as_tensor(k_all))
        # a Lanczos top-k is not a whole spectrum: no Marchenko–Pastur bulk to compare with
        outliers_e = find_outliers(torch.as_tensor(e_dist_values if mode == "dense" else exact.top),
                                   null=DEFAULT_NULL if mode == "dense" else None)
        rows.append(
            {
                "layer": name,
                "block": block.describe(),
                "P": P,
                "k": k_layer,
                "exact": mode,
                **measures,
                "random_baseline": k_layer / P,
                "exact_trace": exact_trace,
                "exact_trace_stderr": trace_stderr,
                "outliers_kronecker": outliers_k.count,
                "outliers_exact": outliers_e.count,
                "outlier_gap_ratio_kronecker": outliers_k.gap_ratio,
                "outlier_gap_ratio_exact": outliers_e.gap_ratio,
                "n_classes": n_classes,
                "energy_share": energy,
                "seconds_kronecker": seconds_k,
                "seconds_exact": seconds_e,
                "matvecs_exact": op.n_matvecs,
                "top_eigenvalues_kronecker": [float(v) for v in k_np],
                "top_eigenvalues_exact": [float(v) for v in exact.top],
                **others,
                **split,
            }
        )
        spectra[name] = {"kronecker": k_all, "exact": e_dist_values, "exact_weights": e_dist_weights}
    settings = {"k": k, "kind": kind, "curvature": kfac.curvature, "approx": kfac.approx, "dense_limit": dense_limit}
    if also:
        settings["also"] = list(also)
    return ValidationReport(rows, settings, spectra)


ALSO_MEASURES = ("max_eig_rel_err", "overlap", "trace_ratio", "frobenius_rel_err", "log_spectrum_w1")


@dataclass
class _Exact:
    """One exact block's measurements, shared by every approximation compared with it."""

    top: np.ndarray  # top-k eigenvalues
    vectors: torch.Tensor  # (k, P)
    trace: float
    dense: torch.Tensor | None  # the block itself where it was formed
    distribution: np.ndarray  # all eigenvalues (dense) or SLQ nodes
    weights: np.ndarray | None  # SLQ weights


def _measures(block, eig, top_values, top_vectors, all_values: np.ndarray, exact: _Exact, dense_limit: int) -> dict:
    """How one approximation of a block compares with the exact block (module docstring)."""
    approx = top_values.cpu().double().numpy()
    rel = np.abs(approx - exact.top) / np.maximum(np.abs(exact.top), 1e-300)
    top = float(max(all_values.max(), exact.distribution.max()))
    w1 = wasserstein_distance(_log_floor(all_values, top), _log_floor(exact.distribution, top), None, exact.weights)
    frob = float("nan") if exact.dense is None else float(
        (block.to_dense(max_params=dense_limit) - exact.dense).norm() / exact.dense.norm())
    return {"max_eig_rel_err": float(rel.max()), "median_eig_rel_err": float(np.median(rel)),
            "overlap": eigenspace_overlap(top_vectors.to(exact.vectors.dtype), exact.vectors),
            "trace_ratio": float(eig.trace()) / exact.trace, "frobenius_rel_err": frob, "log_spectrum_w1": float(w1)}
