"""What every Kronecker kind shares: layers ``z = W ā`` at ``T`` locations per sample, and their factor sums.

A kind gives its block layout (``layout``: ``d_out``, ``d_in`` per group, bias, groups, transposed weight), its
recorded input as rows ``(N, T, groups·d_in)`` (``input_rows``; group-major features) and its output gradients
``(K, N, *z.shape[1:])`` as rows ``(K, N, T, groups·d_out)`` (``output_rows``). ``KroneckerSums`` accumulates

* ``Σ ā āᵀ`` (the constant 1 of the bias appended here) per group — ``approx="reduce"`` averages ``ā`` over each
  sample's locations first — and the number of rows, so that ``A = Σ ā āᵀ / rows``;
* ``Σ g gᵀ`` per group over every location (``"reduce"``: ``g`` summed over each sample's locations first), so
  that ``G = scale · Σ g gᵀ``.

Several calls of a module in one batch are further locations. The layer's weight as matrices
``(groups, d_out, d_in)`` (``weight_matrices``) serves the local Hessians and the optimizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from .. import limits
from ..blocks import CurvatureBlock, KroneckerBlock
from ..blocks.row_factor import RowFactor
from ..capture import LayerCall
from ..gram import FrequentDirections, KeptColumns, add_gram, feature_major, symmetrize_
from ..layout import BlockLayout
from .base import Accumulator, LayerKind, PassSettings


def block_has_bias(module: nn.Module) -> bool:
    """Whether a module's Kronecker block covers its bias: it has one, and the bias is not frozen while the weight
    trains — a frozen bias is a constant of the function the trainable weight sees (a fine-tuned model's frozen
    biases), so its row and column are not folded into the weight's block (``ā`` gets no 1 for it)."""
    bias, weight = getattr(module, "bias", None), getattr(module, "weight", None)
    return bias is not None and (bias.requires_grad or weight is None or not weight.requires_grad)


class KroneckerKind(LayerKind):
    """A layer whose block is approximated by ``G ⊗ A`` (module docstring)."""

    diagonal_a = False  # A is diagonal (one-hot inputs: embeddings)
    dense_inputs = True  # the input rows are vectors ā (local Hessians and the optimizer use them)

    def parameter_names(self, module: nn.Module) -> list[str]:
        """``weight``, then ``bias`` when the block covers it (``block_has_bias``)."""
        return ["weight", *(["bias"] if block_has_bias(module) else [])]

    @abstractmethod
    def layout(self, module: nn.Module) -> BlockLayout: ...

    @abstractmethod
    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """The layer input as ``(N, T, groups·d_in)`` rows."""

    @abstractmethod
    def output_rows(self, module: nn.Module, grads: Tensor) -> Tensor:
        """Output gradients ``(K, N, *z.shape[1:])`` as ``(K, N, T, groups·d_out)`` rows."""

    def add_inputs(self, sums: KroneckerSums, module: nn.Module, inputs: list[Tensor]) -> None:
        """Accumulate the inputs of every call of ``module`` in one batch (default: their rows in one piece)."""
        sums.add_rows(concat_locations([self.input_rows(module, x) for x in inputs]))

    def weight_matrices(self, module: nn.Module) -> Tensor:
        """The weight as ``(groups, d_out, d_in)`` matrices (detached)."""
        weight = getattr(module, self.parameter_names(module)[0]).detach()
        return self.layout(module).weight_matrices(weight.reshape(1, -1))[0]

    def accumulator(self, name: str, module: nn.Module, settings: PassSettings) -> KroneckerSums:
        return KroneckerSums(self, name, module, settings)

    def per_sample_accumulator(self, name: str, module: nn.Module, settings: PassSettings,
                               statistic: PerSampleStatistic) -> PerSampleSums:
        """Sums over this layer's per-sample gradients (EKFAC, the Kronecker fit)."""
        return PerSampleSums(self, name, module, settings, statistic)


