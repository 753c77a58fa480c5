"""Embedding layers: Kronecker factors with a diagonal ``A`` (token frequencies).

``nn.Embedding`` computes ``z = weight[i]`` at every position: ``z = Wᵀ e_i`` with ``e_i`` the one-hot vector of
token ``i``. In the library's form ``z = W_eff ā`` (``W_eff = weightᵀ``, ``d_out = embedding_dim``,
``d_in = num_embeddings``) the factors are

* ``A = mean over rows of e_i e_iᵀ = diag(c) / R`` — ``c_v`` = how often token ``v`` occurs, ``R`` = rows
  (samples × positions); stored as its diagonal, never as a vocabulary × vocabulary matrix. Tokens equal to
  ``padding_idx`` count zero (PyTorch gives that row no gradient);
* ``G`` as for every layer (``compute_kfac``'s curvature and scale).

Embeddings always use ``approx="expand"``: the per-sample average of one-hot vectors that ``"reduce"`` would
take is not diagonal. Public order is ``weight.flatten()`` (token-major), so the block is ``diag(A) ⊗ G``:
row ``v`` of the weight has the ``dim × dim`` block ``A_vv·G``. Eigenvalues are ``A_vv·μ_j``, eigenvectors put
``v_j`` (an eigenvector of ``G``) in the row of token ``v``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layout import BlockLayout
from .spectra import KroneckerEigen, eig_descending


def embedding_reason(module: nn.Embedding) -> str | None:
    """Why an embedding cannot be factored (``None`` when it can)."""
    if module.max_norm is not None:
        return "Embedding with max_norm renormalizes its weight in the forward pass; not supported"
    return None


class EmbeddingSums:
    """Running token counts and ``Σ g gᵀ`` of one embedding layer (protocol of ``normalization.NormBlockSums``)."""

    def __init__(self, module: nn.Embedding, dtype: torch.dtype, device: torch.device):
        self.module = module
        self.counts = torch.zeros(module.num_embeddings, dtype=dtype, device=device)
        self.g_sum = torch.zeros(module.embedding_dim, module.embedding_dim, dtype=dtype, device=device)
        self.rows = torch.zeros((), dtype=dtype, device=device)

    @property
    def called(self) -> bool:
        return bool(self.rows > 0)

    def add_inputs(self, indices: list[Tensor]) -> None:
        for index in indices:
            flat = index.reshape(-1)
            self.counts += torch.bincount(flat, minlength=self.module.num_embeddings).to(self.counts.dtype)
            self.rows += flat.numel()

    def gradient_rows(self, grads: Tensor) -> Tensor:
        """Output gradients ``(K, N, *, dim)`` as ``(K, N, T, dim)`` rows."""
        return grads.reshape(grads.shape[0], grads.shape[1], -1, grads.shape[-1])

    def add_gradients(self, grad_rows: Tensor) -> None:
        rows = grad_rows.reshape(-1, grad_rows.shape[-1]).to(self.g_sum.dtype)
        self.g_sum.addmm_(rows.T, rows)

    def state(self) -> list[Tensor]:
        return [self.counts, self.g_sum, self.rows]

    def set_state(self, tensors: list[Tensor]) -> None:
        self.counts, self.g_sum, self.rows = tensors

    def finalize(self, scale: float, device, name: str) -> "EmbeddingFactor":
        counts = self.counts.clone()
        if self.module.padding_idx is not None:  # PyTorch gives the padding row no gradient
            counts[self.module.padding_idx] = 0
        return EmbeddingFactor((counts / self.rows).to(device), self.g_sum.mul_(scale).to(device), name)


class EmbeddingFactor:
    """``diag(A) ⊗ G`` of one embedding layer in public (token-major) order (module docstring)."""

    def __init__(self, a_diagonal: Tensor, G: Tensor, name: str = ""):
        if a_diagonal.dim() != 1 or G.dim() != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(f"expected a diagonal (V,) and a square G, got {tuple(a_diagonal.shape)}, {tuple(G.shape)}")
        self.a_diagonal, self.G, self.name = a_diagonal, G, name

    def __repr__(self) -> str:
        return f"EmbeddingFactor({self.name!r}, vocabulary={len(self.a_diagonal)}, dim={self.G.shape[0]}, P={self.num_params})"

    def describe(self) -> str:
        return f"embedding diag(A) ⊗ G, vocabulary {len(self.a_diagonal)} (diagonal A), G {tuple(self.G.shape)}"

    @property
    def num_params(self) -> int:
        return self.a_diagonal.numel() * self.G.shape[0]

    def to_dense(self, max_params: int = 20_000) -> Tensor:
        """The ``(P, P)`` matrix (token-major) — small vocabularies and tests only."""
        if self.num_params > max_params:
            raise ValueError(f"embedding {self.name!r} has P={self.num_params} parameters, above max_params={max_params}; "
                             "use `@`, `.eig()` or `.trace()`")
        return torch.kron(torch.diag(self.a_diagonal), self.G)

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.dim() not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(f"expected a vector (P,) or matrix (P, m) with P={self.num_params}, got {tuple(v.shape)}")
        rows = v.reshape(len(self.a_diagonal), self.G.shape[0], -1).to(self.G.dtype)  # (V, dim, m)
        out = self.a_diagonal[:, None, None] * torch.einsum("de,vem->vdm", self.G, rows)
        return out.reshape(v.shape)

    def trace(self) -> Tensor:
        return self.a_diagonal.sum() * torch.trace(self.G)

    def eig(self, dtype: torch.dtype | None = None, vectors: bool = True) -> "EmbeddingEigen":
        G = self.G.to(dtype or self.G.dtype)
        g_values, g_vectors, report = eig_descending(G)
        eigen = EmbeddingEigen(self.a_diagonal.to(G.dtype), G, g_values, g_vectors)
        eigen.clamped["G"] = report
        return eigen

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "EmbeddingFactor":
        return EmbeddingFactor(self.a_diagonal.to(device, dtype), self.G.to(device, dtype), self.name)


class EmbeddingEigen(KroneckerEigen):
    """``KroneckerEigen`` of ``diag(A) ⊗ G``: ``A``'s eigenvectors are the tokens themselves (never stored)."""

    def __init__(self, a_diagonal: Tensor, G: Tensor, g_values: Tensor, g_vectors: Tensor):
        a_values, self.token_order = a_diagonal.sort(descending=True)
        layout = BlockLayout(G.shape[0], len(a_diagonal), False)
        super().__init__(layout, None, G, a_values, g_values, None, g_vectors)

    @property
    def a_vectors(self) -> Tensor:
        raise AttributeError("an embedding's A is diagonal: its eigenvectors are the tokens (see token_order)")

    def top_pairs(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k as ``(values, g_vecs (k, dim), tokens (k,))``: eigenvector ``n`` is ``g_vecs[n]`` in weight row ``tokens[n]``."""
        values, j_idx, i_idx = self._top_index_pairs(k)
        return values, self.g_vectors[:, j_idx].T, self.token_order[i_idx]

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues and eigenvectors ``(k, P)`` in public (token-major) order."""
        values, g_vecs, tokens = self.top_pairs(k)
        dim = g_vecs.shape[1]
        vecs = g_vecs.new_zeros(k, self.num_params)
        columns = tokens[:, None] * dim + torch.arange(dim, device=tokens.device)
        vecs.scatter_(1, columns, g_vecs)
        return values, vecs
