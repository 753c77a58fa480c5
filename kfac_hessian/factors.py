"""Kronecker factors ``A`` and ``G`` of every selected layer, gathered in one streamed pass over the data.

For a layer ``z = W̄ ā`` the block of the objective's Hessian (augmented row-major order, see ``layout``) is
approximated by ``G ⊗ A`` with

* ``A = mean of ā āᵀ`` over samples (and, with ``approx="expand"``, over the shared locations);
* ``G = scale · Σ g gᵀ``, ``g`` the output gradients of the *summed* loss backpropagated from a set of
  columns at the model output: the loss-Hessian square-root columns (``curvature="ggn"``), labels sampled
  from the model (``"mc"``), or the true labels (``"empirical"``).

``scale`` makes ``G ⊗ A`` approximate the Hessian of exactly the objective ``loss_fn`` computes over the
whole data set (``N`` samples, ``τ`` loss terms per sample, ``m`` = ``mc_samples``):

=============  =======================  ==========
curvature      reduction="mean"          "sum"
=============  =======================  ==========
``ggn``        ``1/(N τ)``               ``1``
``mc``         ``1/(N τ m)``             ``1/m``
``empirical``  ``1/(N τ²)``              ``1``
=============  =======================  ==========

(the empirical Fisher uses the per-sample loss ``ℓ_n`` = ``loss_fn`` on sample ``n`` alone, whose gradient
is ``1/τ`` that of the summed loss under "mean"). Weight sharing (``T`` locations per sample):
``"expand"`` treats every location as a sample (``A`` averages over ``N·T`` rows, ``G`` sums over all of
them); ``"reduce"`` averages ``ā`` and sums ``g`` over the locations of each sample first. A layer called
several times in one forward pass contributes every call, as further locations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .capture import LayerCall, LayerRecorder, preserved_model_state
from .data import Data, iterate_batches
from .layers import input_rows, output_rows, select_layers, weight_matrix_shape
from .layout import BlockLayout
from .attention import attention_reason, decomposed_attention, projection_layers
from .embedding import EmbeddingFactor, EmbeddingSums, embedding_reason
from .normalization import NormBlockSums, NormFactor, is_normalization
from .patch_moments import patch_moments, patch_moments_elements, shift_moments_apply
from .losses import (
    LossSpec,
    check_batch,
    hessian_sqrt_columns,
    loss_spec,
    output_gradient,
    sample_output_gradients,
    terms_per_sample,
)
from . import distributed as _distributed
from .spectra import ClampReport, KroneckerEigen, symmetric_eig, symmetric_eigvals

Curvature = Literal["ggn", "mc", "empirical"]
Approx = Literal["expand", "reduce"]
DENSE_LIMIT = 20_000  # largest P for which ``to_dense`` builds a P×P matrix
SAVE_FORMAT = "kfac_hessian.KFAC/1"


class KroneckerFactor:
    """``G ⊗ A``: the Kronecker approximation of one layer's Hessian block.

    ``A`` is ``(width, width)`` with ``width = d_in + 1`` when the layer has a bias; ``G`` is
    ``(d_out, d_out)``. Vectors and matrices exchanged with users are in the order
    ``torch.cat([p.flatten() for p in module.parameters()])`` (weight, then bias).
    """

    def __init__(self, A: Tensor, G: Tensor, layout: BlockLayout, name: str = ""):
        if A.shape != (layout.width, layout.width) or G.shape != (layout.d_out, layout.d_out):
            raise ValueError(f"factor shapes {tuple(A.shape)}, {tuple(G.shape)} do not fit {layout}")
        self.A, self.G, self.layout, self.name = A, G, layout, name

    def __repr__(self) -> str:
        return f"KroneckerFactor({self.name!r}, A={tuple(self.A.shape)}, G={tuple(self.G.shape)}, P={self.num_params})"

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def to_dense(self, max_params: int = DENSE_LIMIT) -> Tensor:
        """The ``(P, P)`` matrix in public parameter order — for small layers and tests only."""
        if self.num_params > max_params:
            raise ValueError(
                f"layer {self.name!r} has P={self.num_params} parameters; a dense {self.num_params}² matrix is "
                f"refused above max_params={max_params}. Use `@` (matvec), `.eig()` or `.eig().density()` instead"
            )
        perm = self.layout.permutation(self.A.device)
        return torch.kron(self.G, self.A)[perm][:, perm]

    def __matmul__(self, v: Tensor | tuple[Tensor, ...] | list[Tensor]) -> Tensor | tuple[Tensor, ...]:
        """``(G ⊗ A) v`` as ``G V̄ A`` on the augmented weight matrix, never forming the product.

        ``v``: ``(P,)``, ``(P, m)``, or a tuple of tensors shaped like the module's parameters (returned alike).
        """
        if isinstance(v, (tuple, list)):
            flat = torch.cat([t.reshape(-1) for t in v])
            out = self @ flat
            pieces, start = [], 0
            for t in v:
                pieces.append(out[start : start + t.numel()].reshape(t.shape))
                start += t.numel()
            return tuple(pieces)
        if v.dim() not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(f"expected a vector (P,) or matrix (P, m) with P={self.num_params}, got {tuple(v.shape)}")
        columns = v.reshape(self.num_params, -1).T.to(self.A.dtype)
        product = self.G @ self.layout.to_matrices(columns) @ self.A
        out = self.layout.to_vectors(product).T
        return out.reshape(v.shape)

    def trace(self) -> Tensor:
        """``tr(A)·tr(G)``."""
        return torch.trace(self.A) * torch.trace(self.G)

    def frobenius_norm(self) -> Tensor:
        """``‖A‖_F·‖G‖_F``."""
        return torch.linalg.matrix_norm(self.A) * torch.linalg.matrix_norm(self.G)

    def eig(self, dtype: torch.dtype | None = None, vectors: bool = True) -> KroneckerEigen:
        """Eigendecomposition of both factors on their device (``dtype=torch.float64`` for more precision).

        ``vectors=False``: eigenvalues only; eigenvectors are computed when first needed — on the CPU only the
        leading ones ``topk``/``top_pairs`` ask for (from the kept tridiagonal form), all of them for
        ``a_vectors``/``g_vectors``.
        """
        return _eig_all({self.name: self}, dtype, vectors)[self.name]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "KroneckerFactor":
        return KroneckerFactor(self.A.to(device, dtype), self.G.to(device, dtype), self.layout, self.name)


def _decompose(matrices: dict, vectors: bool) -> dict:
    """Eigendecompose ``{key: matrix}``, one batched call per (size, device, dtype) group."""
    groups: dict[tuple, list] = {}
    for key, m in matrices.items():
        groups.setdefault((m.shape[0], m.device, m.dtype), []).append(key)
    results = {}
    for keys in groups.values():
        stacked = torch.stack([matrices[k] for k in keys])
        if vectors:
            values, vecs, reports = symmetric_eig(stacked, vectors=True)
            forms = [None] * len(keys)
        else:
            (values, reports, forms), vecs = symmetric_eigvals(stacked), None
        for n, key in enumerate(keys):
            results[key] = (values[n], None if vecs is None else vecs[n], reports[n], forms[n])
    return results


def _decompose_distributed(matrices: dict, vectors: bool) -> dict:
    """Each rank decomposes the factors assigned to it by cost (≈ d³) and broadcasts them, packed."""
    import torch.distributed as dist

    _distributed.require_process_group()
    keys = list(matrices)
    owners = _distributed.assign_by_cost([float(matrices[k].shape[0]) ** 3 for k in keys], dist.get_world_size())
    mine = _decompose({k: matrices[k] for k, o in zip(keys, owners) if o == dist.get_rank()}, vectors)
    results = {}
    for rank in range(dist.get_world_size()):
        owned = [k for k, o in zip(keys, owners) if o == rank]
        shapes, tensors = [], []
        for k in owned:
            d = matrices[k].shape[0]
            shapes += [(d,), (2,)] + ([(d, d)] if vectors else [])
            if rank == dist.get_rank():
                values, vecs, report, _ = mine[k]  # a Tridiagonal form stays with its rank
                tensors += [values, torch.tensor([report.count, report.most_negative])] + ([vecs] if vectors else [])
        like = matrices[owned[0]] if owned else next(iter(matrices.values()))
        received = iter(_distributed.broadcast_packed(rank, shapes, tensors, like))
        for k in owned:
            values, report = next(received), next(received)
            vecs = next(received) if vectors else None
            results[k] = (values, vecs, ClampReport(int(report[0]), float(report[1])), None)
    return results


def _eig_all(
    factors: Mapping[str, KroneckerFactor], dtype: torch.dtype | None, vectors: bool, distributed_eig: bool = False
) -> dict[str, KroneckerEigen]:
    """Eigendecompose all factors (batched per size; split over ranks with ``distributed_eig``)."""
    matrices = {}
    for name, f in factors.items():
        matrices[(name, "A")] = f.A if dtype is None else f.A.to(dtype)
        matrices[(name, "G")] = f.G if dtype is None else f.G.to(dtype)
    results = _decompose_distributed(matrices, vectors) if distributed_eig else _decompose(matrices, vectors)
    out = {}
    for name, f in factors.items():
        (a_val, a_vec, a_rep, a_form), (g_val, g_vec, g_rep, g_form) = results[(name, "A")], results[(name, "G")]
        out[name] = KroneckerEigen(f.layout, matrices[(name, "A")], matrices[(name, "G")], a_val, g_val, a_vec, g_vec,
                                   {"A": a_rep, "G": g_rep}, {"A": a_form, "G": g_form})
    return out


@dataclass
class KFAC(Mapping[str, KroneckerFactor]):
    """Kronecker factors of every selected layer, with how they were computed.

    A read-only mapping ``layer name → KroneckerFactor``; ``other_factors`` holds the layers whose block has
    another structure — normalization layers (``normalization.NormFactor``: per-feature 2×2 blocks) and
    embeddings (``embedding.EmbeddingFactor``: ``diag(A) ⊗ G``), each with ``num_params``, ``@``, ``trace``,
    ``to_dense`` and ``eig``; ``skipped`` names the parameterized modules that were not covered and why;
    ``module_params`` counts the parameters of every parameterized module, a parameter shared by several
    modules (weight tying) counted once, at its first owner; ``tied`` lists, per later module, which of its
    parameters are shared and with whom. Each module's block is the curvature of its own use of the
    parameters; for a tied parameter the exact block is the sum of its users' blocks plus cross terms.
    """

    factors: dict[str, KroneckerFactor]
    curvature: str
    approx: str
    loss: str
    reduction: str
    n_samples: int
    skipped: dict[str, str] = field(default_factory=dict)
    other_factors: dict[str, NormFactor | EmbeddingFactor] = field(default_factory=dict)
    module_params: dict[str, int] = field(default_factory=dict)
    tied: dict[str, list[str]] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return list(self.factors)

    def __getitem__(self, name: str) -> KroneckerFactor:
        if name not in self.factors:
            raise KeyError(f"no factors for layer {name!r}; layers: {self.layer_names}")
        return self.factors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def eig(self, dtype: torch.dtype | None = None, vectors: bool = True, distributed: bool = False) -> dict[str, KroneckerEigen]:
        """Eigendecompositions of every layer; equal-size factors go through one batched call.

        ``vectors=False``: eigenvalues only, eigenvectors on first use (see ``KroneckerFactor.eig``) — the fast
        way to every spectrum plus the top eigenpairs of each layer.

        ``distributed=True``: the factors are split over the ranks of the process group by cost (≈ d³),
        each rank decomposes its share, and all ranks receive every result.
        """
        return _eig_all(self.factors, dtype, vectors, distributed)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "KFAC":
        moved = {n: f.to(device, dtype) for n, f in self.factors.items()}
        others = {n: f.to(device, dtype) for n, f in self.other_factors.items()}
        return KFAC(moved, self.curvature, self.approx, self.loss, self.reduction, self.n_samples, dict(self.skipped),
                    others, dict(self.module_params), dict(self.tied))

    def summary(self) -> str:
        """One line per parameterized module: covered (structure, parameter count) or skipped (why), and totals."""
        lines = [f"KFAC curvature={self.curvature} approx={self.approx} loss={self.loss}({self.reduction}) N={self.n_samples}"]
        covered = 0
        for name, f in {**self.factors, **self.other_factors}.items():
            what = f"Kronecker G ⊗ A, A {tuple(f.A.shape)}, G {tuple(f.G.shape)}" if name in self.factors else f.describe()
            tied = f" (tied: {', '.join(self.tied[name])})" if name in self.tied else ""
            lines.append(f"  {name}: {what}, P={f.num_params}{tied}")
            covered += self.module_params.get(name, f.num_params)
        for name, reason in self.skipped.items():
            count = self.module_params.get(name)
            lines.append(f"  {name}: skipped{f' ({count} parameters)' if count is not None else ''} — {reason}")
        if self.module_params:
            total = sum(self.module_params.values())
            lines.append(f"  covered {covered} of {total} parameters ({100 * covered / max(total, 1):.1f} %)"
                         + (", tied parameters counted once" if self.tied else ""))
        return "\n".join(lines)

    def save(self, path) -> None:
        """Save as plain tensors and strings (loaded with ``torch.load(weights_only=True)``: no code runs)."""
        torch.save(
            {
                "format": SAVE_FORMAT,
                "meta": {k: getattr(self, k) for k in ("curvature", "approx", "loss", "reduction", "n_samples")},
                "skipped": dict(self.skipped),
                "module_params": dict(self.module_params),
                "tied": dict(self.tied),
                "other_layers": {name: _other_state(f) for name, f in self.other_factors.items()},
                "layers": {
                    name: {"A": f.A, "G": f.G, "layout": [f.layout.d_out, f.layout.d_in, int(f.layout.has_bias)]}
                    for name, f in self.factors.items()
                },
            },
            path,
        )

    @classmethod
    def load(cls, path, map_location: torch.device | str | None = None) -> "KFAC":
        """Load what ``save`` wrote; never unpickles code (``weights_only=True``)."""
        state = torch.load(path, map_location=map_location, weights_only=True)
        fmt = state.get("format") if isinstance(state, dict) else None
        if not isinstance(fmt, str) or not fmt.startswith("kfac_hessian.KFAC/"):
            raise ValueError(f"{path} is not a file written by KFAC.save")
        if fmt != SAVE_FORMAT:
            raise ValueError(f"{path} has format {fmt!r}; this version of kfac_hessian reads {SAVE_FORMAT!r}")
        factors = {}
        for name, entry in state["layers"].items():
            d_out, d_in, has_bias = entry["layout"]
            factors[name] = KroneckerFactor(entry["A"], entry["G"], BlockLayout(d_out, d_in, bool(has_bias)), name)
        others = {name: _other_from_state(entry, name) for name, entry in state.get("other_layers", {}).items()}
        return cls(factors, skipped=state["skipped"], other_factors=others, module_params=state.get("module_params", {}),
                   tied=state.get("tied", {}),
                   **state["meta"])


def _other_state(factor: NormFactor | EmbeddingFactor) -> dict:
    if isinstance(factor, NormFactor):
        return {"kind": "normalization", "matrix": factor.matrix}
    return {"kind": "embedding", "A": factor.a_diagonal, "G": factor.G}


def _other_from_state(entry: dict, name: str) -> NormFactor | EmbeddingFactor:
    if entry["kind"] == "normalization":
        return NormFactor(entry["matrix"], name)
    return EmbeddingFactor(entry["A"], entry["G"], name)


class _FactorSums:
    """Running sums ``Σ ā āᵀ`` and ``Σ g gᵀ`` of one layer, upper block triangle only (``_add_gram_upper``; bias
    column handled without copying ``ā``)."""

    def __init__(self, layout: BlockLayout, approx: Approx, dtype: torch.dtype, device: torch.device):
        self.layout, self.approx = layout, approx
        self.a_sum = torch.zeros(layout.width, layout.width, dtype=dtype, device=device)
        self.g_sum = torch.zeros(layout.d_out, layout.d_out, dtype=dtype, device=device)
        self.a_rows = 0

    def add_inputs(self, inputs: Tensor) -> None:
        """``inputs`` (N, T, d_in) of all calls of this batch."""
        if self.approx == "reduce":
            inputs = inputs.mean(1, keepdim=True)
        rows = _feature_major(inputs, self.a_sum.dtype)
        _add_gram_upper(self.a_sum[: self.layout.d_in, : self.layout.d_in], rows)
        self._add_bias_moments(rows.sum(1) if self.layout.has_bias else None, rows.shape[1])

    def add_input_moments(self, gram: Tensor, column_sums: Tensor, rows: int) -> None:
        """``Σ a aᵀ`` and ``Σ a`` over ``rows`` input rows, computed elsewhere (``patch_moments``)."""
        self.a_sum[: self.layout.d_in, : self.layout.d_in] += gram
        self._add_bias_moments(column_sums if self.layout.has_bias else None, rows)

    def _add_bias_moments(self, column_sums: Tensor | None, rows: int) -> None:
        if column_sums is not None:  # the bias entry of ā is 1: its row/column of Σ ā āᵀ holds Σ a and the count
            d = self.layout.d_in
            self.a_sum[:d, d] += column_sums
            self.a_sum[d, :d] += column_sums
            self.a_sum[d, d] += rows
        self.a_rows += rows

    def add_gradients(self, grads: Tensor) -> None:
        """``grads`` (K, N, T, d_out) of all calls of this batch, for some of the backpropagated columns."""
        if self.approx == "reduce":
            grads = grads.sum(2, keepdim=True)
        grad_rows = _feature_major(grads, self.g_sum.dtype)
        _add_gram_upper(self.g_sum, grad_rows)


class _GradientRouter:
    """Turns the output gradients of each recorded call into gradient rows of its layer's sums.

    A layer called once in the batch gets its rows added as they arrive; the rows of a layer called several
    times are held until ``flush`` (after each backward pass), where they are added together as further
    locations of the same samples (``approx="reduce"`` sums over them; normalization blocks pair them with
    their inputs), a call the output did not depend on counting as zeros.
    """

    def __init__(self, selected: dict[str, nn.Module], sums: dict[str, _FactorSums], other_sums: dict):
        self.selected, self.sums, self.other_sums = selected, sums, other_sums
        self.calls: Mapping[str, list[LayerCall]] = {}
        self.pending: dict[str, list[Tensor | None]] = {}

    def start_batch(self, calls: Mapping[str, list[LayerCall]]) -> None:
        self.calls = calls
        self.pending = {name: [None] * len(c) for name, c in calls.items() if len(c) > 1}

    def receive(self, name: str, index: int, grads: Tensor) -> None:
        """``grads`` ``(K, N, *z.shape[1:])``: ``K`` columns' gradients w.r.t. the output of call ``index``."""
        other = self.other_sums.get(name)
        rows = other.gradient_rows(grads) if other is not None else output_rows(self.selected[name], grads)
        if name in self.pending:
            self.pending[name][index] = rows
        else:
            (other or self.sums[name]).add_gradients(rows)

    def receive_one(self, name: str, index: int, grad: Tensor) -> None:
        """One column's gradient (shaped like the output), as the recorder hands it over."""
        self.receive(name, index, grad.unsqueeze(0))

    def flush(self, k: int, dtype: torch.dtype, device: torch.device) -> None:
        for name, slots in self.pending.items():
            if all(rows is None for rows in slots):
                continue
            for index, rows in enumerate(slots):
                if rows is None:
                    self.receive(name, index, torch.zeros((k, *self.calls[name][index].output_shape), dtype=dtype, device=device))
            rows = _concat_locations(slots, axis=2)
            (self.other_sums.get(name) or self.sums[name]).add_gradients(rows)
            self.pending[name] = [None] * len(slots)


