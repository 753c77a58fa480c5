"""Supported losses: validation, reduction bookkeeping and the loss-Hessian pieces.

Conventions (stated once here and in ``docs/conventions.md``):

* A loss is a sum of *terms*. ``CrossEntropyLoss`` has one term per position (output ``(N, C)`` or
  ``(N, C, *)``, class axis 1); ``MSELoss`` and ``BCEWithLogitsLoss`` have one term per output element.
* For every loss, axis 1 is the *feature axis* (classes, channels), as in ``CrossEntropyLoss`` and the
  ``(N, C, *)`` outputs of convolutions; the other axes are positions. The Gauss-Newton columns are
  indexed by the feature axis and applied at all positions at once; where a sum meets several output
  positions (a layer location feeding several of them, or ``approx="reduce"``) this adds cross-position
  terms that the block-diagonal loss Hessian does not have (docs/conventions.md §3). A sequence model should
  present its outputs as ``(N, C, T)`` (a 1-D output ``(N,)`` is read as ``(N, 1)``).
* ``summed_loss`` is the sum over the *counted* terms of a batch. The objective over the data set is that sum
  over all batches ("sum") or divided by the total number of counted terms ``Z = N·τ`` ("mean"), ``τ = Z/N`` the
  counted terms per sample. This is exactly what the ``loss_fn`` computes on the whole data set, so per-batch means
  recombine correctly with an uneven last batch.
* Cross-entropy targets equal to ``ignore_index`` (transformers' ``-100``) are not counted: their terms are absent
  from the loss, so every output column (Hessian square root, Monte-Carlo label, gradient) is zero there, and ``τ``
  is then the *mean* number of counted positions per sample, not necessarily an integer. The per-sample loss of
  the empirical Fisher is ``ℓ_n = (1/τ) Σ_{counted t of n} ℓ_{n,t}``, so that ``L = (1/N) Σ_n ℓ_n`` under "mean".
* Every gradient, Hessian square root and Hessian-vector product below is that of the *summed* loss
  with respect to the model output ``f``; reduction scaling is applied by the callers once ``N`` is known.

Loss Hessians per term (``Λ``) and square roots ``S`` with ``S Sᵀ = Λ``:

* cross-entropy, ``p = softmax(f)``: ``Λ = diag(p) − p pᵀ``, ``S = (diag(√p) − p √pᵀ) Q`` with ``Q`` an
  orthonormal basis of the complement of ``√p`` (``C − 1`` columns, as ``Λ`` has rank ``C − 1``);
* squared error ``(f − y)²`` per element: ``Λ = 2``, ``S = √2``;
* binary cross-entropy with logits: ``Λ = σ(1 − σ)``, ``S = √(σ(1 − σ))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossName = Literal["cross_entropy", "mse", "bce_with_logits"]
Reduction = Literal["mean", "sum"]

SUPPORTED_LOSSES = "nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss"


@dataclass(frozen=True)
class LossSpec:
    """A validated loss: which one, and how it reduces over terms."""

    name: LossName
    reduction: Reduction
    ignore_index: int = -100

    def scale(self, n_samples: int, terms_per_sample: float) -> float:
        """Factor that turns a sum over all counted terms of the data set into the objective: ``1/(N τ)`` under
        "mean", ``τ`` the counted terms per sample (``counted_terms`` summed over the data, divided by ``N``)."""
        if n_samples * terms_per_sample == 0:
            raise ValueError(f"the data has no counted loss term: every target equals ignore_index={self.ignore_index}"
                             " (or the data is empty); the objective is undefined — give data with a counted target")
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (n_samples * terms_per_sample)


def loss_spec(loss_fn: nn.Module) -> LossSpec:
    """Validate ``loss_fn`` and describe it; anything unsupported raises a clear error."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None:
            raise ValueError("CrossEntropyLoss(weight=...) is not supported: class weights change the loss Hessian")
        if loss_fn.label_smoothing != 0.0:
            raise ValueError("CrossEntropyLoss(label_smoothing>0) is not supported")
        name: LossName = "cross_entropy"
    elif isinstance(loss_fn, nn.MSELoss):
        name = "mse"
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError("BCEWithLogitsLoss(weight=..., pos_weight=...) is not supported")
        name = "bce_with_logits"
    else:
        raise TypeError(
            f"unsupported loss {type(loss_fn).__name__}: kfac_hessian supports {SUPPORTED_LOSSES} "
            "(each needs a known loss Hessian and its square root)"
        )
    if loss_fn.reduction not in ("mean", "sum"):
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={loss_fn.reduction!r}) is not supported: use 'mean' or 'sum', "
            "the objective whose Hessian is approximated must be a scalar"
        )
    return LossSpec(name, loss_fn.reduction, getattr(loss_fn, "ignore_index", -100))


