"""Stochastic estimates from products alone: Hutchinson's trace and the spectral density by stochastic
Lanczos quadrature (SLQ; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019).

Both use Rademacher probes ``z`` (``zᵀz = P``), all probes applied together in one pass over the data per
product. For a probe, ``m`` Lanczos steps from ``z/√P`` (full reorthogonalization) give a tridiagonal
matrix whose eigenvalues ``θ_i`` (nodes) and squared first eigenvector components ``w_i`` (weights, summing
to 1) form a Gauss quadrature: ``zᵀ f(A) z ≈ P Σ_i w_i f(θ_i)``, exact for polynomials of degree ``< 2m``.
The density is ``φ(t) = mean over probes of P Σ_i w_i 𝒩(t; θ_i, σ²)``, which integrates to ``P``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..distributed import require_seed_for
from ..limits import PROBE_CHUNK


@dataclass
class TraceEstimate:
    """A stochastic estimate with its standard error (sample standard deviation / √n_probes)."""

    value: float
    stderr: float
    n_probes: int


def _rademacher(n: int, m: int, generator, dtype, device) -> Tensor:
    return torch.randint(0, 2, (n, m), generator=generator, device=device).to(dtype).mul_(2).sub_(1)


def _estimate(samples: Tensor) -> TraceEstimate:
    n = samples.numel()
    stderr = float(samples.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.inf
    return TraceEstimate(float(samples.mean()), stderr, n)


def _generator(op, seed):
    require_seed_for(op, seed)
    return torch.Generator(op.device).manual_seed(seed) if seed is not None else None


def hutchinson_trace(op, n_probes: int = 100, seed: int | None = None, chunk: int = PROBE_CHUNK) -> TraceEstimate:
    """``tr(A) ≈ mean zᵀ A z`` over Rademacher probes, ``chunk`` probes per product."""
    if n_probes < 1:
        raise ValueError(f"n_probes must be ≥ 1, got {n_probes}")
    generator, n = _generator(op, seed), op.shape[0]
    samples = []
    for start in range(0, n_probes, chunk):
        z = _rademacher(n, min(chunk, n_probes - start), generator, op.dtype, op.device)
        samples.append((z * (op @ z)).sum(0))
    return _estimate(torch.cat(samples))


@dataclass
class SLQDensity:
    """Spectral density on ``grid`` (``log10`` of the eigenvalue when ``log``), with the quadrature behind it.

    ``nodes`` and ``weights`` are ``(n_probes, m)``; a probe whose Krylov space closed early has weight 0 on
    its unused nodes. ``nonpositive_weight`` (log scale only) is the expected number of eigenvalues ≤ 0,
    which the log axis cannot show.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    num_params: int
    sigma: float
    log: bool
    nonpositive_weight: float = 0.0

    def moment(self, power: int) -> TraceEstimate:
        """``tr(A^power)`` estimated from the quadrature (exact per probe for ``power < 2m``)."""
        per_probe = self.num_params * (self.weights * self.nodes**power).sum(1)
        return _estimate(per_probe)


def _tridiagonal_probes(op, probes: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
    """Lanczos on every probe column at once; returns nodes and weights ``(n_probes, n_iter)``."""
    n, n_probes = probes.shape
    dtype = probes.dtype
    basis = torch.zeros(n_probes, n_iter, n, dtype=dtype, device=probes.device)
    alpha = torch.zeros(n_probes, n_iter, dtype=dtype, device=probes.device)
    beta = torch.zeros(n_probes, n_iter, dtype=dtype, device=probes.device)
    active = torch.ones(n_probes, dtype=torch.bool, device=probes.device)
    q = (probes / probes.norm(dim=0)).T  # (n_probes, n)
    length = torch.full((n_probes,), n_iter, device=probes.device)
    for j in range(n_iter):
        basis[:, j] = q
        w = (op @ q.T).T
        alpha[:, j] = (q * w).sum(1)
        for _ in range(2):  # full reorthogonalization against this probe's basis
            w = w - torch.einsum("pj,pjn->pn", torch.einsum("pjn,pn->pj", basis[:, : j + 1], w), basis[:, : j + 1])
        if j == n_iter - 1:
            break
        norm = w.norm(dim=1)
        closed = active & (norm <= 1e3 * torch.finfo(dtype).eps * alpha[:, : j + 1].abs().amax(1).clamp_min(1e-300))
        length[closed] = j + 1
        active &= ~closed
        beta[:, j] = torch.where(active, norm, torch.zeros_like(norm))
        q = torch.where(active[:, None], w / norm.clamp_min(torch.finfo(dtype).tiny)[:, None], torch.zeros_like(w))
    nodes = torch.zeros(n_probes, n_iter, dtype=dtype, device=probes.device)
    weights = torch.zeros_like(nodes)
    for p in range(n_probes):
        m = int(length[p])
        t = torch.diag(alpha[p, :m]) + torch.diag(beta[p, : m - 1], 1) + torch.diag(beta[p, : m - 1], -1)
        theta, y = torch.linalg.eigh(t)
        nodes[p, :m], weights[p, :m] = theta, y[0] ** 2
    return nodes, weights


def slq_density(
    op,
    n_probes: int = 10,
    n_iter: int = 80,
    bins: int = 400,
    grid: Tensor | None = None,
    sigma: float | None = None,
    log: bool = False,
    seed: int | None = None,
) -> SLQDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``n_iter`` Lanczos steps per probe (at most ``P``); ``grid`` (or ``bins`` points spanning the nodes
    ±5σ); ``sigma`` is the Gaussian broadening in the grid's variable (default: 1/100 of the node span).
    Memory: ``n_probes · n_iter · P`` numbers for the reorthogonalization.
    """
    n = op.shape[0]
    if n_probes < 1 or n_iter < 1:
        raise ValueError("n_probes and n_iter must be ≥ 1")
    n_iter = min(n_iter, n)
    probes = _rademacher(n, n_probes, _generator(op, seed), op.dtype, op.device)
    nodes, weights = _tridiagonal_probes(op, probes, n_iter)
    used = weights > 0
    nonpositive = 0.0
    if log:
        positive = used & (nodes > 0)
        nonpositive = float(n * (weights * (used & ~positive)).sum(1).mean())
        centers, mass = nodes.clamp_min(torch.finfo(nodes.dtype).tiny).log10(), weights * positive
    else:
        centers, mass = nodes, weights * used
    present = centers[mass > 0]
    span = float(present.max() - present.min()) if present.numel() else 1.0
    if sigma is None:
        sigma = span / 100 if span > 0 else max(1e-3 * float(present.abs().max()) if present.numel() else 1.0, 1e-12)
    if grid is None:
        lo, hi = (float(present.min()), float(present.max())) if present.numel() else (0.0, 1.0)
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, bins, dtype=nodes.dtype, device=nodes.device)
    gauss = torch.exp(-0.5 * ((grid[:, None, None] - centers[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = n * (gauss * mass[None]).sum(2).mean(1)
    return SLQDensity(grid, density, nodes, weights, n, sigma, log, nonpositive)