def _one_column_per_pass(column_chunk: int | None, device: torch.device, curvature: Curvature, mc_samples: int) -> bool:
    """Whether every backward pass carries a single column (then its gradients are streamed into the sums):
    ``column_chunk=1``; by default on the CPU; and wherever there is only one column per sample."""
    if column_chunk is not None:
        return column_chunk == 1
    return device.type != "cuda" or curvature == "empirical" or (curvature == "mc" and mc_samples == 1)


def _backpropagate_together(output: Tensor, chunk: Tensor, calls: Mapping[str, list[LayerCall]],
                            router: _GradientRouter, retain: bool) -> None:
    """One (vectorized when ``len(chunk) > 1``) backward pass of ``chunk`` to all recorded outputs at once."""
    targets = [(name, i, call) for name, c in calls.items() for i, call in enumerate(c)]
    batched = len(chunk) > 1  # a single column skips vmap's batching rules
    grads = torch.autograd.grad(output, [call.output for _, _, call in targets], grad_outputs=chunk if batched else chunk[0],
                                is_grads_batched=batched, allow_unused=True, retain_graph=retain)
    for (name, index, _), grad in zip(targets, grads):
        if grad is not None:  # None: the call did not influence the output
            router.receive(name, index, grad if batched else grad.unsqueeze(0))


