"""Outliers above the bulk (Sagun et al. 2017; Papyan 2020), as a measured statistic.

**Criterion.** The positive eigenvalues ``λ_1 ≥ λ_2 ≥ …`` above the round-off floor ``1e-8·λ_1`` are searched, the
largest ``search`` of them, for the widest gap on a log scale: ``i* = argmax_i λ_i / λ_{i+1}``. The ``i*`` eigenvalues
above it are outliers when the ratio ``λ_{i*} / λ_{i*+1}`` is ``min_ratio`` or more; otherwise there are none. The
*bulk edge* is the largest eigenvalue that is not an outlier (``λ_{count+1}``). For cross-entropy the expected count
is about ``C − 1`` (the loss Hessian has rank ``C − 1``); report it beside ``C``.

**Negative eigenvalues** of a Hessian (not of a GGN) are reported — how many lie below ``−1e-8·max|λ|`` and the most
negative one — never dropped silently; the gap search looks at the positive side only.

**A null** says whether the count means anything. ``null=`` takes either the eigenvalues of the same block under a
null hypothesis (at initialization, with shuffled labels: any ``Tensor`` or eigen result), whose largest eigenvalue is
the null's edge, or ``MarchenkoPastur(n_samples)``, the upper edge ``σ²(1 + √(P/n))²`` of the spectrum of a Gram
matrix ``XᵀX/n`` of ``n`` samples of ``P`` independent features of variance ``σ²`` (``A``-like factors), ``σ²`` fitted
from the bulk. The result reports how many eigenvalues stand above the null's edge, and for a spectrum null the same
gap statistic on the null itself (a gap that the null shows as well is not evidence of structure).

**Failure modes** (each visible in the result, none hidden in a single count):

* a gap barely above ``min_ratio`` (``gap_ratio`` near ``min_ratio``): a small change of the data, seed or training
  stage moves the count to 0 or elsewhere — compare ``gap_ratio`` with ``min_ratio`` and with ``runner_up_ratio``;
* two gaps of similar width (``runner_up_ratio`` near ``gap_ratio``): the count jumps between ``gap_position`` and
  ``runner_up_position`` from run to run;
* no gap at all at interpolation: when the loss goes to zero the curvature collapses towards zero and the spectrum
  becomes a smooth decay — ``count`` is 0, which says "no separated outliers", not "no structure";
* a wide bulk: a cluster separated from the bulk by an empty interval can still sit within a ratio of 2 of the bulk's
  top (the SLQ density of ``model_spectrum`` shows the interval) — the ratio criterion then says 0 while
  ``gap_position`` points at the cluster: read ``gap_position`` and ``gap_ratio``, not only ``count``;
* a fast-decaying tail: the widest ratio may lie deep in the top ``search`` eigenvalues, far from where the classes
  put it — read ``gap_position`` against ``C``;
* a truncated spectrum (a Lanczos top-k): a gap can only be found among the values given; a gap at the last of them
  (``gap_position == n_searched − 1``) may continue below — compute more eigenvalues.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from torch import Tensor

from ..eigen import EigenResult, eigenvalues_of

ROUND_OFF = 1e-8  # eigenvalues below this share of the largest are round-off: their ratios are noise


@dataclass(frozen=True)
class MarchenkoPastur:
    """The Marchenko–Pastur null of a Gram spectrum of ``P`` features over ``n_samples`` samples.

    ``variance`` is ``σ²``, the features' variance; ``None`` fits it from the bulk (the mean of the eigenvalues
    below the edge, iterated: outliers above the edge would otherwise inflate it).
    """

    n_samples: int
    variance: float | None = None

    def __post_init__(self):
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer (the rows of X in XᵀX/n), got {self.n_samples!r}")
        if self.variance is not None and not self.variance > 0:
            raise ValueError(f"variance must be positive (σ² of the features) or None to fit it, got {self.variance}")

    def edge(self, values: Tensor) -> float:
        """``σ²(1 + √(P/n))²`` for the ``P = len(values)`` eigenvalues of the spectrum."""
        P = values.numel()
        stretch = (1 + math.sqrt(P / self.n_samples)) ** 2
        if self.variance is not None:
            return self.variance * stretch
        variance = float(values.mean())
        for _ in range(100):  # drop what stands above the edge, refit on the rest: converges in a few steps
            bulk = values[values <= variance * stretch]
            refit = float(bulk.sum()) / max(bulk.numel(), 1)
            if refit == variance:
                break
            variance = refit
        return variance * stretch


@dataclass(frozen=True)
class NullComparison:
    """The spectrum against its null: ``edge`` (the null spectrum's largest eigenvalue, or the Marchenko–Pastur upper
    edge), ``count_above`` (eigenvalues above it), and for a spectrum null the null's own gap statistic."""

    kind: str  # "spectrum" or "marchenko-pastur"
    edge: float
    count_above: int
    null_outliers: OutlierResult | None = None


