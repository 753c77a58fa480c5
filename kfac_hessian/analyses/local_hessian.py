"""Local Hessians of back-matching losses (Zhang, Chen & Liu, NeurIPS 2018; docs/local_hessians.md).

After a forward pass, block ``k`` (here: one ``Linear``/``Conv`` layer, ``z_k = W z_{k−1} + b``) has the
back-matching loss ``ℓ_k(W, z) = ½ mean_n ‖F_k(W, z_n) − z_k,n^b‖²`` with target ``z^b = z − ∂L/∂z``; one unit
gradient step on ``ℓ_k`` reproduces back-propagation. Its local Hessians (mean over the ``R`` rows — samples ×
positions — so that ``A`` is exactly ``compute_kfac``'s input factor):

* in the weights, row-major ``[W b]``: ``∇²_W ℓ = D ⊗ A`` with ``A = mean ā āᵀ``; ``D = I`` for a plain block
  and ``D = diag(γ²/(σ² + ε))`` when the layer feeds a BatchNorm in eval mode (``σ²`` its running variance);
* in the block input: ``∇²_z ℓ = Wᵀ D W`` (per row), and for a residual block ``z + W z``:
  ``(I + W)ᵀ D (I + W)``.

Eigenvalues of ``D ⊗ A`` are the products ``d_j λ_i``, so its condition number is ``cond(D)·cond(A)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data import Data
from ..factors import input_second_moments
from ..layers import weight_matrix_shape


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
    a_eigenvalues: Tensor  # of A; the weight Hessian D ⊗ A has the products d_j λ_i
    output_scale: Tensor  # diagonal of D
    input_eigenvalues: Tensor  # of Wᵀ D W, or (I + W)ᵀ D (I + W) for a residual block
    residual: bool

    @property
    def weight_condition(self) -> float:
        return condition_number(self.output_scale) * condition_number(self.a_eigenvalues)

    @property
    def input_condition(self) -> float:
        return condition_number(self.input_eigenvalues)

    def weight_eigenvalues(self) -> Tensor:
        """All eigenvalues of ``D ⊗ A``, descending (``d_out·width`` numbers)."""
        return torch.outer(self.output_scale, self.a_eigenvalues).flatten().sort(descending=True).values

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
        d_out, d_in = weight_matrix_shape(module)
        W = module.weight.detach().double().reshape(d_out, d_in)
        scale = torch.ones(d_out, dtype=torch.float64, device=W.device)
        if name in batch_norm:
            bn = modules.get(batch_norm[name])
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None or bn.num_features != d_out:
                raise ValueError(f"batch_norm[{name!r}] = {batch_norm[name]!r} is not a BatchNorm with running "
                                 f"statistics over the layer's {d_out} outputs")
            gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(scale)
            scale = gamma**2 / (bn.running_var.double() + bn.eps)
        if name in residual:
            if d_out != d_in:
                raise ValueError(f"residual layer {name!r} must be square, its weight is {d_out}×{d_in}")
            W = W + torch.eye(d_in, dtype=W.dtype, device=W.device)
        input_hessian = W.T @ (scale[:, None] * W)
        out[name] = BackMatchingHessian(
            layer=name,
            a_eigenvalues=torch.linalg.eigvalsh(A).flip(0).clamp_min(0),
            output_scale=scale,
            input_eigenvalues=torch.linalg.eigvalsh(input_hessian).flip(0).clamp_min(0),
            residual=name in residual,
        )
    return out
