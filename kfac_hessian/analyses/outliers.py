"""Outliers above the bulk (Sagun et al. 2017; Papyan 2020), as a measured statistic.

**Criterion.** The positive eigenvalues ``λ_1 ≥ λ_2 ≥ …`` above the round-off floor ``1e-8·λ_1`` are searched, the
largest ``search`` of them, for the widest gap on a log scale: ``i* = argmax_i λ_i / λ_{i+1}``. The ``i*`` eigenvalues
above it are outliers when the ratio ``λ_{i*} / λ_{i*+1}`` is ``min_ratio`` or more; otherwise there are none. The
*bulk edge* is the largest eigenvalue that is not an outlier (``λ_{count+1}``). For cross-entropy the expected count
is about ``C − 1`` (the loss Hessian has rank ``C − 1``); report it beside ``C``.

**Negative eigenvalues** of a Hessian (not of a GGN) are reported — how many lie below ``−1e-8·max|λ|`` and the most
negative one — never dropped silently; the gap search looks at the positive side only.

**A null** says whether the count means anything. ``null=`` takes

* ``MarchenkoPastur()`` — **the default** — computed from the spectrum alone: the spectrum of a Gram matrix
  ``XᵀX/n`` of ``n`` samples of ``P`` independent features of variance ``σ²`` follows the Marchenko–Pastur law of
  aspect ratio ``γ = P/n``, whose mean is ``σ²`` and variance ``γσ⁴`` and whose upper edge is ``σ²(1 + √γ)²``. Both
  ``σ²`` and ``γ`` are fitted to the *bulk* by these two moments (``σ² = mean``, ``γ = variance/mean²``); the bulk
  is what is left when the fewest largest eigenvalues are set aside such that the largest one left lies within the
  fitted edge — outliers do not inflate the fit, and a bulk consistent with itself is not eaten into.
  ``MarchenkoPastur(n_samples)`` fixes ``γ = P/n``; ``variance=`` fixes ``σ²``.
* the eigenvalues of the same block under a null hypothesis (at initialization, with shuffled labels: any ``Tensor``
  or eigen result), whose largest eigenvalue is the null's edge; the same gap statistic is also computed on the
  null itself (a gap that the null shows as well is not evidence of structure);
* ``None``: no comparison.

The result reports how many eigenvalues stand above the null's edge (``null.count_above``).

*What the default null can and cannot mean.* A Hessian, a GGN or a Kronecker block is not a Wishart matrix: its
bulk is not made of independent features, and a GGN of ``n`` samples and ``C`` classes has rank ``≤ n(C − 1)``, not
``n``. The fitted ``γ`` is therefore not a sample ratio but a shape parameter: the Marchenko–Pastur law with the
bulk's own mean and spread. "``k`` eigenvalues above the fitted edge" says that ``k`` eigenvalues stand further from
the bulk than a Wishart bulk of the same two moments would reach — a scale-free, threshold-free companion to the
gap ratio, not a significance test. It fails (says too much or too little) when the bulk is far from that shape:

* a heavy-tailed or power-law bulk (trained networks) has a long upper tail that the two moments place partly above
  the edge: ``count_above`` then counts tail eigenvalues, not separated ones — compare it with the gap statistic.
  Measured (``benchmarks/outliers_study.py``, ``diagnostics_study.py``): small trained ReLU networks put tens to
  hundreds of their Hessian and GGN eigenvalues above the fitted edge, Kronecker blocks of wide layers thousands;
* a spectrum dominated by (near-)zeros (a rank-deficient block) is fitted as ``γ > 1`` — the law's atom at zero —
  with an edge near ``m₂/m₁`` (second moment over mean): right for a Wishart matrix of fewer samples than features,
  arbitrary for a non-zero part of another shape;
* an indefinite Hessian: negative eigenvalues enter the moments (they lower the mean and widen the spread); when the
  bulk's mean is not positive the law does not apply and the edge is ``nan`` (``count_above`` 0) — use a spectrum
  null (initialization, shuffled labels) there;
* a truncated spectrum (a Lanczos top-k) holds too few eigenvalues to fit a bulk: the default null is left out
  (``null`` is ``None``) unless ``unseen=`` gives the moments of the eigenvalues it lacks
  (``unseen_spectrum(operator, pairs)``: Hutchinson on the operator deflated by the pairs found); an explicit
  ``MarchenkoPastur`` null on a truncated eigen result without ``unseen=`` is an error. A plain tensor is taken as
  the whole spectrum.

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

import torch
from torch import Tensor

from ..eigen import EigenResult, eigenvalues_of, is_eigen_result
from ..linear_operator import LinearOperator

ROUND_OFF = 1e-8  # eigenvalues below this share of the largest are round-off: their ratios are noise


@dataclass(frozen=True)
class UnseenSpectrum:
    """The eigenvalues a truncated spectrum does not hold, by how many there are (``count``), their sum (``total``)
    and the sum of their squares (``total_of_squares``): what the Marchenko–Pastur fit needs of them."""

    count: int
    total: float
    total_of_squares: float

    def __post_init__(self):
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"count must be a non-negative integer (eigenvalues not held), got {self.count!r}")
        if not self.total_of_squares >= 0:
            raise ValueError(f"total_of_squares must be non-negative (a sum of squares), got {self.total_of_squares}")


def unseen_spectrum(operator: LinearOperator, pairs: EigenResult, probes: int = 32, seed: int = 0) -> UnseenSpectrum:
    """Hutchinson estimates of the sum and the sum of squares of the eigenvalues of the symmetric ``operator`` that
    ``pairs`` (its leading eigenpairs, e.g. a Lanczos result) does not hold: with ``Π = I − VᵀV`` the projector off
    the pairs' eigenvectors ``V`` (rows) and Rademacher columns ``z``, ``E[zᵀΠAΠz] = tr(ΠAΠ)`` and
    ``E[‖ΠAΠz‖²] = tr((ΠAΠ)²)`` — the power sums of the remaining ``P − k`` eigenvalues, without the outliers'
    variance (deflation first). Costs ``probes`` operator products (one batch)."""
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer (Rademacher vectors), got {probes!r}")
    values, vectors = pairs.topk(len(eigenvalues_of(pairs)))
    P = operator.num_params
    if vectors.shape[1] != P:
        raise ValueError(f"the pairs' eigenvectors have length {vectors.shape[1]}, the operator is {P} × {P}: "
                         "pass the pairs computed from this operator")
    generator = torch.Generator().manual_seed(seed)
    z = (torch.randint(0, 2, (P, probes), generator=generator) * 2 - 1).to(operator.dtype)
    V = vectors.to(device=z.device, dtype=z.dtype)
    z = z - V.T @ (V @ z)
    image = torch.as_tensor(operator.matmat(z.to(operator.device))).to(z)
    image = image - V.T @ (V @ image)
    return UnseenSpectrum(count=P - len(values), total=float((z * image).sum(0).mean()),
                          total_of_squares=float(image.square().sum(0).mean()))


@dataclass(frozen=True)
class MarchenkoPastur:
    """The Marchenko–Pastur null (module docstring): ``σ²`` and ``γ`` fitted to the bulk's mean and variance.

    ``n_samples`` fixes ``γ = P/n`` (``P`` the eigenvalues in all, given and unseen); ``variance`` fixes ``σ²``;
    ``None`` fits it.
    """

    n_samples: int | None = None
    variance: float | None = None

    def __post_init__(self):
        if self.n_samples is not None and (isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int)
                                           or self.n_samples < 1):
            raise ValueError(f"n_samples must be a positive integer (the rows of X in XᵀX/n) or None to fit the "
                             f"aspect ratio, got {self.n_samples!r}")
        if self.variance is not None and not self.variance > 0:
            raise ValueError(f"variance must be positive (σ² of the features) or None to fit it, got {self.variance}")

    def fit(self, values: Tensor, unseen: UnseenSpectrum | None = None) -> tuple[float, float, float]:
        """``(σ², γ, edge)`` for the eigenvalues ``values`` (descending) and the ``unseen`` rest of the spectrum: the
        fit to the bulk left after the fewest largest eigenvalues are set aside such that the bulk's largest lies
        within the bulk's own fitted edge. ``nan`` throughout when that bulk's mean is not positive (the law does not
        apply) or nothing is left of it."""
        rest = unseen or UnseenSpectrum(0, 0.0, 0.0)
        total = len(values) + rest.count
        # the bulk's count, mean and spread when the top k are set aside, for every k = 0 … len(values) at once
        zero = values.new_zeros(1)
        count = total - torch.arange(len(values) + 1, dtype=values.dtype)
        mean = (torch.cat([values.flip(0).cumsum(0).flip(0), zero]) + rest.total) / count
        second = (torch.cat([values.square().flip(0).cumsum(0).flip(0), zero]) + rest.total_of_squares) / count
        variance = torch.full_like(mean, self.variance) if self.variance is not None else mean
        gamma = (torch.full_like(mean, total / self.n_samples) if self.n_samples is not None
                 else (second - mean ** 2).clamp(min=0) / mean ** 2)
        edge = variance * (1 + gamma.sqrt()) ** 2
        consistent = torch.cat([values <= edge[:-1], torch.tensor([True])])  # with all set aside: only the unseen
        k = int(consistent.nonzero()[0])
        if not (count[k] > 0 and mean[k] > 0):
            return math.nan, math.nan, math.nan
        return float(variance[k]), float(gamma[k]), float(edge[k])


@dataclass(frozen=True)
class NullComparison:
    """The spectrum against its null: ``edge`` (the null spectrum's largest eigenvalue, or the Marchenko–Pastur upper
    edge), ``count_above`` (eigenvalues above it); for a spectrum null the null's own gap statistic
    (``null_outliers``), for the Marchenko–Pastur null the fitted ``variance`` (σ²) and ``aspect_ratio`` (γ)."""

    kind: str  # "spectrum" or "marchenko-pastur"
    edge: float
    count_above: int
    null_outliers: OutlierResult | None = None
    variance: float | None = None
    aspect_ratio: float | None = None


DEFAULT_NULL = MarchenkoPastur()


@dataclass(frozen=True)
class OutlierResult:
    """The outlier statistic of one spectrum (module docstring).

    ``count``: outliers (0 when the widest gap is below ``min_ratio``); ``gap_position``: eigenvalues above the widest
    gap, whether or not it qualifies; ``gap_ratio``: ``λ_i/λ_{i+1}`` there (``nan`` with fewer than two positive
    eigenvalues); ``runner_up_position``/``runner_up_ratio``: the second-widest gap (0 and ``nan`` if none);
    ``bulk_edge``: the largest non-outlier eigenvalue; ``n_searched``: positive eigenvalues searched; ``n_values``:
    eigenvalues given; ``n_negative``/``most_negative``: eigenvalues below ``−1e-8·max|λ|`` and the smallest
    eigenvalue when it is negative (else ``None``); ``null``: the comparison with the null (``None`` when there is
    none: ``null=None``, or the default null on a truncated eigen result without ``unseen=``).
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
    null: Tensor | EigenResult | MarchenkoPastur | None = DEFAULT_NULL,
    unseen: UnseenSpectrum | None = None,
) -> OutlierResult:
    """The outlier statistic of a spectrum: its eigenvalues (any order; a tensor is taken as the whole spectrum) or an
    eigen result (``.eigenvalues``: all of a block's, or the pairs a Lanczos run found). ``null``: the fitted
    Marchenko–Pastur bulk (default), a null spectrum, or ``None`` (module docstring); ``unseen``: the eigenvalues a
    truncated spectrum lacks (``unseen_spectrum``), for the Marchenko–Pastur fit.
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
    if isinstance(null, MarchenkoPastur):
        truncated = is_eigen_result(spectrum) and len(values) < spectrum.num_params
        if truncated and unseen is None:
            if null is DEFAULT_NULL:
                return result
            raise ValueError(f"the spectrum holds {len(values)} of {spectrum.num_params} eigenvalues: a Marchenko–"
                             "Pastur bulk cannot be fitted to them; pass unseen=unseen_spectrum(operator, pairs), "
                             "or a null spectrum, or null=None")
        variance, gamma, edge = null.fit(values, unseen)
        count_above = int((values > edge).sum()) if math.isfinite(edge) else 0
        return replace(result, null=NullComparison("marchenko-pastur", edge, count_above, variance=variance,
                                                   aspect_ratio=gamma))
    if null is None:
        return result
    null_values = eigenvalues_of(null).detach().double().flatten()
    edge = float(null_values.max())
    return replace(result, null=NullComparison("spectrum", edge, int((values > edge).sum()),
                                               find_outliers(null_values, search, min_ratio, null=None)))


def count_outliers(spectrum: Tensor | EigenResult, search: int = 50, min_ratio: float = 2.0) -> int:
    """``find_outliers(...).count``: the number of outliers alone (a table column, a tracked metric)."""
    return find_outliers(spectrum, search, min_ratio, null=None).count
