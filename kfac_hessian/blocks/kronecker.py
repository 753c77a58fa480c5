"""``G ⊗ A`` blocks and their spectra, never forming the product.

A ``KroneckerBlock`` holds, per group (one for every layer but grouped convolutions), ``A`` ``(width, width)`` —
or its diagonal ``(width,)`` (embeddings: token frequencies) — and ``G`` ``(d_out, d_out)``; in the Kronecker
order of ``layout`` the block is ``blockdiag_g(G_g ⊗ A_g)``. Shapes: ``A`` ``(width, width)`` or ``(width,)``,
``G`` ``(d_out, d_out)`` for one group; ``(groups, width, width)`` and ``(groups, d_out, d_out)`` otherwise.

With ``A_g = U_g diag(λ_g) U_gᵀ`` and ``G_g = V_g diag(μ_g) V_gᵀ``, the block has the ``P`` eigenvalues
``μ_{g,j} λ_{g,i}`` with eigenvectors ``v_{g,j} ⊗ u_{g,i}`` (the rank-one matrix ``v uᵀ`` in group ``g``'s weight).
The top-k products need only the pairs with ``i·j ≤ k`` in each group (1-based ranks in the descending lists);
``trace = Σ_g tr(A_g)·tr(G_g)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..layout import BlockLayout
from ..limits import DENSE_BLOCK_LIMIT, DENSITY_CHUNK
from ..spectra import ClampReport, SpectralDensity, entropy, histogram, symmetric_eig
from .base import BlockEigen, CurvatureBlock
from .row_factor import Factor, RowFactor, factor_left, factor_right


class KroneckerBlock(CurvatureBlock):
    """``G ⊗ A`` of one layer (module docstring); vectors and matrices exchanged with users in public order."""

    storage_tag = "kronecker"

    def __init__(self, A: Factor, G: Factor, layout: BlockLayout, name: str = ""):
        grouped = layout.groups > 1
        a_shapes = ([(layout.groups, layout.width, layout.width)] if grouped
                    else [(layout.width, layout.width), (layout.width,)])
        g_shape = (layout.groups, layout.d_out, layout.d_out) if grouped else (layout.d_out, layout.d_out)
        if grouped and (isinstance(A, RowFactor) or isinstance(G, RowFactor)):
            raise ValueError(f"row factors are for one group; {layout} has {layout.groups}: give dense factors")
        if tuple(A.shape) not in a_shapes or tuple(G.shape) != g_shape:
            raise ValueError(f"factor shapes {tuple(A.shape)}, {tuple(G.shape)} do not fit {layout}")
        self.a_factor, self.g_factor, self.layout, self.name = A, G, layout, name

    def __repr__(self) -> str:
        return (f"KroneckerBlock({self.name!r}, A={self.a_factor.shape}, G={self.g_factor.shape}, "
                f"P={self.num_params})")

    @property
    def A(self) -> Tensor:
        """``A`` as a tensor (``(width, width)``, its diagonal, or per group); a row factor is formed densely
        (``RowFactor.dense``: refused for widths above ``limits.DENSE_LIMIT``)."""
        return _dense(self.a_factor)

    @property
    def G(self) -> Tensor:
        """``G`` as a tensor (``(d_out, d_out)`` or per group); a row factor is formed densely (as ``A``)."""
        return _dense(self.g_factor)

    @property
    def row_factors(self) -> list[str]:
        """Which factors are kept as their rows (``"A"``, ``"G"``; ``blocks.row_factor``)."""
        return [which for which, f in (("A", self.a_factor), ("G", self.g_factor)) if isinstance(f, RowFactor)]

    @property
    def a_is_diagonal(self) -> bool:
        return isinstance(self.a_factor, Tensor) and self.a_factor.dim() == 1

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def reference(self) -> Factor:
        return self.g_factor

    def structure(self) -> str:
        layout = self.layout
        if self.a_is_diagonal:
            return f"Kronecker G ⊗ diag(A), A diagonal ({layout.width},), G {_described(self.g_factor)}"
        if layout.groups > 1:
            return (f"Kronecker per group, {layout.groups} groups × "
                    f"(G {(layout.d_out,) * 2} ⊗ A {(layout.width,) * 2}), cross-group terms dropped")
        return f"Kronecker G ⊗ A, A {_described(self.a_factor)}, G {_described(self.g_factor)}"

    def _grouped(self) -> tuple[Factor, Factor]:
        """``A`` as ``(B, w, w)`` (or ``(B, w)`` when diagonal) and ``G`` as ``(B, o, o)``; a row factor as it is
        (one group: its products broadcast over the group axis)."""
        if self.layout.groups > 1:
            return self.a_factor, self.g_factor
        return tuple(f if isinstance(f, RowFactor) else f.unsqueeze(0) for f in (self.a_factor, self.g_factor))

    def matmat(self, columns: Tensor) -> Tensor:
        a, g = self._grouped()
        matrices = factor_left(g, self.layout.to_matrices(columns.T))  # (m, B, o, w): G V̄ A per group
        matrices = matrices * a[:, None, :] if self.a_is_diagonal else factor_right(a, matrices)
        return self.layout.to_vectors(matrices).T

    def trace(self) -> Tensor:
        """``Σ_g tr(A_g)·tr(G_g)``."""
        a, g = self._grouped()
        return (_traces(a, self.a_is_diagonal) * _traces(g, False)).sum()

    def materialize(self) -> Tensor:
        a, g = (f.dense().unsqueeze(0) if isinstance(f, RowFactor) else f for f in self._grouped())
        if self.a_is_diagonal:
            a = torch.diag_embed(a)
        kron = torch.block_diag(*[torch.kron(g_b, a_b) for g_b, a_b in zip(g, a)])
        perm = self.layout.permutation(self.device)
        return kron[perm][:, perm]

    def moved(self, device: torch.device | str | None, dtype: torch.dtype | None) -> KroneckerBlock:
        return KroneckerBlock(self.a_factor.to(device, dtype), self.g_factor.to(device, dtype), self.layout,
                              self.name)

    def state(self) -> dict:
        layout = self.layout
        factors = {}
        for key, factor in (("A", self.a_factor), ("G", self.g_factor)):
            factors.update(factor.state(key) if isinstance(factor, RowFactor) else {key: factor})
        return {**factors,
                "layout": [layout.d_out, layout.d_in, int(layout.has_bias), layout.groups, int(layout.transposed)]}

    @classmethod
    def from_state(cls, state: dict, name: str) -> KroneckerBlock:
        d_out, d_in, has_bias, groups, transposed = state["layout"]
        return cls(RowFactor.from_state(state, "A"), RowFactor.from_state(state, "G"),
                   BlockLayout(d_out, d_in, bool(has_bias), groups, bool(transposed)), name)

    def eig_matrices(self, dtype: torch.dtype | None) -> list[Tensor]:
        """``A`` and ``G`` per group (``(B, d, d)``); a row factor by its rows' Gram matrix ``(1, r, r)``."""
        a, g = (f.gram(dtype).unsqueeze(0) if isinstance(f, RowFactor) else f.to(dtype) if dtype is not None else f
                for f in self._grouped())
        return [g] if self.a_is_diagonal else [a, g]

    def eigen_from(self, matrices: list[Tensor], decompositions: list[tuple], vectors: bool) -> KroneckerEigen:
        g_values, g_vectors, g_reports, g_forms = decompositions[-1]
        clamped = {"G": _worst(g_reports)}
        rows = {f"{which.lower()}_rows": f for which, f in (("A", self.a_factor), ("G", self.g_factor))
                if isinstance(f, RowFactor)}
        if self.a_is_diagonal:
            a = self.A.to(matrices[-1].dtype).unsqueeze(0)
            a_values, a_order = a.sort(dim=-1, descending=True)
            a_part = dict(a_values=a_values, a_order=a_order)
        else:
            a_values, a_vectors, a_reports, a_forms = decompositions[0]
            a_part = dict(A=matrices[0], a_values=a_values, a_vectors=a_vectors, a_forms=a_forms)
            clamped["A"] = _worst(a_reports)
        return KroneckerEigen(self.layout, G=matrices[-1], g_values=g_values, g_vectors=g_vectors, g_forms=g_forms,
                              clamped=clamped, **a_part, **rows)


