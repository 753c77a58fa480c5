"""``nn.LSTM``, ``nn.GRU``, ``nn.RNN``: the "independent time steps" Kronecker blocks of Martens, Ba & Johnson (ICLR
2018), observed on an unrolled equivalent of the fused recurrent op.

A recurrent module runs as one fused op (hooks see only its input and final states), so for the length of a
curvature pass its forward is replaced by an unrolled equivalent that computes the same function from the module's
very parameters, step by step, and hands every linear map of every step to an observer module the recorder hooks.
The first call is checked against the fused forward (output and final states to ``√ε``); a mismatch skips the module
with the reason. PyTorch's gate orders are kept (LSTM ``i, f, g, o``; GRU ``r, z, n``), as are ``num_layers``
(inter-layer dropout in train mode included), ``bidirectional`` (the reverse direction runs ``t = T−1 … 0``),
``proj_size`` (LSTM), ``batch_first``, unbatched inputs, ``nonlinearity`` (RNN ``tanh``/``relu``), ``bias=False``,
an initial state, and ``PackedSequence`` inputs (each step on the padded batch; finished sequences keep their state,
and only the active rows of a step count as locations).

Blocks (one ``BlockDiagonal`` per module, in the module's public parameter order ``weight_ih_l0, weight_hh_l0,
bias_ih_l0, bias_hh_l0[, weight_hr_l0], weight_ih_l0_reverse, …``; the curvature between its parts dropped). Every
time step is a location (``approx="expand"``: ``A`` averages over ``N·T`` rows, ``G`` sums over them; ``"reduce"``
averages ``ā`` and sums ``g`` over each sample's steps first):

* **LSTM, RNN**, per layer and direction (part ``l0``, ``l0_reverse``, …): the gate pre-activations
  ``z_t = W_ih x_t + b_ih + W_hh h_{t−1} + b_hh`` (``4H`` for LSTM, ``H`` for RNN) are one linear map of
  ``ā_t = [x_t; h_{t−1}; 1; 1]``, so ``[W_ih W_hh b_ih b_hh]`` share one ``G`` (over ``∂/∂z_t``) with ``A`` over
  ``ā_t``. ``b_ih`` and ``b_hh`` have identical Jacobians: ``ā`` carries the constant 1 twice, so their rows and
  columns of ``A`` are equal (without ``bias``: ``ā_t = [x_t; h_{t−1}]``).
* **LSTM with** ``proj_size``: ``h_t = W_hr (o_t ⊙ tanh c_t)`` is a linear map of its own (part ``l0.projection``,
  ``A`` over ``o_t ⊙ tanh c_t``, ``G`` over ``∂/∂h_t``).
* **GRU**: ``n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t−1} + b_hn))`` is not linear in ``[x_t; h_{t−1}]`` jointly,
  so the input-side and hidden-side projections are two Kronecker blocks, as PyTorch computes them: part
  ``l0.input``, ``[W_ih b_ih]`` over ``[x_t; 1]`` with ``G`` over ``∂/∂(W_ih x_t + b_ih)`` (all three gates), and part
  ``l0.hidden``, ``[W_hh b_hh]`` over ``[h_{t−1}; 1]`` with ``G`` over ``∂/∂(W_hh h_{t−1} + b_hh)``; the terms between
  them are dropped.

Exact (each part equal to the GGN block of its parameters) for one sample and one time step; an approximation
otherwise (the steps are taken as independent locations; the cross-part terms are dropped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..blocks.block_diagonal import BlockDiagonal
from ..capture import LayerCall
from ..layout import BlockLayout
from .base import Accumulator, LayerKind, PassSettings, forward_is, outputs_match
from .kronecker import KroneckerKind, KroneckerSums

_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
# observe(part, output, *inputs, active=None) → output: one linear map of one step, handed to the recorder
Observe = Callable[..., Tensor]


@dataclass(frozen=True)
class Part:
    """One Kronecker block of a recurrent module: ``name`` (``l0``, ``l0_reverse.hidden``, …), its ``layout`` (the
    part's own public order: weight matrix row-major, then bias), ``index`` (the module-public positions of the
    part's public positions) and whether ``ā`` carries a second constant 1 among its inputs (``b_ih`` beside
    ``b_hh``)."""

    name: str
    layout: BlockLayout
    index: Tensor
    extra_one: bool = False


def _positions(module: nn.Module) -> dict[str, Tensor]:
    """Public positions of every parameter, shaped like it."""
    positions, start = {}, 0
    for name, p in module.named_parameters(recurse=False):
        positions[name] = torch.arange(start, start + p.numel()).reshape(p.shape)
        start += p.numel()
    return positions


def _suffix(layer: int, direction: int) -> str:
    return f"l{layer}{'_reverse' if direction else ''}"


def parts_of(module: nn.RNNBase) -> list[Part]:
    """The module's parts, per layer and direction in parameter order (module docstring)."""
    positions, parts = _positions(module), []
    gates = 4 if module.mode == "LSTM" else 3 if module.mode == "GRU" else 1
    for layer in range(module.num_layers):
        for direction in range(2 if module.bidirectional else 1):
            s = _suffix(layer, direction)
            w_ih, w_hh = positions[f"weight_ih_{s}"], positions[f"weight_hh_{s}"]
            d_out = gates * module.hidden_size
            if module.mode == "GRU":
                for role, weight in (("input", w_ih), ("hidden", w_hh)):
                    bias = [positions[f"bias_{role[0]}h_{s}"]] if module.bias else []
                    index = torch.cat([weight.flatten(), *bias])
                    parts.append(Part(f"{s}.{role}", BlockLayout(d_out, weight.shape[1], module.bias), index))
                continue
            columns = [w_ih, w_hh] + ([positions[f"bias_ih_{s}"].unsqueeze(1)] if module.bias else [])
            weight = torch.cat(columns, dim=1)  # [W_ih W_hh b_ih]: b_hh is the layout's bias
            index = torch.cat([weight.flatten(), *([positions[f"bias_hh_{s}"]] if module.bias else [])])
            parts.append(Part(s, BlockLayout(d_out, weight.shape[1], module.bias), index, extra_one=module.bias))
            if module.proj_size > 0:
                w_hr = positions[f"weight_hr_{s}"]
                parts.append(Part(f"{s}.projection", BlockLayout(*w_hr.shape, False), w_hr.flatten()))
    return parts