def check_batch(spec: LossSpec, output: Tensor, target: Tensor) -> None:
    """Raise ``ValueError`` when the target does not fit the output for this loss."""
    if output.dim() < 1 or output.shape[0] == 0:
        raise ValueError(f"model output has shape {tuple(output.shape)}: expected a non-empty batch axis first")
    if spec.name == "cross_entropy":
        if output.dim() < 2:
            raise ValueError(f"CrossEntropyLoss needs an output (N, C) or (N, C, *), got {tuple(output.shape)}")
        expected = (output.shape[0], *output.shape[2:])
        if target.is_floating_point() or target.is_complex():
            raise ValueError(
                "CrossEntropyLoss targets must be class indices (integer tensor of shape "
                f"{expected}); probability targets are not supported"
            )
        if tuple(target.shape) != expected:
            hint = ""
            if output.dim() == 3 and tuple(target.shape) == tuple(output.shape[:2]):
                hint = ("; the output looks like (N, T, C) with the classes last, but CrossEntropyLoss takes them on "
                        "axis 1: pass output=kfac_hessian.sequence_logits (logits.transpose(1, 2))")
            raise ValueError(f"CrossEntropyLoss targets have shape {tuple(target.shape)}, expected {expected} for an "
                             f"output of shape {tuple(output.shape)}{hint}")
        counted = target[target != spec.ignore_index]
        if target.numel() and not counted.numel():
            raise ValueError(f"a batch has no counted target (every target equals ignore_index={spec.ignore_index}), "
                             "so its mean loss is undefined: leave such batches out of the data")
        if counted.numel() and (counted.min() < 0 or counted.max() >= output.shape[1]):
            raise ValueError(f"class indices must lie in [0, {output.shape[1]}) or equal ignore_index="
                             f"{spec.ignore_index}, got [{int(counted.min())}, {int(counted.max())}]")
    else:
        name = "MSELoss" if spec.name == "mse" else "BCEWithLogitsLoss"
        if tuple(target.shape) != tuple(output.shape):
            raise ValueError(
                f"{name} targets have shape {tuple(target.shape)} but the output has shape {tuple(output.shape)}; "
                "they must match exactly (no broadcasting)"
            )
        if not target.is_floating_point():
            raise ValueError(f"{name} targets must be floating point, got {target.dtype}")


def terms_per_sample(spec: LossSpec, output: Tensor) -> int:
    """τ: positions per sample for cross-entropy, elements per sample otherwise."""
    if spec.name == "cross_entropy":
        return math.prod(output.shape[2:])
    return math.prod(output.shape[1:])


def counted_terms(spec: LossSpec, output: Tensor, target: Tensor) -> int:
    """The loss terms of one batch that count: ``N·τ`` positions or elements, less the ignored cross-entropy targets."""
    if spec.name == "cross_entropy":
        return int((target != spec.ignore_index).sum())
    return output.numel()


def counted_mask(spec: LossSpec, target: Tensor | None, class_axis: int) -> Tensor | None:
    """``1`` where a cross-entropy target counts and ``0`` where it equals ``ignore_index``, with a size-1 class axis
    at ``class_axis`` (broadcasts over a column's classes); ``None`` when every term counts."""
    if spec.name != "cross_entropy" or target is None or not (target == spec.ignore_index).any():
        return None
    return (target != spec.ignore_index).unsqueeze(class_axis)