@dataclass(frozen=True)
class OutlierResult:
    """The outlier statistic of one spectrum (module docstring).

    ``count``: outliers (0 when the widest gap is below ``min_ratio``); ``gap_position``: eigenvalues above the widest
    gap, whether or not it qualifies; ``gap_ratio``: ``λ_i/λ_{i+1}`` there (``nan`` with fewer than two positive
    eigenvalues); ``runner_up_position``/``runner_up_ratio``: the second-widest gap (0 and ``nan`` if none);
    ``bulk_edge``: the largest non-outlier eigenvalue; ``n_searched``: positive eigenvalues searched; ``n_values``:
    eigenvalues given; ``n_negative``/``most_negative``: eigenvalues below ``−1e-8·max|λ|`` and the smallest
    eigenvalue when it is negative (else ``None``); ``null``: the comparison with ``null=``, if given.
    """

    count: int
    gap_position: int
    gap_ratio: float
    runner_up_position: int
    runner_up_ratio: float
    bulk_edge: float
    min_ratio: float
    search: int
    n_searched: int
    n_values: int
    n_negative: int
    most_negative: float | None
    null: NullComparison | None = None

    @property
    def criterion(self) -> str:
        return (f"widest ratio λ_i/λ_(i+1) among the {self.search} largest positive eigenvalues above "
                f"{ROUND_OFF:g}·λ_1; outliers when it is ≥ {self.min_ratio:g}")

    def to_dict(self) -> dict:
        """Plain numbers (JSON-ready apart from ``nan``), with the criterion spelled out."""
        return {**asdict(self), "criterion": self.criterion}


def find_outliers(
    spectrum: Tensor | EigenResult,
    search: int = 50,
    min_ratio: float = 2.0,
    null: Tensor | EigenResult | MarchenkoPastur | None = None,
) -> OutlierResult:
    """The outlier statistic of a spectrum: its eigenvalues (any order) or an eigen result (``.eigenvalues``: all of
    a block's, or the pairs a Lanczos run found). ``null``: a null spectrum or ``MarchenkoPastur`` (module docstring).
    """
    if isinstance(search, bool) or not isinstance(search, int) or search < 1:
        raise ValueError(f"search must be a positive integer (how many of the largest eigenvalues), got {search!r}")
    if not min_ratio > 1:
        raise ValueError(f"min_ratio must exceed 1 (a gap is a ratio λ_i/λ_(i+1) > 1), got {min_ratio!r}")
    values = eigenvalues_of(spectrum).detach().double().flatten().sort(descending=True).values
    if values.numel() == 0:
        raise ValueError("the spectrum has no eigenvalues")
    magnitude = float(values.abs().max())
    negative = values[values < -ROUND_OFF * magnitude]
    top = float(values[0])
    positive = values[values > ROUND_OFF * top] if top > 0 else values[:0]
    searched = positive[: search + 1]
    ratios = searched[:-1] / searched[1:]
    order = ratios.argsort(descending=True, stable=True)  # of equal gaps, the first
    gap_position = int(order[0]) + 1 if len(order) else 0
    gap_ratio = float(ratios[order[0]]) if len(order) else math.nan
    count = gap_position if gap_ratio >= min_ratio else 0
    result = OutlierResult(
        count=count,
        gap_position=gap_position,
        gap_ratio=gap_ratio,
        runner_up_position=int(order[1]) + 1 if len(order) > 1 else 0,
        runner_up_ratio=float(ratios[order[1]]) if len(order) > 1 else math.nan,
        bulk_edge=float(values[count]) if count < len(values) else math.nan,
        min_ratio=float(min_ratio),
        search=search,
        n_searched=len(searched),
        n_values=len(values),
        n_negative=len(negative),
        most_negative=float(values[-1]) if float(values[-1]) < 0 else None,
    )
    if null is None:
        return result
    return replace(result, null=_compare_with_null(values, null, search, min_ratio))


def _compare_with_null(values: Tensor, null, search: int, min_ratio: float) -> NullComparison:
    if isinstance(null, MarchenkoPastur):
        edge = null.edge(values)
        return NullComparison("marchenko-pastur", edge, int((values > edge).sum()))
    null_values = eigenvalues_of(null).detach().double().flatten()
    edge = float(null_values.max())
    return NullComparison("spectrum", edge, int((values > edge).sum()),
                          find_outliers(null_values, search, min_ratio))


def count_outliers(spectrum: Tensor | EigenResult, search: int = 50, min_ratio: float = 2.0) -> int:
    """``find_outliers(...).count``: the number of outliers alone (a table column, a tracked metric)."""
    return find_outliers(spectrum, search, min_ratio).count