UNFOLD_BUDGET = 2**24  # elements of unfolded convolution patches materialized at once (64 MiB in float32)


def _add_layer_inputs(sums: _FactorSums, module: nn.Module, inputs: list[Tensor]) -> None:
    """Accumulate ``A`` from the inputs of every call of ``module`` in one batch.

    Stride-1 zero-padded convolutions (``approx="expand"``) take their patch moments from shifted products of
    the input (``patch_moments``: 13 products instead of 81 block products for a 3×3 kernel); other convolutions
    unfold their patches. Either way a few samples at a time, at most about ``UNFOLD_BUDGET`` elements of
    temporaries at once: a 3×3 convolution's patches are 9× its input, and unfolding a whole batch of a wide
    layer would dominate the peak memory. Linear rows are views and go in one piece.
    """
    n = inputs[0].shape[0]
    if isinstance(module, nn.Linear):
        sums.add_inputs(_concat_locations([input_rows(module, x) for x in inputs]))
        return
    shifted = sums.approx == "expand" and shift_moments_apply(module)
    per_sample = sum(patch_moments_elements(module, x) if shifted else input_rows(module, x[:1]).numel() for x in inputs)
    chunk = max(1, UNFOLD_BUDGET // per_sample)
    for start in range(0, n, chunk):
        if shifted:
            for x in inputs:
                sums.add_input_moments(*patch_moments(module, x[start : start + chunk], sums.a_sum.dtype))
        else:
            sums.add_inputs(_concat_locations([input_rows(module, x[start : start + chunk]) for x in inputs]))


def _add_gram_upper(target: Tensor, rows: Tensor) -> None:
    """``target += rows rowsᵀ`` on the upper block triangle only (``_symmetrize_`` completes it once at the end).

    torch has no symmetric rank-k update (``syrk``); strips of rows against the columns from their diagonal on
    do ``(b + 1)/(2b)`` of a full product's work with ``b`` strips (4 strips: 62.5 %), with strips of at
    least 256 rows so that each GEMM stays efficient (``benchmarks/symmetric_accumulation.py`` measures it).
    """
    d = rows.shape[0]
    strips = max(1, min(4, d // 256))
    edges = [round(i * d / strips) for i in range(strips + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        target[lo:hi, lo:].addmm_(rows[lo:hi], rows[lo:].T)


def _symmetrize_(matrix: Tensor, block: int = 256) -> Tensor:
    """Mirror the upper triangle of ``matrix`` onto its lower part, in place, and return it.

    Block by block, so that no temporary is larger than ``block × block``: the factors are the largest tensors
    alive at the end of ``compute_kfac``, and a whole-matrix ``triu() + triu(1).mT`` would triple them.
    """
    d = matrix.shape[0]
    for lo in range(0, d, block):
        hi = min(lo + block, d)
        diagonal = matrix[lo:hi, lo:hi]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
        matrix[hi:, lo:hi] = matrix[lo:hi, hi:].mT
    return matrix


def _concat_locations(rows: list[Tensor], axis: int = 1) -> Tensor:
    """Several calls of one layer are further locations (no copy for the usual single call)."""
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=axis)


def _feature_major(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``(..., d)`` rows as a ``(d, R)`` matrix. Convolution rows are transposed views of ``(…, d, T)`` tensors:
    copying them feature-major moves contiguous runs of ``T``, where a row-major copy would gather single
    elements (several times slower)."""
    d = rows.shape[-1]
    matrix = rows.reshape(-1, d).T if rows.stride(-1) == 1 else rows.movedim(-1, 0).reshape(d, -1)
    return matrix.to(dtype)


def _all_reduce_sums(sums: dict[str, _FactorSums], others: dict, n_samples: int, tau: int, device: torch.device) -> tuple[int, int]:
    """Combine every rank's factor sums, the other layers' sums and the counts in one collective; returns the
    global ``(N, τ)``."""
    import torch.distributed as dist

    _distributed.require_process_group()
    counts = torch.tensor([n_samples, tau, *[s.a_rows for s in sums.values()]], dtype=torch.float64)
    states = [o.state() for o in others.values()]
    tensors = [*[s.a_sum for s in sums.values()], *[s.g_sum for s in sums.values()], *[t for st in states for t in st]]
    reduced = _distributed.all_reduce_sum([*tensors, counts.to(device)])
    for n, s in enumerate(sums.values()):
        s.a_sum, s.g_sum = reduced[n], reduced[len(sums) + n]
    position = 2 * len(sums)
    for other, state in zip(others.values(), states):
        other.set_state([reduced[position + i].to(t.dtype) for i, t in enumerate(state)])
        position += len(state)
    counts = reduced[-1].cpu()
    if int(counts[1]) != tau * dist.get_world_size():
        raise ValueError("ranks disagree on the number of loss terms per sample")
    for n, s in enumerate(sums.values()):
        s.a_rows = int(counts[2 + n])
    return int(counts[0]), tau


def _output_columns(spec: LossSpec, curvature: Curvature, output: Tensor, target: Tensor, mc_samples: int, generator) -> Tensor:
    """Columns ``(K, *output.shape)`` backpropagated from the output for ``curvature``."""
    if curvature == "ggn":
        return hessian_sqrt_columns(spec, output)
    if curvature == "mc":
        return sample_output_gradients(spec, output, mc_samples, generator)
    return output_gradient(spec, output.detach(), target).unsqueeze(0)


def _other_kind(module: nn.Module) -> type | None:
    """The sums class of a layer with a non-Kronecker structure, or ``None``."""
    if is_normalization(module):
        return NormBlockSums
    if isinstance(module, nn.Embedding) and embedding_reason(module) is None:
        return EmbeddingSums
    return None


def _select(model: nn.Module, layers: list[str] | None) -> tuple[dict, dict, dict, dict]:
    """``(Kronecker layers, other layers, self-attention modules, skipped)``: ``select_layers`` plus normalization
    layers, embeddings and decomposable ``nn.MultiheadAttention`` modules."""
    modules = dict(model.named_modules())

    def trainable(m: nn.Module) -> bool:
        return any(p.requires_grad for p in m.parameters(recurse=False))

    def is_attention(m: nn.Module) -> bool:
        return isinstance(m, nn.MultiheadAttention) and attention_reason(m) is None

    if layers is None:
        selected, skipped = select_layers(model, None, allow_none=True)
        others = {n: modules[n] for n in list(skipped) if _other_kind(modules[n]) and trainable(modules[n])}
        attention = {n: modules[n] for n in list(skipped) if is_attention(modules[n]) and trainable(modules[n])}
        skipped = {n: r for n, r in skipped.items() if n not in others and n not in attention}
        for n, m in modules.items():
            if n not in skipped:
                continue
            if isinstance(m, nn.Embedding):
                skipped[n] = embedding_reason(m) or skipped[n]
            if isinstance(m, nn.MultiheadAttention):
                skipped[n] = attention_reason(m) or skipped[n]
            if (_other_kind(m) or is_attention(m)) and not trainable(m):
                skipped[n] = "all its parameters are frozen (requires_grad=False); name it in layers= to include it"
        if not selected and not others and not attention:
            raise ValueError(f"{type(model).__name__} has no supported layer; skipped: {skipped}")
        return selected, others, attention, skipped
    names = [layers] if isinstance(layers, str) else list(layers)
    others = {n: modules[n] for n in names if n in modules and n and _other_kind(modules[n])}
    attention = {n: modules[n] for n in names if n in modules and n and is_attention(modules[n])}
    rest = [n for n in names if n not in others and n not in attention]
    selected = select_layers(model, rest)[0] if rest or not (others or attention) else {}
    return selected, others, attention, {}


def _column_chunks(columns: Tensor, size: int, per_position: bool) -> tuple[int, Iterator[Tensor]]:
    """``(count, chunks of ≤ size columns)``. ``per_position``: every column is split into one column per output
    position (zero elsewhere), built lazily chunk by chunk — ``K·T`` columns instead of ``K``."""
    if not per_position or columns.dim() <= 3:  # (K, N) or (K, N, C): one position per sample
        chunks = columns.split(size)
        return len(chunks), iter(chunks)
    k, n, c = columns.shape[:3]
    flat = columns.reshape(k, n, c, -1)
    positions = flat.shape[-1]
    pairs = torch.cartesian_prod(torch.arange(k), torch.arange(positions)).to(columns.device)

    def generate() -> Iterator[Tensor]:
        for start in range(0, len(pairs), size):
            col, pos = pairs[start : start + size].unbind(1)
            chunk = flat.new_zeros(len(col), n, c, positions)
            chunk[torch.arange(len(col), device=columns.device), :, :, pos] = flat[col, :, :, pos]
            yield chunk.reshape(len(col), *columns.shape[1:])

    return -(-len(pairs) // size), generate()


def _require_finite(tensor: Tensor, what: str) -> None:
    # One reduction first: a NaN or ±Inf entry makes the sum non-finite, and it needs no O(numel) temporary
    # mask; only a non-finite sum (which an overflow of finite entries could also give) is checked entry-wise.
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise FloatingPointError(f"{what} contains NaN or Inf; no spectrum is computed from non-finite values")


def compute_kfac(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    curvature: Curvature = "ggn",
    layers: list[str] | None = None,
    approx: Approx = "expand",
    mc_samples: int = 1,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    column_chunk: int | None = None,
    distributed: bool = False,
    batch_norm_eval: bool = True,
    per_position: bool = False,
) -> KFAC:
    """Kronecker factors ``G ⊗ A`` of the Hessian blocks of every selected layer (see the module docstring).

    Args:
        model: any ``nn.Module``; it runs as it is (except BatchNorm, see ``batch_norm_eval``) and is left as it
            was (modes, flags, ``.grad``). Normalization layers (affine BatchNorm/LayerNorm/GroupNorm) get exact
            per-feature 2×2 blocks and embeddings ``diag(A) ⊗ G`` in ``KFAC.other_factors``
            (``kfac_hessian.normalization``, ``kfac_hessian.embedding``).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (reduction mean/sum).
        data: an ``(inputs, targets)`` pair or an iterable of pairs, streamed batch by batch.
        curvature: ``"ggn"`` (exact Gauss-Newton output Hessian), ``"mc"`` (Monte-Carlo Fisher),
            ``"empirical"`` (empirical Fisher).
        layers: module names (from ``named_modules``); ``None`` takes every supported trainable layer.
        approx: weight-sharing approximation, ``"expand"`` or ``"reduce"``.
        mc_samples: labels drawn per sample for ``"mc"``.
        seed: seeds a private generator for ``"mc"`` (the global RNG is not touched when given).
        device, dtype: where and in which precision the factors are accumulated and kept (default: the
            model's). Forward and backward passes run on the model's device.
        progress: show a progress bar (needs ``tqdm``).
        column_chunk: output-gradient columns backpropagated together in one vectorized
            (``is_grads_batched``) pass. ``None``: all of them on CUDA, one per pass on CPU, where the
            vectorized backward of convolutions measured about 2× slower than separate passes
            (``docs/performance.md``). A chunk of ``K`` holds ``K`` copies of the activations' gradients.
            One column per pass (also ``mc`` with one sample and ``empirical`` by default) streams each
            layer's output gradient into ``G`` inside the backward (``capture.py``): the least memory.
        distributed: ``data`` is this rank's shard of a data set split over an initialized
            ``torch.distributed`` process group; the sums of all ranks are combined in one all-reduce and
            every rank returns the factors of the whole data set.
        batch_norm_eval: run BatchNorm modules in eval mode (running statistics) during the pass, whatever
            the model's mode: the curvature is then that of the function the trained network computes at
            test time. ``False`` keeps the model's modes (train-mode BatchNorm couples the samples of a
            batch, which no per-sample factorization represents). Modes are restored afterwards.
        per_position: ``"ggn"`` only. Backpropagate every loss-Hessian square-root column at one output
            position at a time (``K·T`` columns instead of ``K``, ``T`` output positions per sample). Joint
            columns (the default) add cross-position terms wherever a layer location influences several
            output positions (attention, ``approx="reduce"``, normalization and embedding parameters shared
            over positions; docs/conventions.md §3); per-position columns give the exact GGN outer products,
            at ``T`` times the backward passes. No effect with one output position per sample.
    """
    if per_position and curvature != "ggn":
        raise ValueError("per_position=True applies to curvature='ggn' (Monte-Carlo labels are drawn per position, "
                         "and the empirical Fisher is defined with the per-sample gradient)")
    if curvature not in ("ggn", "mc", "empirical"):
        raise ValueError(f"curvature must be 'ggn', 'mc' or 'empirical', got {curvature!r}")
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    spec = loss_spec(loss_fn)
    selected, others, attention, skipped = _select(model, layers)
    selected = {**selected, **projection_layers(attention)}  # attention in-projections as Linear layers
    first_param = next(iter({**selected, **others}.values())).weight
    model_device = first_param.device
    dtype = dtype or first_param.dtype
    generator = torch.Generator(model_device).manual_seed(seed) if (seed is not None and curvature == "mc") else None
    sums = {
        name: _FactorSums(BlockLayout(*weight_matrix_shape(m), m.bias is not None), approx, dtype, model_device)
        for name, m in selected.items()
    }
    other_sums = {name: _other_kind(m)(m, dtype, model_device) for name, m in others.items()}
    n_samples, tau = 0, None
    batches = iterate_batches(data, model_device)
    if progress:
        from tqdm.auto import tqdm

        total = len(data) if hasattr(data, "__len__") and not (isinstance(data, tuple) and len(data) == 2) else None
        batches = tqdm(batches, desc=f"KFAC ({curvature})", unit="batch", total=total)
    stream = _one_column_per_pass(column_chunk, model_device, curvature, mc_samples)
    router = _GradientRouter(selected, sums, other_sums)
    with (
        decomposed_attention(attention, {n: selected[n] for n in attention}) as cross_attention,
        preserved_model_state(model, batch_norm_eval),
        LayerRecorder({**selected, **others}, router.receive_one if stream else None) as recorder,
        torch.enable_grad(),
    ):
        for index, inputs, target in batches:
            recorder.clear()
            output = model(inputs)
            if not isinstance(output, Tensor):
                raise ValueError(f"the model must return one tensor of outputs, got {type(output).__name__}")
            check_batch(spec, output, target)
            _require_finite(output, f"model output at batch {index}")
            batch_tau = terms_per_sample(spec, output)
            if tau is not None and batch_tau != tau:
                raise ValueError(f"batch {index} has {batch_tau} loss terms per sample, earlier batches {tau}")
            tau = batch_tau
            n_samples += output.shape[0]
            called = [name for name in selected if recorder.calls[name]]
            called_others = [name for name in others if recorder.calls[name]]
            if not called and not called_others:
                continue
            for name in called_others:
                other_sums[name].add_inputs([c.inputs for c in recorder.calls[name]])
            for name in called:
                _add_layer_inputs(sums[name], selected[name], [c.inputs for c in recorder.calls[name]])
                recorder.release_inputs(name)
                # a NaN/Inf anywhere in the rows reaches the sums: checking them costs O(d²), not O(N·T·d)
                _require_finite(sums[name].a_sum, f"A factor of layer {name!r} after batch {index} (its inputs)")
            router.start_batch(recorder.calls)
            columns = _output_columns(spec, curvature, output, target, mc_samples, generator)
            n_chunks, chunks = _column_chunks(columns, 1 if stream else column_chunk or len(columns), per_position)
            for chunk_index, chunk in enumerate(chunks):
                retain = chunk_index < n_chunks - 1
                if stream:  # the recorder hands each output gradient to the router inside the pass
                    torch.autograd.grad(output, recorder.anchors, chunk[0], retain_graph=retain, allow_unused=True)
                else:
                    _backpropagate_together(output, chunk, recorder.calls, router, retain)
                router.flush(len(chunk), output.dtype, output.device)
            for name in called:
                _require_finite(sums[name].g_sum, f"G factor of layer {name!r} after batch {index} (its output gradients)")
            for name in called_others:
                for tensor in other_sums[name].state():
                    _require_finite(tensor, f"curvature sums of layer {name!r} after batch {index}")
            recorder.clear()
    if distributed:
        n_samples, tau = _all_reduce_sums(sums, other_sums, n_samples, tau, model_device)
    scale = spec.scale(n_samples, tau)
    if curvature == "mc":
        scale /= mc_samples
    elif curvature == "empirical" and spec.reduction == "mean":
        scale /= tau
    factors, other_factors = {}, {}
    for name in cross_attention:
        sums.pop(name)
        skipped[name] = ("called as cross-attention (query, key, value differ): its q/k/v projections have "
                         "different inputs and no single Kronecker block")
    for name, s in {**sums, **other_sums}.items():
        never_called = not s.called if name in other_sums else s.a_rows == 0
        if never_called:
            if layers is not None:
                raise ValueError(f"layer {name!r} was never called in the model's forward pass")
            skipped[name] = "never called in the forward pass"
            continue
        if name in other_sums:
            other_factors[name] = s.finalize(scale, device, name)
            continue
        A = _symmetrize_(s.a_sum).div_(s.a_rows).to(device)
        G = _symmetrize_(s.g_sum).mul_(scale).to(device)
        factors[name] = KroneckerFactor(A, G, s.layout, name)
    if not factors and not other_factors:
        raise ValueError(f"no selected layer was called in the forward pass; skipped: {skipped}")
    module_params, tied = _parameter_owners(model)
    return KFAC(factors, curvature, approx, spec.kind, spec.reduction, n_samples, skipped, other_factors, module_params, tied)


def _parameter_owners(model: nn.Module) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Parameters per module, each shared parameter counted at its first owner only; and the shares."""
    owner: dict[int, str] = {}
    counts: dict[str, int] = {}
    tied: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        counts[name] = 0
        for pname, p in own:
            full = f"{name}.{pname}" if name else pname
            if id(p) in owner:
                tied.setdefault(name, []).append(f"{pname} is {owner[id(p)]}")
            else:
                owner[id(p)] = full
                counts[name] += p.numel()
    return counts, tied


def input_second_moments(
    model: nn.Module,
    data: Data,
    layers: list[str] | None = None,
    approx: Approx = "expand",
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The ``A`` factors alone, ``A = mean over rows of ā āᵀ`` (as in ``compute_kfac``), from forward passes only.

    No loss is evaluated (targets in ``data`` are ignored) and nothing is backpropagated: this is the local
    Hessian ``∇²_W ℓ = I ⊗ A`` of a block's back-matching loss (``analyses.local_hessian``) and costs one
    forward pass over the data.
    """
    selected, _ = select_layers(model, layers)
    first_param = next(iter(selected.values())).weight
    dtype = dtype or first_param.dtype
    sums = {
        name: _FactorSums(BlockLayout(*weight_matrix_shape(m), m.bias is not None), approx, dtype, first_param.device)
        for name, m in selected.items()
    }
    with preserved_model_state(model), LayerRecorder(selected) as recorder, torch.no_grad():
        for index, inputs, _ in iterate_batches(data, first_param.device):
            recorder.clear()
            model(inputs)
            for name, calls in recorder.calls.items():
                if calls:
                    _add_layer_inputs(sums[name], selected[name], [c.inputs for c in calls])
                    _require_finite(sums[name].a_sum, f"A factor of layer {name!r} after batch {index} (its inputs)")
    missing = [name for name, s in sums.items() if s.a_rows == 0]
    if missing:
        raise ValueError(f"layers {missing} were never called in the model's forward pass")
    return {name: _symmetrize_(s.a_sum).div_(s.a_rows) for name, s in sums.items()}
