"""Curvature blocks of normalization layers (BatchNorm1d/2d/3d, LayerNorm, GroupNorm with affine parameters).

Such a layer computes ``z = γ_f x̂ + β_f`` per feature ``f`` (channel for BatchNorm/GroupNorm, element of
``normalized_shape`` for LayerNorm) at ``T`` positions per sample, ``x̂`` the normalized input. ``γ`` and ``β``
do not enter the normalization statistics, so the Jacobian of the output in ``(γ_f, β_f)`` is exactly
``(x̂, 1)`` at every position — in train mode too. With the per-sample, per-column vectors

    u_{nk} = (Σ_t g_{nkft} x̂_{nft})_f  ⊕  (Σ_t g_{nkft})_f        (length 2F, public order: γ's then β's)

(``g`` the output gradients of ``compute_kfac``'s columns) the layer's block is ``scale · Σ_{n,k} u u ᵀ`` — for
``curvature="ggn"`` the **exact GGN block**, no approximation, when the model has one output position per
sample or ``per_position=True`` (otherwise joint columns add cross-position terms, docs/conventions.md §3). It is kept dense while ``2F ≤ DENSE_NORM_LIMIT``
(4096: 16.8M entries); wider layers keep only the per-feature 2×2 diagonal blocks (exact within each block,
cross-feature terms dropped). Normalization layers feeding a pooled head couple their channels strongly, so
the dense block matters (docs/results/architectures.md measures both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spectra import eig_descending, symmetric_eig

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


DENSE_NORM_LIMIT = 4096  # largest 2F kept as a dense block; wider layers keep per-feature 2×2 blocks


class NormBlockSums:
    """Running ``Σ u uᵀ`` of one normalization layer: ``(2F, 2F)``, or ``(F, 2, 2)`` above ``DENSE_NORM_LIMIT``.

    Protocol shared with ``embedding.EmbeddingSums`` (used by ``compute_kfac``): ``add_inputs`` with the
    inputs of every call of a batch, ``gradient_rows`` and ``add_gradients`` per backpropagated chunk,
    ``state``/``set_state`` for the distributed sum, ``finalize``.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype, device: torch.device):
        self.module = module
        n_features = module.weight.numel()
        self.dense = 2 * n_features <= DENSE_NORM_LIMIT
        shape = (2 * n_features, 2 * n_features) if self.dense else (n_features, 2, 2)
        self.sums = torch.zeros(shape, dtype=dtype, device=device)
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
        u_gamma = (grad_rows * self._x_hat).sum(2).to(self.sums.dtype)  # (K, N, F)
        u_beta = grad_rows.sum(2).to(self.sums.dtype)
        if self.dense:
            u = torch.cat([u_gamma, u_beta], dim=-1).reshape(-1, self.sums.shape[0])
            self.sums.addmm_(u.T, u)
        else:
            u = torch.stack([u_gamma, u_beta], dim=-1)  # (K, N, F, 2)
            self.sums += torch.einsum("knfa,knfb->fab", u, u)

    def state(self) -> list[Tensor]:
        return [self.sums]

    def set_state(self, tensors: list[Tensor]) -> None:
        (self.sums,) = tensors

    def finalize(self, scale: float, device, name: str) -> "NormFactor":
        return NormFactor(self.sums.mul_(scale).to(device), name)


