"""``compute_kronecker_fit``: the nearest Kronecker product to each layer's curvature block in the Frobenius norm
(Van Loan & Pitsianis 1993; for curvature blocks the KFOC idea of Koroko et al., arXiv:2201.10285), without forming
the block.

Write the block as ``H = scale · Σ_{n,k} vec(∇W̄_{nk}) vec(∇W̄_{nk})ᵀ`` (``factors.per_sample``). Rearranged so that
``G ⊗ A`` becomes ``vec(G) vec(A)ᵀ``, ``H`` becomes ``R(H)`` with

    R(H) vec(A) = vec(scale · Σ ∇W̄ A ∇W̄ᵀ),        R(H)ᵀ vec(G) = vec(scale · Σ ∇W̄ᵀ G ∇W̄),

and ``min ‖H − G ⊗ A‖_F`` is the top singular pair of ``R(H)``. Each pass over the data applies both maps to the
current pair ``(G_c, A_c)`` (a power iteration, started from KFAC's factors) and offers two candidates — ``G =
R(H)A_c/‖A_c‖²`` with ``A_c``, and ``A = R(H)ᵀG_c/‖G_c‖²`` with ``G_c``, each the best partner of the factor it keeps,
with ``‖H − G ⊗ A‖²_F = ‖H‖²_F − s²`` for its score ``s = ‖R(H)A_c‖/‖A_c‖`` (or ``‖R(H)ᵀG_c‖/‖G_c‖``); the
better one per group is the block. So already after one pass the fit is never further from ``H`` than KFAC's
``G ⊗ A`` (the first candidate keeps KFAC's ``A`` and picks the best ``G``). For a diagonal ``A`` (embeddings) the
fit is over diagonal ``A``: ``diag(R(H)ᵀ G)``. The factors are rescaled so that ``tr A`` is KFAC's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import CurvatureBlock, KroneckerBlock
from ..data import Data
from ..layers import Entry, PerSampleStatistic
from ..layout import BlockLayout
from .options import Curvature, PassOptions
from .per_sample import base_kfac, correction_options, per_sample_pass
from .result import KFAC


def _grouped(factor: Tensor, groups: int) -> Tensor:
    """A factor as ``(groups, d, d)`` (a diagonal ``A`` stays ``(width,)``)."""
    return factor.unsqueeze(0) if groups == 1 and factor.dim() == 2 else factor


class KroneckerFit(PerSampleStatistic):
    """``Σ ∇W̄ A ∇W̄ᵀ`` and ``Σ ∇W̄ᵀ G ∇W̄`` (only its diagonal for a diagonal ``A``) per group for the current pair
    ``(G, A)`` (module docstring); after the pass ``score`` ``(groups,)`` and ``next_pair`` hold what the next
    iteration needs."""

    def __init__(self, A: Tensor, G: Tensor, a_trace: Tensor, layout: BlockLayout, dtype, device):
        self.A = _grouped(A, layout.groups).to(device, dtype)
        self.G = _grouped(G, layout.groups).to(device, dtype)
        self.a_trace = a_trace.to(device, dtype)
        self.diagonal = self.A.dim() == 1
        self.ra = torch.zeros_like(self.G)
        self.rg = torch.zeros_like(self.A)
        self.score: Tensor | None = None
        self.next_pair: tuple[Tensor, Tensor] | None = None

    def add_outer(self, grads: Tensor, inputs: Tensor) -> None:
        # ∇W̄ = g āᵀ: ∇W̄ A ∇W̄ᵀ = (āᵀ A ā) g gᵀ and ∇W̄ᵀ G ∇W̄ = (gᵀ G g) ā āᵀ
        a_weight = torch.einsum("nbw,bwv,nbv->nb", inputs, self.A, inputs)
        g_weight = torch.einsum("knbo,bop,knbp->nb", grads, self.G, grads)
        self.ra += torch.einsum("knbo,nb,knbp->bop", grads, a_weight, grads)
        self.rg += torch.einsum("nbw,nb,nbv->bwv", inputs, g_weight, inputs)

    def add_matrices(self, matrices: Tensor) -> None:
        # as four large products (not k·n small ones): Σ_m X_m A X_mᵀ = [X_1 A, X_2 A, …] [X_1, X_2, …]ᵀ, and alike
        b, o, w = matrices.shape[2], matrices.shape[3], matrices.shape[4]
        flat = matrices.transpose(0, 2).reshape(b, -1, o, w)  # (groups, m, d_out, width)
        m = flat.shape[1]
        side = flat.transpose(1, 2).reshape(b, o, m * w)  # [X_1, X_2, …]
        self.ra += ((flat.reshape(b, m * o, w) @ self.A).reshape(b, m, o, w).transpose(1, 2).reshape(b, o, m * w)
                    @ side.mT)
        stacked = flat.reshape(b, m * o, w)  # [X_1; X_2; …]
        self.rg += stacked.mT @ (self.G @ side).reshape(b, o, m, w).transpose(1, 2).reshape(b, m * o, w)

    def add_token_columns(self, columns: Tensor, tokens: Tensor) -> None:
        self.ra[0] += (columns * self.A[tokens, None]).T @ columns
        self.rg.index_add_(0, tokens, torch.einsum("mo,op,mp->m", columns, self.G[0], columns))

    def state(self) -> list[Tensor]:
        return [self.ra, self.rg]

    def set_state(self, tensors: list[Tensor]) -> None:
        self.ra, self.rg = tensors

    def finalize(self, scale: float, device, layout: BlockLayout, name: str) -> dict[str, CurvatureBlock]:
        ra, rg = self.ra.mul_(scale), self.rg.mul_(scale)
        ra = 0.5 * (ra + ra.transpose(-1, -2))
        rg = rg if self.diagonal else 0.5 * (rg + rg.transpose(-1, -2))
        tiny = torch.finfo(ra.dtype).tiny
        a_norm = self.A.square().flatten(1).sum(1) if not self.diagonal else self.A.square().sum().reshape(1)
        g_norm = self.G.square().flatten(1).sum(1)
        rg_norm = rg.square().flatten(1).sum(1) if not self.diagonal else rg.square().sum().reshape(1)
        score_a = (ra.square().flatten(1).sum(1) / a_norm.clamp_min(tiny)).sqrt()  # keep A_c, best G
        score_g = (rg_norm / g_norm.clamp_min(tiny)).sqrt()  # keep G_c, best A
        keep_a = score_a >= score_g
        self.score = torch.maximum(score_a, score_g)
        G = torch.where(keep_a[:, None, None], ra / a_norm.clamp_min(tiny)[:, None, None], self.G)
        if self.diagonal:
            A = self.A if bool(keep_a[0]) else rg / g_norm.clamp_min(tiny)
            trace = A.sum().reshape(1)
        else:
            A = torch.where(keep_a[:, None, None], self.A, rg / g_norm.clamp_min(tiny)[:, None, None])
            trace = A.diagonal(dim1=-2, dim2=-1).sum(-1)
        ratio = torch.where(trace > 0, self.a_trace / trace.clamp_min(tiny), torch.ones_like(trace))
        A = A * (ratio if self.diagonal else ratio[:, None, None])
        G = G / ratio[:, None, None]
        self.next_pair = (rg, ra)
        if layout.groups == 1:
            G = G[0]
            A = A if self.diagonal else A[0]
        return {name: KroneckerBlock(A.to(device), G.to(device), layout, name)}


def _fit_statistic(pairs: dict[str, tuple[Tensor, Tensor]], traces: dict[str, Tensor],
                   fits: dict[str, KroneckerFit]) -> Callable[[Entry, KroneckerBlock], KroneckerFit]:
    """The per-sample statistic of one pass: a ``KroneckerFit`` from each layer's current pair, recorded in ``fits``."""

    def statistic(entry: Entry, block: KroneckerBlock) -> KroneckerFit:
        name = entry.module_name
        A, G = pairs[name]
        fits[name] = KroneckerFit(A, G, traces[name], block.layout, block.dtype, block.device)
        return fits[name]

    return statistic