def _dense(factor: Factor) -> Tensor:
    return factor.dense() if isinstance(factor, RowFactor) else factor


def _described(factor: Factor) -> str:
    return f"as {factor.describe()}" if isinstance(factor, RowFactor) else str(tuple(factor.shape))


def _traces(factor: Factor, diagonal: bool) -> Tensor:
    """Per group ``(B,)``: the traces of a factor (a diagonal one's sums)."""
    if isinstance(factor, RowFactor):
        return factor.trace().reshape(1)
    return factor.sum(-1) if diagonal else factor.diagonal(dim1=1, dim2=2).sum(-1)


def _worst(reports: list[ClampReport]) -> ClampReport:
    """One report for a factor's groups: all clamped eigenvalues, and the most negative of them."""
    return ClampReport(sum(r.count for r in reports), min((r.most_negative for r in reports), default=0.0))


class KroneckerPairs(NamedTuple):
    """Top eigenpairs of a Kronecker block as rank-one factors: eigenvector ``n`` reshaped to group ``groups[n]``'s
    augmented weight ``[W b]`` is ``outer(g_vectors[n], a_vectors[n])``."""

    values: Tensor  # (k,)
    g_vectors: Tensor  # (k, d_out)
    a_vectors: Tensor  # (k, width)
    groups: Tensor  # (k,)


