"""Local Hessians of back-matching losses (Zhang, Chen & Liu, NeurIPS 2018; docs/local_hessians.md).

After a forward pass, block ``k`` (here: one Kronecker layer with vector inputs — ``Linear``, convolutions,
``transformers``' ``Conv1D``, the in-projection of self-attention — ``z_k = W z_{k−1} + b``) has the
back-matching loss ``ℓ_k(W, z) = ½ mean_n ‖F_k(W, z_n) − z_k,n^b‖²`` with target ``z^b = z − ∂L/∂z``; one unit
gradient step on ``ℓ_k`` reproduces back-propagation. Its local Hessians (mean over the ``R`` rows — samples ×
positions — so that ``A`` is exactly ``compute_kfac``'s input factor):

* in the weights, row-major ``[W b]``: ``∇²_W ℓ = D ⊗ A`` with ``A = mean ā āᵀ``; ``D = I`` for a plain block
  and ``D = diag(γ²/(σ² + ε))`` when the layer feeds a BatchNorm in eval mode (``σ²`` its running variance);
* in the block input: ``∇²_z ℓ = Wᵀ D W`` (per row), and for a residual block ``z + W z``:
  ``(I + W)ᵀ D (I + W)``.

Eigenvalues of ``D ⊗ A`` are the products ``d_j λ_i``, so its condition number is ``cond(D)·cond(A)``. A grouped
convolution is block-diagonal over its groups: the products, the input Hessians and their eigenvalues are taken per
group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data import Data
from ..factors.driver import input_second_moments
from ..layers import kronecker_kind
from ..model_state import is_batch_norm


def condition_number(eigenvalues: Tensor) -> float:
    """``λ_max / λ_min`` of non-negative eigenvalues; ``inf`` when ``λ_min`` is at round-off level
    (``≤ n·ε·λ_max``: numerically singular)."""
    values = eigenvalues.detach().double()
    low, high = float(values.min()), float(values.max())
    if high <= 0 or low <= len(values) * torch.finfo(torch.float64).eps * high:
        return math.inf
    return high / low


@dataclass
class BackMatchingHessian:
    """Spectra of one block's local Hessians (module docstring); eigenvalues descending."""

    layer: str
    a_eigenvalues: Tensor  # of A, (width,) — (groups, width) per group; the weight Hessian has the products d_j λ_i
    output_scale: Tensor  # diagonal of D, (groups·d_out,)
    input_eigenvalues: Tensor  # of Wᵀ D W, or (I + W)ᵀ D (I + W) for a residual block (all groups), descending
    residual: bool

    @property
    def weight_condition(self) -> float:
        if self.a_eigenvalues.dim() == 1:
            return condition_number(self.output_scale) * condition_number(self.a_eigenvalues)
        return condition_number(self.weight_eigenvalues())

    @property
    def input_condition(self) -> float:
        return condition_number(self.input_eigenvalues)

    def weight_eigenvalues(self) -> Tensor:
        """All eigenvalues of ``D ⊗ A``, descending (``groups·d_out·width`` numbers)."""
        a = self.a_eigenvalues if self.a_eigenvalues.dim() == 2 else self.a_eigenvalues.unsqueeze(0)
        d = self.output_scale.reshape(len(a), -1)
        return (d.unsqueeze(2) * a.unsqueeze(1)).flatten().sort(descending=True).values

    def to_dict(self) -> dict:
        return {"layer": self.layer, "residual": self.residual, "weight_condition": self.weight_condition,
                "input_condition": self.input_condition, "a_condition": condition_number(self.a_eigenvalues),
                "output_scale_condition": condition_number(self.output_scale)}


def back_matching_hessians(
    model: nn.Module,
    data: Data,
    layers: list[str] | None = None,
    residual: tuple[str, ...] | list[str] = (),
    batch_norm: dict[str, str] | None = None,
) -> dict[str, BackMatchingHessian]:
    """Local Hessians of every selected layer's back-matching loss at the current weights.

    Args:
        residual: layers whose block is ``z + W z`` (square weight): input Hessian ``(I + W)ᵀ D (I + W)``.
        batch_norm: layer name → name of the ``BatchNorm`` module right after it; its ``γ²/(running_var + ε)``
            becomes ``D`` (the normalization's batch statistics are treated as constants, as in eval mode).
    """
    modules = dict(model.named_modules())
    batch_norm = batch_norm or {}
    moments = input_second_moments(model, data, layers, dtype=torch.float64)
    for name in list(residual) + list(batch_norm):
        if name not in moments:
            raise ValueError(f"{name!r} is not one of the analysed layers {list(moments)}")
    out = {}
    for name, A in moments.items():
        module = modules[name]
        W = kronecker_kind(module).weight_matrices(module).double()  # (groups, d_out, d_in)
        groups, d_out, d_in = W.shape
        scale = torch.ones(groups * d_out, dtype=torch.float64, device=W.device)
        if name in batch_norm:
            bn = modules.get(batch_norm[name])
            if not is_batch_norm(bn) or bn.running_var is None or bn.num_features != groups * d_out:
                raise ValueError(f"batch_norm[{name!r}] = {batch_norm[name]!r} is not a BatchNorm with running "
                                 f"statistics over the layer's {groups * d_out} outputs")
            gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(scale)
            scale = gamma**2 / (bn.running_var.double() + bn.eps)
        if name in residual:
            if d_out != d_in or groups != 1:
                raise ValueError(f"residual layer {name!r} must be square, its weight is {d_out}×{d_in}"
                                 + (f" in {groups} groups" if groups != 1 else ""))
            W = W + torch.eye(d_in, dtype=W.dtype, device=W.device)
        input_hessian = W.transpose(1, 2) @ (scale.reshape(groups, d_out, 1) * W)
        a_values = torch.linalg.eigvalsh(A.double()).flip(-1).clamp_min(0)
        out[name] = BackMatchingHessian(
            layer=name,
            a_eigenvalues=a_values,
            output_scale=scale,
            input_eigenvalues=torch.linalg.eigvalsh(input_hessian).flatten().sort(descending=True).values.clamp_min(0),
            residual=name in residual,
        )
    return out