def compute_kronecker_fit(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    curvature: Curvature | None = None,
    kfac: KFAC | None = None,
    *,
    iterations: int = 3,
    tol: float = 1e-3,
    options: PassOptions | None = None,
    **arguments: Any,
) -> KFAC:
    """The Frobenius-nearest Kronecker block ``G ⊗ A`` of every Kronecker layer of ``kfac`` (computed here with
    ``compute_kfac`` when not given; module docstring), the other blocks of ``kfac`` unchanged.

    Up to ``iterations`` passes over ``data``, each a step of the power iteration; it stops early when no layer's
    score ``s`` (``‖H‖² − s²`` is the squared Frobenius error) changed by more than ``tol`` (relative), and warns when
    it ran out of iterations first. The other arguments are those of ``compute_ekfac``: ``curvature`` and the pass
    options choose which per-sample gradients — which block ``H`` — are fitted; with ``"ggn"`` and one output
    position per sample (or ``per_position=True``) ``H`` is the exact GGN block. The draws (``"mc"`` labels with its
    required ``seed``, the position signs) repeat in every pass, so every pass fits the same ``H``. The result is a
    ``KFAC`` of ``KroneckerBlock`` s: every spectrum and analysis applies unchanged.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    options, kfac_arguments = correction_options(curvature, kfac, options, arguments)
    if options.curvature == "mc" and options.seed is None:
        raise ValueError("curvature='mc' needs a seed: every pass must draw the same labels to fit one block")
    kfac = base_kfac(model, loss_fn, data, kfac, options, kfac_arguments)
    pairs = {name: (block.A, block.G) for name, block in kfac.items() if isinstance(block, KroneckerBlock)}
    traces = {name: _grouped(block.A, block.layout.groups) for name, block in kfac.items() if name in pairs}
    traces = {name: A.sum().reshape(1) if A.dim() == 1 else A.diagonal(dim1=-2, dim2=-1).sum(-1)
              for name, A in traces.items()}
    scores: dict[str, Tensor] = {}
    change = float("inf")
    for _ in range(iterations):
        fits: dict[str, KroneckerFit] = {}
        result = per_sample_pass(model, loss_fn, data, kfac, _fit_statistic(pairs, traces, fits), options,
                                 "nearest Kronecker product")
        change = max((float(((fit.score - scores[name]).abs() / fit.score.clamp_min(1e-300)).max())
                      if name in scores else float("inf")) for name, fit in fits.items())
        scores = {name: fit.score for name, fit in fits.items()}
        pairs = {name: fit.next_pair for name, fit in fits.items()}
        if change <= tol:
            break
    if iterations > 1 and change > tol:
        warnings.warn(f"compute_kronecker_fit: after {iterations} passes the fit still changed by {change:.1e} "
                      f"(> tol={tol:g}); more iterations move it closer to the nearest Kronecker product",
                      RuntimeWarning, stacklevel=2)
    return result
