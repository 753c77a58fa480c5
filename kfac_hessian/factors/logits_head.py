"""The ggn ``G`` of a layer whose output is the logits of a ``CrossEntropyLoss``, analytic: no backward pass.

For such a layer (a language model's head, a classifier's last ``Linear``) the output Jacobian is the identity, so
its ggn factor is the reduction scale (``docs/conventions.md`` §4: ``1/(N τ)`` for ``"mean"``, ``1`` for ``"sum"``)
times the loss Hessians summed over every row (sample and position) of the logits:

    ``G = scale · Σ_rows (diag(p) − p pᵀ) = diag(d) − scale · PᵀP``,  ``d = scale · Σ_rows p``,

with ``p`` the softmax of a row and ``P`` ``(r, V)`` the rows' probabilities: a diagonal minus a term of rank
``≤ r``. As a whole ``G`` has rank ``V − 1`` for ``r ≥ 1`` (it is not low rank), but its products cost ``O(V·r)``
(``matmat``), so its top eigenpairs come from Lanczos on them (``topk``) and its density from SLQ
(``exact.slq_density``) — never from the dense ``V × V`` matrix (50 257² entries for GPT-2's vocabulary, 9.4 GB in
float32). It equals the ``G`` of ``compute_kfac(curvature="ggn")`` for such a layer with ``approx="expand"`` — every
column of the loss-Hessian square root backpropagated, with random position signs or per position alike, since the
Jacobian to the logits does not mix positions (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..exact.lanczos import LanczosResult, lanczos
from ..linear_operator import LinearOperator
from ..losses import loss_spec


class CrossEntropyHeadFactor(LinearOperator):
    """``G = diag(d) − scale · PᵀP`` ``(V, V)`` from the softmax rows ``probabilities`` ``(r, V)`` and the reduction
    ``scale`` (module docstring); a ``LinearOperator`` on the class axis."""

    def __init__(self, probabilities: Tensor, scale: float):
        if probabilities.dim() != 2:
            raise ValueError(f"probabilities must be rows (r, V), got shape {tuple(probabilities.shape)}")
        self.probabilities, self.scale = probabilities, float(scale)
        self.diagonal = probabilities.sum(0) * self.scale

    def __repr__(self) -> str:
        return f"CrossEntropyHeadFactor(V={self.num_params}, rows={self.num_rows})"

    @property
    def num_params(self) -> int:
        return self.probabilities.shape[1]

    @property
    def num_rows(self) -> int:
        return self.probabilities.shape[0]

    @property
    def reference(self) -> Tensor:
        return self.probabilities

    def structure(self) -> str:
        return (f"cross-entropy head G (analytic): diagonal minus a rank-≤{self.num_rows} term, {self.num_rows} rows "
                f"of {self.num_params} classes")

    def matmat(self, columns: Tensor) -> Tensor:
        """``d ⊙ X − scale · Pᵀ(P X)`` in ``O(V·r·m)`` for ``columns`` ``X`` ``(V, m)``."""
        return self.diagonal[:, None] * columns - self.probabilities.T @ (self.probabilities @ columns) * self.scale

    def trace(self) -> Tensor:
        """``Σ d − scale · ‖P‖_F²``."""
        return self.diagonal.sum() - self.probabilities.square().sum() * self.scale

    def materialize(self) -> Tensor:
        return torch.diag(self.diagonal) - self.probabilities.T @ self.probabilities * self.scale

    def topk(self, k: int, **lanczos_options) -> LanczosResult:
        """The ``k`` largest eigenpairs by Lanczos on the products (``exact.lanczos``: options as there; seeded with 0
        unless ``seed=`` is given), eigenvectors ``(k, V)`` — an iterative result: its ``residuals`` and
        ``converged`` say how close."""
        return lanczos(self, k, **{"seed": 0, **lanczos_options})


def cross_entropy_head_factor(logits: Tensor | Iterable[Tensor], loss_fn: nn.Module) -> CrossEntropyHeadFactor:
    """The analytic ggn ``G`` of the layer producing ``logits`` — one batch ``(N, C, *)`` (classes on axis 1, as
    ``CrossEntropyLoss`` takes them; language-model logits ``(N, T, V)`` as ``logits.transpose(1, 2)``) or an
    iterable of batches — for ``loss_fn`` a ``CrossEntropyLoss`` (module docstring). The logits may carry autograd
    history; it is not used."""
    spec = loss_spec(loss_fn)
    if spec.name != "cross_entropy":
        raise TypeError(f"the analytic head G is the cross-entropy's; {type(loss_fn).__name__} is not supported "
                        "(compute_kfac's ggn columns serve every supported loss)")
    batches = [logits] if isinstance(logits, Tensor) else list(logits)
    if not batches:
        raise ValueError("no logits given")
    rows, n_samples, positions = [], 0, None
    for batch in batches:
        if batch.dim() < 2 or not batch.is_floating_point():
            raise ValueError(f"logits must be a floating-point (N, C, *) tensor, got {tuple(batch.shape)} "
                             f"{batch.dtype}")
        tau = math.prod(batch.shape[2:])
        if positions not in (None, tau):
            raise ValueError(f"batches have {positions} and {tau} positions per sample: the reduction scale needs "
                             "one number of loss terms per sample")
        positions, n_samples = tau, n_samples + batch.shape[0]
        rows.append(batch.detach().movedim(1, -1).reshape(-1, batch.shape[1]).softmax(-1))
    return CrossEntropyHeadFactor(torch.cat(rows), spec.scale(n_samples, positions))