class KroneckerSums(Accumulator):
    """``Σ ā āᵀ`` and ``Σ g gᵀ`` of one Kronecker layer per group (module docstring): upper block triangle only for
    one group (``gram.add_gram``), the bias column added without copying ``ā``; token counts for a diagonal ``A``.

    A factor of one group at least ``limits.ROW_FACTOR_MIN_WIDTH`` wide keeps its rows instead (``gram.KeptColumns``)
    while they are fewer than its width — the block then holds it as a ``RowFactor`` (``scale · UᵀU``) — and folds
    them into the dense sum, batch by batch in the order they came (the same sums as if they had been added at once),
    when they reach the width. A factor too wide to be dense (``width² > limits.ROW_SKETCH_ELEMENTS``) whose rows
    outgrow that limit is sketched instead (``gram.FrequentDirections``, its error bound carried by the block)."""

    def __init__(self, kind: KroneckerKind, name: str, module: nn.Module, settings: PassSettings):
        self.kind, self.name, self.module = kind, name, module
        self.layout = layout = kind.layout(module)
        self.approx = "expand" if kind.diagonal_a else settings.approx
        self.dtype, self.device = dtype, device = settings.dtype, settings.device
        rows_a = not kind.diagonal_a and _keeps_rows(layout, layout.width)
        self.a_kept = KeptColumns(layout.width) if rows_a else None
        self.g_kept = KeptColumns(layout.d_out) if _keeps_rows(layout, layout.d_out) else None
        a_shape = (layout.width,) if kind.diagonal_a else (layout.groups, layout.width, layout.width)
        self.a_sum = None if rows_a else torch.zeros(a_shape, dtype=dtype, device=device)
        self.g_sum = (None if self.g_kept is not None
                      else torch.zeros(layout.groups, layout.d_out, layout.d_out, dtype=dtype, device=device))
        self.a_rows = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def called(self) -> bool:
        return bool(self.a_rows > 0)

    def add_inputs(self, calls: list[LayerCall]) -> None:
        self.kind.add_inputs(self, self.module, [c.inputs for c in calls])
        for call in calls:  # the graph keeps what the backward needs and frees it as it goes
            call.args = call.kwargs = None

    def _gram(self, target: Tensor, columns: Tensor) -> None:
        add_gram(target[0] if self.layout.groups == 1 else target, columns)

    def add_rows(self, rows: Tensor) -> None:
        """Input rows ``(N, T, groups·d_in)`` of all calls of this batch."""
        if self.approx == "reduce":
            rows = rows.mean(1, keepdim=True)
        columns = feature_major(rows, self.dtype)
        self.a_rows += columns.shape[1]
        if self.a_kept is None:
            self._add_input_columns(columns)
        elif isinstance(self.a_kept, FrequentDirections):
            self.a_kept.add(self._with_bias(columns))
        else:
            self.a_kept.add(columns)
            if _sketch_due(self.a_kept, self.layout.width):
                self.a_kept = FrequentDirections(self._with_bias(self.a_kept.matrix()),
                                                 _sketch_rows(self.layout.width))
            elif self.a_kept.full:
                self._fold_inputs()

    def _with_bias(self, columns: Tensor) -> Tensor:
        """Input columns ``(d_in, R)`` with the bias entry 1 appended (``(width, R)``)."""
        return torch.cat([columns, columns.new_ones(1, columns.shape[1])]) if self.layout.has_bias else columns

    def _add_input_columns(self, columns: Tensor) -> None:
        d = self.layout.d_in
        self._gram(self.a_sum[:, :d, :d], columns)
        self._add_bias_moments(columns.sum(1).reshape(self.layout.groups, d) if self.layout.has_bias else None,
                               columns.shape[1])

    def _fold_inputs(self) -> None:
        """Kept input rows into the dense sum, batch by batch."""
        layout = self.layout
        self.a_sum = torch.zeros(layout.groups, layout.width, layout.width, dtype=self.dtype, device=self.device)
        for columns in self.a_kept.chunks:
            self._add_input_columns(columns)
        self.a_kept = None

    def _fold_gradients(self) -> None:
        layout = self.layout
        self.g_sum = torch.zeros(layout.groups, layout.d_out, layout.d_out, dtype=self.dtype, device=self.device)
        for columns in self.g_kept.chunks:
            self._gram(self.g_sum, columns)
        self.g_kept = None

    def add_moments(self, gram: Tensor, column_sums: Tensor, rows: int) -> None:
        """``Σ a aᵀ`` ``(d_in, d_in)`` and ``Σ a`` over ``rows`` input rows, computed elsewhere (one group)."""
        if isinstance(self.a_kept, FrequentDirections):
            raise NotImplementedError(f"layer {self.name!r}: input moments cannot enter a sketched A")
        if self.a_kept is not None:  # moments have no rows: from here on the sum is dense
            self._fold_inputs()
        d = self.layout.d_in
        self.a_sum[0, :d, :d] += gram
        self._add_bias_moments(column_sums.unsqueeze(0) if self.layout.has_bias else None, rows)
        self.a_rows += rows

    def add_counts(self, counts: Tensor, rows: int) -> None:
        """Occurrences of every input index (a diagonal ``A``)."""
        self.a_sum += counts.to(self.a_sum.dtype)
        self.a_rows += rows

    def _add_bias_moments(self, column_sums: Tensor | None, rows: int) -> None:
        if column_sums is not None:  # the bias entry of ā is 1: its row/column of Σ ā āᵀ holds Σ a and the count
            d = self.layout.d_in
            self.a_sum[:, :d, d] += column_sums
            self.a_sum[:, d, :d] += column_sums
            self.a_sum[:, d, d] += rows

    def add_gradients(self, grads: list[list[Tensor]]) -> None:
        rows = concat_locations([self.kind.output_rows(self.module, g[0]) for g in grads], axis=2)
        if self.approx == "reduce":
            rows = rows.sum(2, keepdim=True)
        columns = feature_major(rows, self.dtype)
        if self.g_kept is None:
            self._gram(self.g_sum, columns)
            return
        self.g_kept.add(columns)
        if isinstance(self.g_kept, FrequentDirections):
            return
        if _sketch_due(self.g_kept, self.layout.d_out):
            self.g_kept = FrequentDirections(self.g_kept.matrix(), _sketch_rows(self.layout.d_out))
        elif self.g_kept.full:
            self._fold_gradients()

    def input_state(self) -> list[Tensor]:
        return [self.a_sum if self.a_kept is None else self.a_kept.matrix()]

    def state(self) -> list[Tensor]:
        """``Σ ā āᵀ`` (or the kept input rows as columns, or their sketch), ``Σ g gᵀ`` (or the kept gradient rows)
        and the row count."""
        return [*self.input_state(), self.g_sum if self.g_kept is None else self.g_kept.matrix(), self.a_rows]

    def prepare_reduce(self) -> None:
        """Kept rows into dense sums: sums over ranks add, rows would not."""
        if any(isinstance(kept, FrequentDirections) for kept in (self.a_kept, self.g_kept)):
            raise NotImplementedError(f"layer {self.name!r}: a sketched factor cannot be summed over ranks; leave the "
                                      "layer out (layers=) or run on one process")
        if self.a_kept is not None:
            self._fold_inputs()
        if self.g_kept is not None:
            self._fold_gradients()

    def set_state(self, tensors: list[Tensor]) -> None:
        if self.a_kept is not None or self.g_kept is not None:
            raise RuntimeError("set_state takes dense sums: call prepare_reduce first")
        self.a_sum, self.g_sum, self.a_rows = tensors

    def input_factor(self) -> Tensor:
        """``A = Σ ā āᵀ / rows``: ``(width, width)``, its diagonal ``(width,)``, or ``(groups, width, width)``
        (kept rows folded first; a sketched ``A`` is refused: it is not the exact moments)."""
        if isinstance(self.a_kept, FrequentDirections):
            raise ValueError(f"layer {self.name!r}: A is {self.layout.width} wide, too wide to be formed densely "
                             f"(limits.ROW_SKETCH_ELEMENTS), and its rows were sketched; leave the layer out (layers=)")
        if self.a_kept is not None:
            self._fold_inputs()
        if self.kind.diagonal_a:
            return self.a_sum / float(self.a_rows)
        for a in self.a_sum:
            symmetrize_(a)
        A = self.a_sum.div_(float(self.a_rows))
        return A[0] if self.layout.groups == 1 else A

    def _input_rows_factor(self) -> RowFactor:
        """``A = (1/rows) Σ ā āᵀ`` from the kept rows (the bias entry 1 appended to each) or their sketch."""
        if isinstance(self.a_kept, FrequentDirections):
            return _sketched(self.a_kept, 1 / float(self.a_rows))
        return RowFactor(self._with_bias(self.a_kept.matrix()).T, 1 / float(self.a_rows))

    def finalize(self, scale: float, device) -> dict[str, KroneckerBlock]:
        A = self._input_rows_factor() if self.a_kept is not None else self.input_factor()
        if isinstance(self.g_kept, FrequentDirections):
            G = _sketched(self.g_kept, scale)
        elif self.g_kept is not None:
            G = RowFactor(self.g_kept.matrix().T, scale)
        else:
            for g in self.g_sum:
                symmetrize_(g)
            G = self.g_sum.mul_(scale)
            G = G[0] if self.layout.groups == 1 else G
        return {self.name: KroneckerBlock(A.to(device), G.to(device), self.layout, self.name)}


