"""Curvature blocks of normalization layers (BatchNorm1d/2d/3d, LayerNorm, GroupNorm with affine parameters).

Such a layer computes ``z = γ_f x̂ + β_f`` per feature ``f`` (channel for BatchNorm/GroupNorm, element of
``normalized_shape`` for LayerNorm) at ``T`` positions per sample, ``x̂`` the normalized input. ``γ`` and ``β``
do not enter the normalization statistics, so the Jacobian of the output in ``(γ_f, β_f)`` is exactly
``(x̂, 1)`` at every position — in train mode too. The library keeps, per feature, the **exact 2×2 block** of
the curvature in ``(γ_f, β_f)``:

    B_f = scale · Σ_{n, columns k} u_{nkf} u_{nkf}ᵀ,   u_{nkf} = (Σ_t g_{nkft} x̂_{nft}, Σ_t g_{nkft})

with ``g`` the output gradients of the same columns and the same ``scale`` as the Kronecker ``G`` factors
(so ``curvature="ggn"`` gives the exact GGN's 2×2 diagonal blocks). Blocks between different features are
dropped: the approximation is block-diagonal over features, exact within each block. Public order, as for
every layer: ``torch.cat([γ.flatten(), β.flatten()])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMALIZATION = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def is_normalization(module: nn.Module) -> bool:
    """An affine BatchNorm/LayerNorm/GroupNorm (with both ``weight`` and ``bias``)."""
    return isinstance(module, NORMALIZATION) and getattr(module, "weight", None) is not None and getattr(module, "bias", None) is not None


def normalized_rows(module: nn.Module, inputs: Tensor) -> Tensor:
    """``x̂`` as ``(N, T, F)`` rows, normalized as ``module`` does in its current mode (without the affine part)."""
    if isinstance(module, nn.LayerNorm):
        x_hat = F.layer_norm(inputs, module.normalized_shape, None, None, module.eps)
        return x_hat.reshape(inputs.shape[0], -1, module.weight.numel())
    if isinstance(module, nn.GroupNorm):
        x_hat = F.group_norm(inputs, module.num_groups, None, None, module.eps)
    else:
        use_batch = module.training or module.running_mean is None
        x_hat = F.batch_norm(inputs, None if use_batch else module.running_mean, None if use_batch else module.running_var,
                             None, None, True if use_batch else False, 0.0, module.eps)
    return _channel_rows(x_hat)


def gradient_rows(module: nn.Module, grads: Tensor) -> Tensor:
    """Output gradients ``(K, N, *z.shape[1:])`` as ``(K, N, T, F)`` rows."""
    k, n = grads.shape[:2]
    if isinstance(module, nn.LayerNorm):
        return grads.reshape(k, n, -1, module.weight.numel())
    return grads.reshape(k, n, grads.shape[2], -1).transpose(2, 3)


def _channel_rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)


class NormBlockSums:
    """Running ``Σ u uᵀ`` per feature, ``(F, 2, 2)``, of one normalization layer.

    Protocol shared with ``embedding.EmbeddingSums`` (used by ``compute_kfac``): ``add_inputs`` with the
    inputs of every call of a batch, ``gradient_rows`` and ``add_gradients`` per backpropagated chunk,
    ``state``/``set_state`` for the distributed sum, ``finalize``.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype, device: torch.device):
        self.module = module
        self.sums = torch.zeros(module.weight.numel(), 2, 2, dtype=dtype, device=device)
        self.calls = 0
        self._x_hat: Tensor | None = None

    @property
    def called(self) -> bool:
        return self.calls > 0

    def add_inputs(self, inputs: list[Tensor]) -> None:
        rows = [normalized_rows(self.module, x) for x in inputs]
        self._x_hat = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
        self.calls += len(inputs)

    def gradient_rows(self, grads: Tensor) -> Tensor:
        return gradient_rows(self.module, grads)

    def add_gradients(self, grad_rows: Tensor) -> None:
        """Gradient rows ``(K, N, T, F)`` of this batch's calls (matching ``add_inputs``)."""
        x_hat = self._x_hat
        u = torch.stack([(grad_rows * x_hat).sum(2), grad_rows.sum(2)], dim=-1).to(self.sums.dtype)  # (K, N, F, 2)
        self.sums += torch.einsum("knfa,knfb->fab", u, u)

    def state(self) -> list[Tensor]:
        return [self.sums]

    def set_state(self, tensors: list[Tensor]) -> None:
        (self.sums,) = tensors

    def finalize(self, scale: float, device, name: str) -> "NormFactor":
        return NormFactor(self.sums.mul_(scale).to(device), name)


