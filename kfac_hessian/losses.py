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
* ``summed_loss`` is the sum over the terms of a batch. The objective over the data set is that sum
  over all batches ("sum") or divided by the total number of terms ``Z = N·τ`` ("mean"), ``τ`` = terms
  per sample. This is exactly what the ``loss_fn`` computes on the whole data set, so per-batch means
  recombine correctly with an uneven last batch.
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

    def scale(self, n_samples: int, terms_per_sample: int) -> float:
        """Factor that turns a sum over all terms of the data set into the objective."""
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
        if (target == spec.ignore_index).any():
            raise ValueError(f"targets equal to ignore_index={spec.ignore_index} are not supported")
        if target.numel() and (target.min() < 0 or target.max() >= output.shape[1]):
            raise ValueError(f"class indices must lie in [0, {output.shape[1]}), "
                             f"got [{int(target.min())}, {int(target.max())}]")
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


def summed_loss(spec: LossSpec, output: Tensor, target: Tensor) -> Tensor:
    """Sum of the loss terms of one batch."""
    if spec.name == "cross_entropy":
        return F.cross_entropy(output, target, reduction="sum")
    if spec.name == "mse":
        return F.mse_loss(output, target, reduction="sum")
    return F.binary_cross_entropy_with_logits(output, target, reduction="sum")


def output_gradient(spec: LossSpec, output: Tensor, target: Tensor, leading: int = 0) -> Tensor:
    """∂(summed loss)/∂f in closed form; ``output`` and ``target`` may carry ``leading`` extra axes in front."""
    if spec.name == "cross_entropy":
        class_axis = 1 + leading
        one_hot = F.one_hot(target, output.shape[class_axis]).movedim(-1, class_axis).to(output.dtype)
        return output.softmax(class_axis) - one_hot
    if spec.name == "mse":
        return 2.0 * (output - target)
    return output.sigmoid() - target


def sample_output_gradients(spec: LossSpec, output: Tensor, n_samples: int,
                            generator: torch.Generator | None) -> Tensor:
    """Monte-Carlo Fisher columns, shape ``(n_samples, *output.shape)``.

    Labels are drawn from the model's predictive distribution and the summed loss is differentiated
    at them; ``E[g gᵀ] = Λ`` per term (for squared error the Gaussian has variance 1/2, so that
    ``E[(2ε)(2ε)ᵀ] = 2 I``).
    """
    out = output.detach()
    if spec.name == "cross_entropy":
        probs = out.softmax(1).movedim(1, -1).reshape(-1, out.shape[1])
        draws = torch.multinomial(probs, n_samples, replacement=True, generator=generator)  # (positions, m)
        targets = draws.T.reshape(n_samples, out.shape[0], *out.shape[2:])
    elif spec.name == "mse":
        noise = torch.randn((n_samples, *out.shape), generator=generator, dtype=out.dtype, device=out.device)
        targets = out + noise * math.sqrt(0.5)
    else:
        probs = out.sigmoid().expand(n_samples, *out.shape)
        targets = torch.bernoulli(probs, generator=generator)
    return output_gradient(spec, out.expand(n_samples, *out.shape), targets, leading=1)


def hessian_sqrt_columns(spec: LossSpec, output: Tensor) -> Tensor:
    """Columns of ``S`` (``S Sᵀ = Λ`` per term), shape ``(K, *output.shape)``.

    Column ``c`` holds, at every position at once, the ``c``-th column of that position's square root;
    ``K`` is the size of the feature axis (axis 1), less one for cross-entropy (rank ``C − 1``).
    """
    out = output.detach()
    if spec.name == "cross_entropy":
        p = out.softmax(1).movedim(1, -1)  # (N, *, C)
        sqrt_p = p.sqrt()
        s = torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)  # (N, *, C_row, C_col)
        # S √p = 0, so S Q Qᵀ Sᵀ = Λ for any orthonormal basis Q of √p's complement: C − 1 columns suffice.
        # Q = the first C − 1 columns of the Householder reflection H = I − 2 w wᵀ/‖w‖², w = √p + e_C,
        # which maps e_C to −√p (‖w‖² ≥ 2: no cancellation).
        w = sqrt_p.clone()
        w[..., -1] += 1
        q = (torch.eye(p.shape[-1], dtype=out.dtype, device=out.device)[:, :-1]
             - 2 * w.unsqueeze(-1) * w[..., None, :-1] / w.pow(2).sum(-1)[..., None, None])
        s = s @ q  # (N, *, C_row, C − 1)
        return s.movedim(-1, 0).movedim(-1, 2).contiguous()  # (C − 1, N, C_row, *)
    root = math.sqrt(2.0) * torch.ones_like(out) if spec.name == "mse" else (out.sigmoid() * (1 - out.sigmoid())).sqrt()
    if out.dim() == 1:
        return root.unsqueeze(0)
    width = out.shape[1]
    eye = torch.eye(width, dtype=out.dtype, device=out.device).view(width, 1, width, *([1] * (out.dim() - 2)))
    return eye * root.unsqueeze(0)


def hessian_vector_product(spec: LossSpec, output: Tensor, vectors: Tensor) -> Tensor:
    """``Λ u`` for each ``u`` in ``vectors`` of shape ``(m, *output.shape)`` (per term, summed loss)."""
    out = output.detach()
    if spec.name == "cross_entropy":
        p = out.softmax(1)
        pu = p * vectors
        return pu - p * pu.sum(dim=2, keepdim=True)
    if spec.name == "mse":
        return 2.0 * vectors
    s = out.sigmoid()
    return s * (1 - s) * vectors