def summed_loss(spec: LossSpec, output: Tensor, target: Tensor) -> Tensor:
    """Sum of the counted loss terms of one batch."""
    if spec.name == "cross_entropy":
        return F.cross_entropy(output, target, reduction="sum", ignore_index=spec.ignore_index)
    if spec.name == "mse":
        return F.mse_loss(output, target, reduction="sum")
    return F.binary_cross_entropy_with_logits(output, target, reduction="sum")


def output_gradient(spec: LossSpec, output: Tensor, target: Tensor, leading: int = 0) -> Tensor:
    """∂(summed loss)/∂f in closed form (zero at ignored targets); ``output`` and ``target`` may carry ``leading``
    extra axes in front."""
    if spec.name == "cross_entropy":
        class_axis = 1 + leading
        mask = counted_mask(spec, target, class_axis)
        if mask is None:
            return _cross_entropy_gradient(output, target, class_axis)
        return _cross_entropy_gradient(output, target.masked_fill(target == spec.ignore_index, 0), class_axis) * mask
    if spec.name == "mse":
        return 2.0 * (output - target)
    return output.sigmoid() - target


def _cross_entropy_gradient(output: Tensor, labels: Tensor, class_axis: int) -> Tensor:
    """``softmax(f) − onehot(y)``, every label counted (``labels`` are class indices)."""
    one_hot = F.one_hot(labels, output.shape[class_axis]).movedim(-1, class_axis).to(output.dtype)
    return output.softmax(class_axis) - one_hot


def sample_output_gradients(spec: LossSpec, output: Tensor, n_samples: int,
                            generator: torch.Generator | None, target: Tensor | None = None) -> Tensor:
    """Monte-Carlo Fisher columns, shape ``(n_samples, *output.shape)``.

    Labels are drawn from the model's predictive distribution and the summed loss is differentiated
    at them; ``E[g gᵀ] = Λ`` per term (for squared error the Gaussian has variance 1/2, so that
    ``E[(2ε)(2ε)ᵀ] = 2 I``). Where ``target`` equals ``ignore_index`` the term is absent: its columns are zero
    (labels are drawn there too, so that the draws elsewhere do not depend on which targets are ignored).
    """
    out = output.detach()
    if spec.name == "cross_entropy":
        probs = out.softmax(1).movedim(1, -1).reshape(-1, out.shape[1])
        draws = torch.multinomial(probs, n_samples, replacement=True, generator=generator)  # (positions, m)
        targets = draws.T.reshape(n_samples, out.shape[0], *out.shape[2:])
        # a drawn label is a class, even one equal to ignore_index: only the true targets say what is ignored
        gradients = _cross_entropy_gradient(out.expand(n_samples, *out.shape), targets, 2)
        mask = counted_mask(spec, target, 1)
        return gradients if mask is None else gradients * mask
    elif spec.name == "mse":
        noise = torch.randn((n_samples, *out.shape), generator=generator, dtype=out.dtype, device=out.device)
        targets = out + noise * math.sqrt(0.5)
    else:
        probs = out.sigmoid().expand(n_samples, *out.shape)
        targets = torch.bernoulli(probs, generator=generator)
    return output_gradient(spec, out.expand(n_samples, *out.shape), targets, leading=1)


def hessian_sqrt_columns(spec: LossSpec, output: Tensor, target: Tensor | None = None) -> Tensor:
    """Columns of ``S`` (``S Sᵀ = Λ`` per term), shape ``(K, *output.shape)``.

    Column ``c`` holds, at every position at once, the ``c``-th column of that position's square root;
    ``K`` is the size of the feature axis (axis 1), less one for cross-entropy (rank ``C − 1``). All ``K`` at once
    are ``K²`` numbers per position: a large vocabulary takes them from ``HessianSqrt`` a chunk at a time. Zero where
    ``target`` equals ``ignore_index``.
    """
    root = HessianSqrt(spec, output, target)
    return root.columns(torch.arange(root.rank, device=output.device))