class KroneckerEigen(BlockEigen):
    """Eigen-structure of a ``KroneckerBlock``: per group the factors' eigenvalues (always present, descending) and
    eigenvectors (computed on first use unless given; only the leading ones for ``topk`` when the eigenvalues came
    with a ``Tridiagonal`` form).

    ``a_values``/``g_values`` are ``(width,)``/``(d_out,)`` for one group and ``(groups, ·)`` otherwise; so are the
    eigenvector matrices ``a_vectors``/``g_vectors`` (columns). A diagonal ``A``'s eigenvectors are unit vectors
    (``a_order``).

    A factor kept as its rows (``a_rows``/``g_rows``, ``blocks.row_factor``) comes with its rows' Gram matrix as
    ``A``/``G`` and that matrix's decomposition as ``a_values``/``a_vectors``/``a_forms``: its ``w`` eigenvalues are
    the Gram matrix's padded with zeros, its leading eigenvectors the lifted Gram eigenvectors (only those asked for).
    """

    def __init__(self, layout: BlockLayout, *, a_values: Tensor, g_values: Tensor, A: Tensor | None = None,
                 G: Tensor | None = None, a_vectors: Tensor | None = None, g_vectors: Tensor | None = None,
                 a_order: Tensor | None = None, a_forms: list | None = None, g_forms: list | None = None,
                 clamped: dict[str, ClampReport] | None = None, a_rows: RowFactor | None = None,
                 g_rows: RowFactor | None = None):
        self.layout = layout
        self._A, self._G = A, G
        self._values = {"A": a_values, "G": g_values}
        self._vectors = {"A": a_vectors, "G": g_vectors}
        self._forms = {"A": a_forms, "G": g_forms}
        self._leading: dict[str, Tensor] = {}
        self._a_order = a_order
        self.clamped = clamped or {}
        self._rows = {"A": a_rows, "G": g_rows}
        self._gram: dict[str, list] = {}  # per row factor: [Gram values (r,), Gram vectors (r, ≥m) or None]
        for which, rows in self._rows.items():
            if rows is not None:
                vectors = self._vectors[which]
                self._gram[which] = [self._values[which][0], None if vectors is None else vectors[0]]
                self._values[which], self._vectors[which] = rows.padded_values(self._values[which]), None

    def _public(self, grouped: Tensor) -> Tensor:
        return grouped[0] if self.layout.groups == 1 else grouped

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def a_is_diagonal(self) -> bool:
        return self._a_order is not None

    @property
    def a_order(self) -> Tensor:
        """A diagonal ``A``'s eigenvectors are unit vectors: ``a_order[i]`` is the index of its ``i``-th largest
        entry."""
        if self._a_order is None:
            raise AttributeError("a_order exists for a diagonal A (embeddings) only")
        return self._public(self._a_order)

    @property
    def a_values(self) -> Tensor:
        """Eigenvalues of ``A``, descending."""
        return self._public(self._values["A"])

    @property
    def g_values(self) -> Tensor:
        """Eigenvalues of ``G``, descending."""
        return self._public(self._values["G"])

    @property
    def a_vectors(self) -> Tensor:
        """Eigenvectors of ``A`` as columns, matching ``a_values`` (all of them: a full ``eigh`` on first use)."""
        if self.a_is_diagonal:
            width = self.layout.width
            if width > DENSE_BLOCK_LIMIT:
                raise ValueError(f"A is diagonal: its {width} eigenvectors are unit vectors (a_order gives their "
                                 "indices); a dense matrix of them is refused")
            eye = torch.eye(width, dtype=self._values["A"].dtype, device=self._a_order.device)
            return self._public(eye[:, self._a_order[0]].unsqueeze(0))
        return self._public(self._all_vectors("A"))

    @property
    def g_vectors(self) -> Tensor:
        """Eigenvectors of ``G`` as columns, matching ``g_values`` (all of them: a full ``eigh`` on first use)."""
        return self._public(self._all_vectors("G"))

    def _all_vectors(self, which: str) -> Tensor:
        rows = self._rows[which]
        if rows is not None and self._vectors[which] is None:  # the whole basis: lifted vectors and the complement
            self._vectors[which] = self._row_vectors(which, rows.width)
        if self._vectors[which] is None:
            matrix = self._A if which == "A" else self._G
            values, vectors, reports = symmetric_eig(matrix, vectors=True)
            self._values[which], self._vectors[which] = values, vectors
            self.clamped[which] = _worst(reports)
        return self._vectors[which]

    def _leading_vectors(self, which: str, m: int) -> Tensor:
        """At least the ``m`` leading eigenvectors of ``A`` or ``G`` per group ``(B, d, ≥m)``: all of them when known
        (or when no ``Tridiagonal`` form was kept), else only the leading ones from the form; for a row factor the
        lifted leading vectors of its Gram matrix."""
        if self._rows[which] is not None and self._vectors[which] is None:
            if which not in self._leading or self._leading[which].shape[-1] < m:
                self._leading[which] = self._row_vectors(which, m)
            return self._leading[which]
        forms = self._forms[which]
        if self._vectors[which] is not None or not forms or forms[0] is None:
            return self._all_vectors(which)
        if which not in self._leading or self._leading[which].shape[-1] < m:
            device = self._values[which].device
            self._leading[which] = torch.stack([form.leading_vectors(m) for form in forms]).to(device)
        return self._leading[which]

    def _row_vectors(self, which: str, m: int) -> Tensor:
        """The ``m`` leading eigenvectors ``(1, w, m)`` of a row factor, from the leading ``min(m, r)`` eigenvectors
        of its Gram matrix (from the kept form, else one ``eigh`` of the ``r × r`` matrix, kept)."""
        rows, (values, vectors) = self._rows[which], self._gram[which]
        needed = min(m, rows.num_rows)
        if vectors is None or vectors.shape[-1] < needed:
            forms, gram = self._forms[which], self._A if which == "A" else self._G
            if forms and forms[0] is not None:
                vectors = forms[0].leading_vectors(needed).to(values.device)
            else:
                vectors = symmetric_eig(gram, vectors=True)[1][0]
            self._gram[which][1] = vectors
        return rows.vectors(values, vectors, m).unsqueeze(0)

    def factor_vectors(self, which: str, n: int) -> Tensor:
        """The ``n`` leading eigenvectors of ``"A"`` or ``"G"`` per group as columns ``(groups, d, n)`` (``n`` clamped
        to ``d``); for a diagonal ``A``, unit vectors."""
        d = self._values[which].shape[-1]
        n = min(n, d)
        if which == "A" and self.a_is_diagonal:
            unit = self._values["A"].new_zeros(self.layout.groups, d, n)
            unit.scatter_(1, self._a_order[:, None, :n], 1.0)
            return unit
        return self._leading_vectors(which, n)[..., :n]

    def _products(self) -> Tensor:
        """``(B, d_out, width)``: ``μ_{g,j} λ_{g,i}``."""
        g_values = self._values["G"]
        return g_values.unsqueeze(2) * self._values["A"].to(g_values.dtype).unsqueeze(1)

    @property
    def eigenvalues(self) -> Tensor:
        """All ``P`` eigenvalues ``μ_j λ_i``, descending."""
        return self._products().flatten().sort(descending=True).values

    def trace(self) -> Tensor:
        """``Σ_g tr(A_g)·tr(G_g)``."""
        return (self._values["A"].sum(-1) * self._values["G"].sum(-1)).sum()

    def effective_rank(self) -> float:
        """Exact from the factors: per group the products' distribution is the product of the factors', so its
        entropy is ``H(λ_g) + H(μ_g)``; across groups the mixture adds ``−Σ_g q_g log q_g``, ``q_g`` the trace
        shares."""
        traces = self._values["A"].double().sum(-1) * self._values["G"].double().sum(-1)
        total = float(traces.sum())
        if total <= 0:
            return 0.0
        shares = traces / total
        within = sum(float(q) * (entropy(a) + entropy(g))
                     for q, a, g in zip(shares, self._values["A"], self._values["G"]) if q > 0)
        return math.exp(entropy(traces) + within)

    def _top_index_pairs(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(values, group, j, i)`` of the ``k`` largest products (0-based ranks ``j`` in ``G``, ``i`` in ``A``)."""
        k = self._check_k(k)
        g_values, a_values = self._values["G"], self._values["A"]
        n_g, n_a = g_values.shape[-1], a_values.shape[-1]
        ii, jj = [], []
        for i in range(1, min(k, n_a) + 1):  # a product of 1-based ranks (i, j) in the top k satisfies i·j ≤ k
            j_max = min(k // i, n_g)
            ii.append(np.full(j_max, i - 1))
            jj.append(np.arange(j_max))
        device = g_values.device
        i_idx = torch.as_tensor(np.concatenate(ii), device=device)
        j_idx = torch.as_tensor(np.concatenate(jj), device=device)
        products = (g_values[:, j_idx] * a_values[:, i_idx].to(g_values.dtype)).flatten()  # (B·candidates)
        top = products.topk(k).indices
        top = top[products[top].argsort(descending=True, stable=True)]
        group, candidate = top // len(i_idx), top % len(i_idx)
        return products[top], group, j_idx[candidate], i_idx[candidate]

    def top_eigenvalues(self, k: int) -> Tensor:
        """The ``k`` largest eigenvalues, descending, from the ``i·j ≤ k`` candidate products (no eigenvectors)."""
        return self._top_index_pairs(k)[0]

    def top_pairs(self, k: int) -> KroneckerPairs:
        """Top-k eigenpairs as rank-one factors (``KroneckerPairs``; at most ``k``, as ``topk``)."""
        values, group, j_idx, i_idx = self._top_index_pairs(k)
        k = len(values)
        g_vectors = self._leading_vectors("G", int(j_idx.max()) + 1)[group, :, j_idx]
        if self.a_is_diagonal:
            a_vectors = values.new_zeros(k, self.layout.width)
            a_vectors[torch.arange(k, device=values.device), self._a_order[group, i_idx]] = 1
        else:
            a_vectors = self._leading_vectors("A", int(i_idx.max()) + 1)[group, :, i_idx].to(values.dtype)
        return KroneckerPairs(values, g_vectors, a_vectors, group)

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues (descending) and orthonormal eigenvectors ``(k, P)`` in public parameter order."""
        pairs = self.top_pairs(k)
        return pairs.values, self.layout.rank_one_vectors(pairs.g_vectors, pairs.a_vectors, pairs.groups)

    def density(self, bins: int = 100, log: bool = True, range: tuple[float, float] | None = None,
                chunk: int = DENSITY_CHUNK) -> SpectralDensity:
        g_values = self._values["G"]
        a_values = self._values["A"].to(g_values.dtype)
        pairs = [(a, g) for a, g in zip(a_values, g_values)]
        if log:
            pairs = [(a[a > 0].log10(), g[g > 0].log10()) for a, g in pairs]
            n_zero = self.num_params - sum(len(a) * len(g) for a, g in pairs)
            combine = torch.add
        else:
            n_zero, combine = 0, torch.mul
        pairs = [(a, g) for a, g in pairs if len(a) and len(g)]
        extent = None
        if pairs:
            corners = torch.cat([combine(torch.stack([g.min(), g.max()])[:, None],
                                         torch.stack([a.min(), a.max()])[None, :]).flatten()
                                 for a, g in pairs])
            extent = (float(corners.min()), float(corners.max()))

        def chunks():
            for a, g in pairs:
                rows, start = max(1, chunk // len(a)), 0
                while start < len(g):
                    yield combine(g[start : start + rows, None], a[None, :]).flatten()
                    start += rows

        return histogram(chunks, extent, n_zero, bins, log, range, g_values.device)