def unrolled(module: nn.RNNBase, x: Tensor, hx, observe: Observe, lengths: Tensor | None = None):
    """The module's function step by step on a sequence-first ``x`` ``(T, N, I)``: ``(output (T, N, D·H_out),
    h_n, c_n or None)``. ``hx`` is ``h_0`` or ``(h_0, c_0)`` (``None``: zeros); ``lengths`` ``(N,)``: the steps of
    each sequence (a padded ``PackedSequence``), past which its state is kept. ``observe(part, output, *inputs,
    active=mask)`` is applied to the output of every linear map (part numbers as in ``parts_of``)."""
    lstm, directions = module.mode == "LSTM", 2 if module.bidirectional else 1
    steps, n = x.shape[:2]
    h_size = module.proj_size or module.hidden_size
    if hx is None:
        h0 = x.new_zeros(module.num_layers * directions, n, h_size)
        c0 = x.new_zeros(module.num_layers * directions, n, module.hidden_size) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
    per_direction = 2 if module.mode == "GRU" or module.proj_size > 0 else 1
    active = None if lengths is None else torch.arange(steps, device=x.device)[:, None] < lengths.to(x.device)
    layer_input, h_n, c_n, part = x, [], [], 0
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            s = _suffix(layer, direction)
            weights = [getattr(module, f"{w}_{s}", None) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            state = layer * directions + direction
            h, c = h0[state], (c0[state] if lstm else None)
            out: list[Tensor | None] = [None] * steps
            for t in reversed(range(steps)) if direction else range(steps):
                mask = None if active is None else active[t]
                new_h, new_c = _step(module, layer_input[t], h, c, weights, part, s, observe, mask)
                if mask is not None:  # a finished (or, in reverse, not yet started) sequence keeps its state
                    new_h = torch.where(mask[:, None], new_h, h)
                    new_c = torch.where(mask[:, None], new_c, c) if lstm else None
                h, c, out[t] = new_h, new_c, new_h
            outputs.append(torch.stack(out))
            h_n.append(h)
            c_n.append(c)
            part += per_direction
        layer_input = torch.cat(outputs, dim=-1)
        if layer < module.num_layers - 1 and module.training and module.dropout > 0:
            layer_input = F.dropout(layer_input, module.dropout, training=True)
    return layer_input, torch.stack(h_n), torch.stack(c_n) if lstm else None


def _step(module: nn.RNNBase, x: Tensor, h: Tensor, c: Tensor | None, weights: list, part: int, s: str,
          observe: Observe, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One time step of one layer and direction in PyTorch's gate order."""
    w_ih, w_hh, b_ih, b_hh = weights
    if module.mode == "GRU":
        gi = observe(part, F.linear(x, w_ih, b_ih), x, active=mask)
        gh = observe(part + 1, F.linear(h, w_hh, b_hh), h, active=mask)
        (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3, dim=-1), gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    gates = observe(part, F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh), x, h, active=mask)
    if module.mode != "LSTM":
        return (torch.tanh(gates) if module.mode == "RNN_TANH" else torch.relu(gates)), None
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if module.proj_size > 0:
        h = observe(part + 1, F.linear(h, getattr(module, f"weight_hr_{s}")), h, active=mask)
    return h, c


def unrolled_forward(module: nn.RNNBase, observe: Observe):
    """A ``forward`` with the module's signature and results, computed by ``unrolled``."""
    def forward(input, hx=None):
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            sequence, (sorted_indices, unsorted_indices) = input, (input.sorted_indices, input.unsorted_indices)
            x, lengths = pad_packed_sequence(input)  # (T, N, I), original sample order
        else:
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            x = x.transpose(0, 1) if module.batch_first and batched else x
            if hx is not None and not batched:
                hx = tuple(t.unsqueeze(1) for t in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        output, h_n, c_n = unrolled(module, x, hx, observe, lengths)
        if packed:  # back to the packed layout: step t holds the first batch_sizes[t] samples in sorted order
            order = sorted_indices if sorted_indices is not None else torch.arange(x.shape[1], device=x.device)
            data = torch.cat([output[t, order[:size]] for t, size in enumerate(sequence.batch_sizes.tolist())])
            output = PackedSequence(data, sequence.batch_sizes, sorted_indices, unsorted_indices)
        elif not batched:
            output, h_n = output.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif module.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if module.mode == "LSTM" else h_n)

    return forward


class StepObserver(nn.Module):
    """The module the recorder hooks: called with one linear map's output and inputs, it returns the output, so that
    the recorded call holds the map's input rows and the gradient at its output (``part``: which map; ``active``: the
    rows of a packed batch that are inside their sequence at this step)."""

    def forward(self, output: Tensor, *inputs: Tensor, part: int, active: Tensor | None = None) -> Tensor:
        return output


class _PartKind(KroneckerKind):
    """The Kronecker bookkeeping of one part: rows arrive as ``(N, T, width)``, gradients as ``(K, N, T, d_out)``."""

    name = "recurrent part"

    def __init__(self, layout: BlockLayout):
        self._layout = layout

    def claims(self, module: nn.Module) -> bool:
        return False

    def layout(self, module: nn.Module) -> BlockLayout:
        return self._layout

    def input_rows(self, module: nn.Module, inputs: Tensor) -> Tensor:
        return inputs

    def output_rows(self, module: nn.Module, grads: Tensor) -> Tensor:
        return grads


class RecurrentSums(Accumulator):
    """The factor sums of every part of one recurrent module, recorded at its ``StepObserver`` (module docstring)."""

    streams = False  # every step is a call: the gradients of a batch arrive together

    def __init__(self, name: str, module: nn.RNNBase, settings: PassSettings):
        self.name, self.module, self.observer = name, module, StepObserver()
        self.parts = parts_of(module)
        self.sums = [KroneckerSums(_PartKind(p.layout), p.name, self.observer, settings) for p in self.parts]
        self.verified = False
        self._order: list[int] = []  # the part of every recorded call, in call order

    def hooked_module(self) -> nn.Module:
        return self.observer

    @property
    def called(self) -> bool:
        return any(s.called for s in self.sums)

    def add_inputs(self, calls: list[LayerCall]) -> None:
        self._order = [call.kwargs["part"] for call in calls]
        rows: dict[int, list[Tensor]] = {}
        masks: dict[int, list[Tensor | None]] = {}
        for call in calls:
            part, inputs = call.kwargs["part"], list(call.args[1:])
            if self.parts[part].extra_one:
                inputs.append(inputs[0].new_ones(*inputs[0].shape[:-1], 1))
            rows.setdefault(part, []).append(torch.cat(inputs, dim=-1))
            masks.setdefault(part, []).append(call.kwargs.get("active"))
            call.args = call.kwargs = None
        for part, part_rows in rows.items():
            self._add_rows(self.sums[part], torch.stack(part_rows, dim=1), masks[part])

    @staticmethod
    def _add_rows(sums: KroneckerSums, rows: Tensor, masks: list[Tensor | None]) -> None:
        """Rows ``(N, T, width)``; with a packed batch only the active rows count (their gradients elsewhere are
        zero, so ``G`` needs no mask)."""
        if all(m is None for m in masks):
            sums.add_rows(rows)
            return
        active = torch.stack(masks, dim=1)  # (N, T)
        if sums.approx == "reduce":  # each sample's mean over its own steps
            weights = active.to(rows.dtype) / active.sum(1, keepdim=True).to(rows.dtype)
            sums.add_rows((weights.unsqueeze(-1) * rows).sum(1, keepdim=True))
        else:
            sums.add_rows(rows[active].unsqueeze(0))

    def add_gradients(self, grads: list[list[Tensor]]) -> None:
        per_part: dict[int, list[Tensor]] = {}
        for part, call_grads in zip(self._order, grads):
            per_part.setdefault(part, []).append(call_grads[0])
        for part, part_grads in per_part.items():
            self.sums[part].add_gradients([[torch.stack(part_grads, dim=2)]])  # (K, N, T, d_out)

    def input_state(self) -> list[Tensor]:
        return [t for s in self.sums for t in s.input_state()]

    def state(self) -> list[Tensor]:
        return [t for s in self.sums for t in s.state()]

    def set_state(self, tensors: list[Tensor]) -> None:
        start = 0
        for s in self.sums:
            count = len(s.state())
            s.set_state(tensors[start : start + count])
            start += count

    def finalize(self, scale: float, device) -> dict[str, BlockDiagonal]:
        blocks = {p.name: s.finalize(scale, device)[p.name] for p, s in zip(self.parts, self.sums)}
        return {self.name: BlockDiagonal(blocks, {p.name: p.index for p in self.parts}, self.name,
                                         "independent time steps")}

    def observe(self, part: int, output: Tensor, *inputs: Tensor, active: Tensor | None = None) -> Tensor:
        return self.observer(output, *inputs, part=part, active=active)

    def checked_forward(self):
        """The unrolled forward; its first call is compared with the fused one (module docstring)."""
        unrolled_call = unrolled_forward(self.module, self.observe)
        fused = type(self.module).forward.__get__(self.module)

        def forward(input, hx=None):
            result = unrolled_call(input, hx)
            if self.verified or (self.module.training and self.module.dropout > 0 and self.module.num_layers > 1):
                return result
            self.verified = True
            with torch.no_grad():
                expected = fused(input, hx)
            if not all(outputs_match(e, r.detach()) for e, r in zip(_leaves(expected), _leaves(result))):
                self.skip_reason = (f"the unrolled {type(self.module).__name__} differs from its fused forward (a "
                                    "variant this library does not know?)")
                return fused(input, hx)
            return result

        return forward


def _leaves(result) -> list[Tensor]:
    output, state = result
    output = output.data if isinstance(output, PackedSequence) else output
    return [output, *(state if isinstance(state, tuple) else (state,))]


class RecurrentKind(LayerKind):
    """``nn.LSTM``, ``nn.GRU``, ``nn.RNN``: a ``BlockDiagonal`` of Kronecker blocks per layer, direction and linear
    map (module docstring)."""

    name = "recurrent"

    def claims(self, module: nn.Module) -> bool:
        return any(isinstance(module, base) and forward_is(module, base) for base in _RECURRENT)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        flags = {p.requires_grad for p in module.parameters(recurse=False)}
        if len(flags) > 1:
            return (f"{type(module).__name__} with some parameters frozen and others not has no recurrent block; "
                    "freeze all or none of them")
        return None

    def per_sample_fallback(self, module: nn.Module) -> bool:
        return False  # vmap has no batching rule for the fused recurrent ops

    def parameter_names(self, module: nn.Module) -> list[str]:
        return [name for name, _ in module.named_parameters(recurse=False)]

    def accumulator(self, name: str, module: nn.Module, settings: PassSettings) -> RecurrentSums:
        return RecurrentSums(name, module, settings)

    @contextlib.contextmanager
    def pass_context(self, accumulators: Mapping[str, RecurrentSums]) -> Iterator[None]:
        """Every module runs its unrolled forward for the pass; the fused one is restored on exit, also on error."""
        try:
            for acc in accumulators.values():
                acc.module.forward = acc.checked_forward()
            yield
        finally:
            for acc in accumulators.values():
                acc.module.__dict__.pop("forward", None)