class HessianSqrt:
    """The loss-Hessian square root ``S`` of every term of one batch's output, applied without forming it.

    ``apply(c)`` is ``S c`` per term for coefficients ``c`` of shape ``(m, N, K, *)`` (``(m, *output.shape)`` for
    squared error and BCE, where ``K = C``): unit coefficients give columns of ``S`` (``columns``), random signs
    unbiased combinations of them. Memory and time are ``O(m · output.numel())``, never ``O(K · output.numel())``.

    Cross-entropy: ``S = (diag(√p) − p √pᵀ) Q``, ``Q`` the first ``C − 1`` columns of the Householder reflection
    ``I − 2 w wᵀ/‖w‖²``, ``w = √p + e_C``, which maps ``e_C`` to ``−√p`` (``S √p = 0``, so ``S Sᵀ = Λ``; ``‖w‖² ≥ 2``:
    no cancellation). Written out, ``S c = u − b Σ_k u_k`` with ``u = √p_{:C−1} ⊙ c`` (zero-padded to ``C``) and
    ``b = p + √p_C/(1 + √p_C) · (e_C − p)``. Where ``target`` equals ``ignore_index``, ``S = 0`` (no term there).
    """

    def __init__(self, spec: LossSpec, output: Tensor, target: Tensor | None = None):
        out = output.detach()
        self.spec, self.shape, self.dtype, self.device = spec, out.shape, out.dtype, out.device
        if spec.name == "cross_entropy":
            p = out.softmax(1)
            self.sqrt_p = p.sqrt()
            r = self.sqrt_p[:, -1:] / (1 + self.sqrt_p[:, -1:])
            self.b = p * (1 - r)  # p + r (e_C − p)
            self.b[:, -1:] += r
            mask = counted_mask(spec, target, 1)
            if mask is not None:  # u = √p ⊙ c vanishes at the ignored positions, and with it S c
                self.sqrt_p = self.sqrt_p * mask
            self.rank = p.shape[1] - 1
        else:
            self.root = torch.full_like(out, math.sqrt(2.0)) if spec.name == "mse" else (
                out.sigmoid() * (1 - out.sigmoid())).sqrt()
            self.rank = out.shape[1] if out.dim() > 1 else 1

    def apply(self, coefficients: Tensor) -> Tensor:
        """``S c`` per term (class docstring): ``(m, N, K, *)`` → ``(m, *output.shape)``."""
        if self.spec.name != "cross_entropy":
            return self.root * coefficients
        u = self.sqrt_p[:, :-1] * coefficients
        return F.pad(u.movedim(2, -1), (0, 1)).movedim(-1, 2) - self.b * u.sum(2, keepdim=True)

    def columns(self, indices: Tensor) -> Tensor:
        """Columns ``indices`` of ``S``, each at every position at once: ``(len(indices), *output.shape)``."""
        n, rest = self.shape[0], self.shape[2:]
        if len(self.shape) == 1:  # (N,): one column, the root itself
            return self.root.expand(len(indices), n).clone()
        unit = torch.zeros(len(indices), self.rank, dtype=self.dtype, device=indices.device)
        unit[torch.arange(len(indices), device=indices.device), indices] = 1
        return self.apply(unit.view(len(indices), 1, self.rank, *([1] * len(rest))).expand(-1, n, -1, *rest))


def hessian_vector_product(spec: LossSpec, output: Tensor, vectors: Tensor, target: Tensor | None = None) -> Tensor:
    """``Λ u`` for each ``u`` in ``vectors`` of shape ``(m, *output.shape)`` (per term, summed loss; zero where
    ``target`` equals ``ignore_index``)."""
    out = output.detach()
    if spec.name == "cross_entropy":
        mask = counted_mask(spec, target, 1)
        p = out.softmax(1) if mask is None else out.softmax(1) * mask
        pu = p * vectors
        return pu - p * pu.sum(dim=2, keepdim=True)
    if spec.name == "mse":
        return 2.0 * vectors
    s = out.sigmoid()
    return s * (1 - s) * vectors