def _sketch_due(kept: KeptColumns, width: int) -> bool:
    """Kept rows of a factor too wide to be dense (``width² > limits.ROW_SKETCH_ELEMENTS``) that have outgrown the
    limit are sketched (``gram.FrequentDirections``) instead of folded."""
    return width**2 > limits.ROW_SKETCH_ELEMENTS and kept.count * width > limits.ROW_SKETCH_ELEMENTS


def _sketch_rows(width: int) -> int:
    """``ℓ``: a full sketch buffer (``2ℓ`` rows) stays within ``limits.ROW_SKETCH_ELEMENTS``."""
    return max(2, limits.ROW_SKETCH_ELEMENTS // (2 * width))


def _sketched(sketch: FrequentDirections, scale: float) -> RowFactor:
    return RowFactor(sketch.matrix().T, scale, sketch=(sketch.count, scale * sketch.shrinkage))


def _keeps_rows(layout: BlockLayout, width: int) -> bool:
    """Whether a factor of this width starts as kept rows (one group, at least ``limits.ROW_FACTOR_MIN_WIDTH``)."""
    return layout.groups == 1 and width >= limits.ROW_FACTOR_MIN_WIDTH


def concat_locations(rows: list[Tensor], axis: int = 1) -> Tensor:
    """Several calls of one layer are further locations (no copy for the usual single call)."""
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=axis)