class NormFactor:
    """Curvature block of a normalization layer (module docstring): ``matrix`` is the dense ``(2F, 2F)`` block,
    or ``(F, 2, 2)`` per-feature blocks for layers above ``DENSE_NORM_LIMIT``.

    Same interface as ``KroneckerFactor`` where it applies: ``num_params``, ``to_dense``, ``@``, ``trace``,
    ``eig`` (→ ``NormEigen`` with ``eigenvalues``, ``top_eigenvalues``, ``topk``, ``trace``).
    """

    def __init__(self, matrix: Tensor, name: str = ""):
        dense = matrix.dim() == 2 and matrix.shape[0] == matrix.shape[1] and matrix.shape[0] % 2 == 0
        if not dense and not (matrix.dim() == 3 and matrix.shape[1:] == (2, 2)):
            raise ValueError(f"expected a (2F, 2F) matrix or (F, 2, 2) blocks, got {tuple(matrix.shape)}")
        self.matrix, self.name, self.dense = matrix, name, dense

    def __repr__(self) -> str:
        return f"NormFactor({self.name!r}, features={self.n_features}, dense={self.dense}, P={self.num_params})"

    def describe(self) -> str:
        if self.dense:
            return f"normalization, exact dense (γ, β) block of {self.n_features} features"
        return f"normalization, {self.n_features} exact 2×2 (γ, β) blocks (cross-feature terms dropped)"

    @property
    def n_features(self) -> int:
        return self.matrix.shape[0] // 2 if self.dense else self.matrix.shape[0]

    @property
    def num_params(self) -> int:
        return 2 * self.n_features

    def to_dense(self) -> Tensor:
        """The ``(2F, 2F)`` matrix in public order (γ's, then β's)."""
        if self.dense:
            return self.matrix
        f = self.n_features
        dense = self.matrix.new_zeros(2 * f, 2 * f)
        index = torch.arange(f, device=self.matrix.device)
        for a in range(2):
            for b in range(2):
                dense[a * f + index, b * f + index] = self.matrix[:, a, b]
        return dense

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.dim() not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(f"expected a vector (P,) or matrix (P, m) with P={self.num_params}, got {tuple(v.shape)}")
        if self.dense:
            return (self.matrix @ v.to(self.matrix.dtype).reshape(self.num_params, -1)).reshape(v.shape)
        pairs = v.reshape(2, self.n_features, -1).transpose(0, 1).to(self.matrix.dtype)  # (F, 2, m)
        return (self.matrix @ pairs).transpose(0, 1).reshape(v.shape)

    def trace(self) -> Tensor:
        return self.matrix.diagonal().sum() if self.dense else self.matrix.diagonal(dim1=1, dim2=2).sum()

    def eig(self, dtype: torch.dtype | None = None, vectors: bool = True) -> "NormEigen":
        matrix = self.matrix.to(dtype or self.matrix.dtype)
        if self.dense:
            values, vecs, _ = eig_descending(matrix)
            return NormEigen(values, vecs)
        # per-feature 2×2 eigenpairs, kept per feature: a (2F, 2F) eigenvector matrix is what wide layers avoid
        values, vecs, _ = symmetric_eig(matrix, vectors=True)  # (F, 2), (F, 2, 2)
        return NormEigen(values, vecs, per_feature=True)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "NormFactor":
        return NormFactor(self.matrix.to(device, dtype), self.name)


class NormEigen:
    """Eigenvalues (descending) and eigenvectors (public order) of a ``NormFactor``: the dense block's ``(2F, 2F)``
    eigenvector columns, or, for per-feature blocks (``per_feature=True``), each feature's 2×2 eigenpairs
    ``values (F, 2)``, ``vectors (F, 2, 2)`` — top-k vectors are scattered from them on demand."""

    def __init__(self, values: Tensor, vectors: Tensor, per_feature: bool = False):
        self.per_feature = per_feature
        self._feature_values, self.vectors = values, vectors
        flat = values.T.reshape(-1) if per_feature else values  # per feature: index which·F + f
        self._order = flat.argsort(descending=True) if per_feature else None
        self.values = flat[self._order] if per_feature else flat

    @property
    def num_params(self) -> int:
        return self.values.numel()

    def eigenvalues(self) -> Tensor:
        return self.values

    def top_eigenvalues(self, k: int) -> Tensor:
        return self.values[:k]

    def trace(self) -> Tensor:
        return self.values.sum()

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues and eigenvectors ``(k, 2F)`` in public order (γ's, then β's)."""
        if not 1 <= k <= self.num_params:
            raise ValueError(f"k={k} must lie in [1, {self.num_params}]")
        if not self.per_feature:
            return self.values[:k], self.vectors[:, :k].T
        f = self._feature_values.shape[0]
        which, feature = self._order[:k] // f, self._order[:k] % f
        vecs = self.values.new_zeros(k, 2 * f)
        rows = torch.arange(k, device=vecs.device)
        vecs[rows, feature] = self.vectors[feature, 0, which]
        vecs[rows, f + feature] = self.vectors[feature, 1, which]
        return self.values[:k], vecs
