"""A whole-model spectrum in one call: the exact top-k eigenpairs by block Lanczos and the density by stochastic
Lanczos quadrature, both on the products of one exact operator (the Hessian or the GGN of all trainable parameters,
or of the layers named). A dense whole-model Hessian is out of reach beyond ~10 k parameters; this is not.

The top-k pairs are the result's eigen-result side (``kfac_hessian.eigen``: ``eigenvalues`` descending, ``topk``,
``num_params``, vectors in public order ``torch.cat([p.flatten() for p in parameters])``), so every analysis
(overlap, outliers, low-rank structure) takes it as it takes a block's ``eig()``. The density (``SLQDensity``)
integrates to ``P``; its first moment is a Hutchinson estimate of the trace with the same probes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from ..data import Data, OutputSelector
from ..limits import LANCZOS_DENSE_LIMIT
from .lanczos import LanczosResult, lanczos
from .operators import layer_operator
from .stochastic import SLQDensity, TraceEstimate, slq_density


@dataclass
class ModelSpectrum:
    """The exact top-k (``top``) and the spectral density (``density``) of one curvature operator (module docstring).

    ``kind``: ``"hessian"`` or ``"ggn"``; ``param_names``: the parameters, in the order of the eigenvectors;
    ``n_matvecs``: operator-vector products spent on everything; ``seconds``: wall time of everything; ``bottom``: the
    ``smallest`` most negative (smallest) eigenpairs, descending, when asked for (a Hessian's negative curvature).
    """

    top: LanczosResult
    density: SLQDensity
    kind: str
    param_names: list[str]
    n_matvecs: int
    seconds: float
    bottom: LanczosResult | None = None

    @property
    def eigenvalues(self) -> Tensor:
        """The ``k`` largest eigenvalues, descending."""
        return self.top.eigenvalues

    @property
    def num_params(self) -> int:
        return self.top.num_params

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """The leading ``k`` (at most the ``k`` computed) eigenvalues and eigenvectors ``(k, P)``."""
        return self.top.topk(k)

    def trace(self) -> TraceEstimate:
        """``tr`` of the operator, estimated from the density's probes (their Hutchinson estimate)."""
        return self.density.moment(1)

    def plot(self, path: str | Path, title: str = "") -> Path:
        """The density with the top-k marked, and the top-k against rank (needs matplotlib)."""
        from ..plotting import plot_model_spectrum  # the plotting edge, only when a figure is asked for

        return plot_model_spectrum(self, Path(path), title)


def model_spectrum(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    k: int = 20,
    curvature: str = "hessian",
    layers: str | list[str] | None = None,
    n_probes: int = 10,
    n_iter: int = 80,
    log: bool = False,
    tol: float = 1e-6,
    seed: int = 0,
    block_size: int = 1,
    dense_limit: int = LANCZOS_DENSE_LIMIT,
    output: OutputSelector | None = None,
    batch_norm_eval: bool = True,
    smallest: int = 0,
) -> ModelSpectrum:
    """The exact top-``k`` eigenpairs and the spectral density of the whole model's Hessian (``curvature="hessian"``)
    or Gauss-Newton matrix (``"ggn"``) — of all trainable parameters, or of ``layers`` as ``layer_operator`` reads
    them.

    Lanczos (``tol``, ``block_size``, ``dense_limit``: as ``lanczos``) runs with ``which="largest"``; SLQ runs
    ``n_probes`` Rademacher probes of ``n_iter`` steps (``log``: the density of ``log10 λ``, the eigenvalues ≤ 0
    counted apart). ``smallest > 0`` also finds that many smallest eigenpairs (``bottom``). ``seed`` seeds every
    random start and probe. The model is left as it was (products run functionally).
    """
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn' (the exact operators), got {curvature!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer (the number of top eigenpairs)")
    start = time.perf_counter()
    op = layer_operator(model, loss_fn, data, layers, kind=curvature, batch_norm_eval=batch_norm_eval, output=output)
    if isinstance(smallest, bool) or not isinstance(smallest, int) or smallest < 0:
        raise ValueError(f"smallest={smallest!r} must be an integer ≥ 0 (how many smallest eigenpairs; 0: none)")
    if max(k, smallest) > op.num_params:
        raise ValueError(f"k={k} or smallest={smallest} exceeds the {op.num_params} parameters of the operator")
    options = {"tol": tol, "seed": seed, "block_size": block_size, "dense_limit": dense_limit}
    top = lanczos(op, k, **options)
    bottom = lanczos(op, smallest, which="smallest", **options) if smallest else None
    density = slq_density(op, n_probes=n_probes, n_iter=n_iter, log=log, seed=seed)
    return ModelSpectrum(top, density, curvature, list(op.param_names), op.n_matvecs, time.perf_counter() - start,
                         bottom)