class PerSampleStatistic(ABC):
    """What a pass over one Kronecker layer's per-sample (per-column) gradients ``∇W̄_{nk} = Σ_t g_{nkt} ā_{nt}ᵀ``
    accumulates (the eigenvalue correction, the Kronecker fit). The gradients may be taken in a basis: ``Vᵀ ∇W̄ U``
    with ``V = output_basis`` ``(groups, d_out, d_out)`` and ``U = input_basis`` ``(groups, width, width)`` (``None``:
    the identity)."""

    output_basis: Tensor | None = None
    input_basis: Tensor | None = None

    @abstractmethod
    def add_outer(self, grads: Tensor, inputs: Tensor) -> None:
        """One location per sample: ``∇W̄_{nk} = g_{nk} ā_nᵀ`` for ``grads`` ``(K, N, groups, d_out)`` and ``inputs``
        ``(N, groups, width)`` — statistics of rank-one matrices, without forming them."""

    @abstractmethod
    def add_matrices(self, matrices: Tensor) -> None:
        """Per-sample gradients ``(K, n, groups, d_out, width)`` of a few samples."""

    @abstractmethod
    def add_token_columns(self, columns: Tensor, tokens: Tensor) -> None:
        """A diagonal ``A`` (one group): column ``tokens[m]`` of one per-sample gradient is ``columns[m]``
        ``(d_out,)``; the other columns are zero."""

    @abstractmethod
    def state(self) -> list[Tensor]: ...

    @abstractmethod
    def set_state(self, tensors: list[Tensor]) -> None: ...

    @abstractmethod
    def finalize(self, scale: float, device, layout: BlockLayout, name: str) -> dict[str, CurvatureBlock]: ...