class NormFactor:
    """Block-diagonal curvature of a normalization layer: one exact 2×2 block per feature (module docstring).

    Same interface as ``KroneckerFactor`` where it applies: ``num_params``, ``to_dense``, ``@``, ``trace``,
    ``eig`` (→ ``NormEigen`` with ``eigenvalues``, ``top_eigenvalues``, ``topk``, ``trace``).
    """

    def __init__(self, blocks: Tensor, name: str = ""):
        if blocks.dim() != 3 or blocks.shape[1:] != (2, 2):
            raise ValueError(f"expected blocks of shape (F, 2, 2), got {tuple(blocks.shape)}")
        self.blocks, self.name = blocks, name

    def __repr__(self) -> str:
        return f"NormFactor({self.name!r}, features={self.n_features}, P={self.num_params})"

    def describe(self) -> str:
        return f"normalization, {self.n_features} exact 2×2 (γ, β) blocks"

    @property
    def n_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def num_params(self) -> int:
        return 2 * self.n_features

    def to_dense(self) -> Tensor:
        """The ``(2F, 2F)`` matrix in public order (γ's, then β's): 2F² entries, fine for any norm layer."""
        f = self.n_features
        dense = self.blocks.new_zeros(2 * f, 2 * f)
        index = torch.arange(f, device=self.blocks.device)
        for a in range(2):
            for b in range(2):
                dense[a * f + index, b * f + index] = self.blocks[:, a, b]
        return dense

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.dim() not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(f"expected a vector (P,) or matrix (P, m) with P={self.num_params}, got {tuple(v.shape)}")
        pairs = v.reshape(2, self.n_features, -1).transpose(0, 1).to(self.blocks.dtype)  # (F, 2, m)
        return (self.blocks @ pairs).transpose(0, 1).reshape(v.shape)

    def trace(self) -> Tensor:
        return self.blocks.diagonal(dim1=1, dim2=2).sum()

    def eig(self, dtype: torch.dtype | None = None, vectors: bool = True) -> "NormEigen":
        values, vecs = torch.linalg.eigh(self.blocks.to(dtype or self.blocks.dtype))
        return NormEigen(values.clamp_min(0), vecs)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "NormFactor":
        return NormFactor(self.blocks.to(device, dtype), self.name)


class NormEigen:
    """Eigen-structure of a block-diagonal ``NormFactor``: two eigenpairs per feature."""

    def __init__(self, values: Tensor, vectors: Tensor):
        self.values, self.vectors = values, vectors  # (F, 2), (F, 2, 2) columns

    @property
    def num_params(self) -> int:
        return self.values.numel()

    def eigenvalues(self) -> Tensor:
        return self.values.flatten().sort(descending=True).values

    def top_eigenvalues(self, k: int) -> Tensor:
        return self.eigenvalues()[:k]

    def trace(self) -> Tensor:
        return self.values.sum()

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues and eigenvectors ``(k, 2F)`` in public order (γ's, then β's)."""
        if not 1 <= k <= self.num_params:
            raise ValueError(f"k={k} must lie in [1, {self.num_params}]")
        f = self.values.shape[0]
        order = self.values.flatten().argsort(descending=True)[:k]
        feature, which = order // 2, order % 2
        vecs = self.values.new_zeros(k, 2 * f)
        rows = torch.arange(k, device=vecs.device)
        vecs[rows, feature] = self.vectors[feature, 0, which]
        vecs[rows, f + feature] = self.vectors[feature, 1, which]
        return self.values.flatten()[order], vecs