class PerSampleSums(Accumulator):
    """Feeds a ``PerSampleStatistic`` the per-sample gradients of one Kronecker layer. The rows are taken into the
    statistic's bases once — ``ã = Uᵀ ā``, ``g̃ = Vᵀ g`` — so the per-sample gradient in the basis is ``Σ_t g̃_t ã_tᵀ``;
    with one location per sample the statistic gets the rows themselves; with several the matrices are formed a few
    samples at a time (``limits.WORK_BUFFER_ELEMENTS``), never all at once; for a diagonal ``A`` (token inputs) as the
    sums of ``g̃`` over each sample's occurrences of a token."""

    def __init__(self, kind: KroneckerKind, name: str, module: nn.Module, settings: PassSettings,
                 statistic: PerSampleStatistic):
        self.kind, self.name, self.module, self.statistic = kind, name, module, statistic
        self.layout = kind.layout(module)
        self.dtype = settings.dtype
        self._inputs: Tensor | None = None
        self._rotate_inputs_later = False
        self._count = 0

    @property
    def called(self) -> bool:
        return self._count > 0

    def add_inputs(self, calls: list[LayerCall]) -> None:
        layout = self.layout
        if self.kind.diagonal_a:  # token indices (N, T); the padding row gets no gradient
            indices = concat_locations([c.inputs.reshape(c.inputs.shape[0], -1) for c in calls])
            padding = getattr(self.module, "padding_idx", None)
            self._inputs = indices if padding is None else indices.masked_fill(indices == padding, -1)
        else:
            rows = concat_locations([self.kind.input_rows(self.module, c.inputs) for c in calls]).to(self.dtype)
            n, t = rows.shape[:2]
            rows = rows.reshape(n, t, layout.groups, layout.d_in)
            if layout.has_bias:
                rows = torch.cat([rows, rows.new_ones(n, t, layout.groups, 1)], dim=-1)
            basis = self.statistic.input_basis
            # into the basis now or after the per-sample sum over locations, whichever is cheaper (T·w² vs d·w²)
            self._rotate_inputs_later = basis is not None and t > layout.d_out
            if basis is not None and not self._rotate_inputs_later:
                rows = torch.einsum("ntbi,bij->ntbj", rows, basis)
            self._inputs = rows
        self._count += len(calls)
        for call in calls:
            call.args = call.kwargs = None

    def add_gradients(self, grads: list[list[Tensor]]) -> None:
        layout = self.layout
        rows = concat_locations([self.kind.output_rows(self.module, g[0]) for g in grads], axis=2).to(self.dtype)
        k, n, t = rows.shape[:3]
        rows = rows.reshape(k, n, t, layout.groups, layout.d_out)
        basis = self.statistic.output_basis
        rotate_later = basis is not None and t > layout.width and not self.kind.diagonal_a  # T·d² vs w·d²
        if basis is not None and not rotate_later:
            rows = torch.einsum("kntbo,boj->kntbj", rows, basis)
        if self.kind.diagonal_a:
            self._add_token_columns(rows)
            return
        inputs = self._inputs.expand(n, *self._inputs.shape[1:])  # an unbatched call (expanded output): broadcast
        if t == 1:
            self.statistic.add_outer(rows[:, :, 0], inputs[:, 0])
            return
        size = max(1, limits.WORK_BUFFER_ELEMENTS // max(1, k * layout.groups * layout.d_out * layout.width))
        for start in range(0, n, size):
            # Σ_t g_t ā_tᵀ for a few samples: (k, n, groups, d_out, width) as one batched product per group
            g = rows[:, start : start + size].permute(3, 0, 1, 4, 2)  # (groups, k, n, d_out, t)
            a = inputs[start : start + size].permute(2, 0, 1, 3).unsqueeze(1)  # (groups, 1, n, t, width)
            matrices = (g @ a).permute(1, 2, 0, 3, 4)
            if rotate_later:
                matrices = basis.transpose(1, 2) @ matrices
            if self._rotate_inputs_later:
                matrices = matrices @ self.statistic.input_basis
            self.statistic.add_matrices(matrices)

    def _add_token_columns(self, rows: Tensor) -> None:
        """The per-sample gradient of an embedding puts ``Σ_{t: token v} g̃_t`` in column ``v``."""
        k, n, t, _, d = rows.shape
        tokens = self._inputs.expand(n, t).reshape(-1)
        keep = tokens >= 0
        vocabulary = self.layout.width
        keys = (torch.arange(n, device=tokens.device).repeat_interleave(t) * vocabulary + tokens)[keep]
        unique, inverse = torch.unique(keys, return_inverse=True)
        for column in rows.reshape(k, n * t, d)[:, keep]:
            sums = column.new_zeros(len(unique), d).index_add_(0, inverse, column)
            self.statistic.add_token_columns(sums, unique % vocabulary)

    def input_state(self) -> list[Tensor]:
        return []

    def state(self) -> list[Tensor]:
        return self.statistic.state()

    def set_state(self, tensors: list[Tensor]) -> None:
        self.statistic.set_state(tensors)

    def finalize(self, scale: float, device) -> dict[str, CurvatureBlock]:
        return self.statistic.finalize(scale, device, self.layout, self.name)
