"""The sample-axis probe: where the samples are in every recorded tensor, found on the first batch of at least two
samples instead of guessed from sizes.

The model runs twice more on (the first ``limits.SAMPLE_AXIS_PROBE_SAMPLES`` samples of) that batch (in the pass's
grad mode, nothing backpropagated): once as given, once with its samples rotated (sample ``n`` takes the place of
sample ``n+1``; the model's inputs carry the samples on axis 0, the data convention). For every recorded call, every
tensor leaf of its inputs and every differentiable output leaf ``L`` is compared with its counterpart ``L'`` of the
rotated run. The samples are on axis ``a`` exactly when rotating ``L`` along ``a`` gives ``L'`` (and changes ``L``:
the rotation must be visible); as flattened rows ``(N·R, …)`` when rotating ``L``'s blocks of ``R`` rows
(sample-major) or its ``N``-strided entries (position-major) gives ``L'``. Sizes alone decide nothing: a
sequence-first ``(T, N, C)`` tensor with ``T == N`` rotates along axis 1 only, and T5's relative-attention bias
``(T, T, heads)``, which every sample shares, does not rotate at all (the rotation is never copied: its distance
to ``L'`` is summed slice by slice, in float64). The verdicts (``sample_layout.SampleLayout``): one
visible match — ``axis`` / ``rows``; ``L' == L`` — ``shared`` when the rotation would have been visible along every
axis that could hold the samples (or none can), else ``constant``; anything else — ``unknown``. A ``constant`` tensor
(the same for every sample: position ids, masks of ones, zeros) is placed by its shape in one more run on the first
``N − 1`` samples: the axis that shrinks by one sample (or by one sample's rows) holds them; none: ``shared``.

A module called on an unbatched input whose output has leading size 1 (a position embedding broadcast over the
samples) is expanded to the batch for the pass, so that its per-sample gradients are observable, when two more runs
confirm it: the expanded run gives the same model output, and a perturbation of sample 0's copy changes no other
sample's output. Where that fails, expansions to ``R`` rows per sample are tried in the same way, for every ``R`` of a
``rows`` layout found (Swin's relative-position bias, added to the scores of ``N·windows`` windows); a broadcast over
anything else is not expanded and stays ``shared``.

On a batch of at most ``limits.SAMPLE_AXIS_PROBE_SAMPLES`` samples, the probe's run with the pass's own settings
(as given, with the verified expansions) is the pass's forward of that batch, kept with its graph, unless the model
drew random numbers in the probe (dropout in train mode): one forward fewer, the same numbers.

Blind spots (the layouts these give, and what the pass does with them): values equal for every sample — dead ReLUs,
LoRA's zero-initialized ``B``, identical samples, masks of ones — are placed by their shape alone (a tensor whose
shape does not follow the batch, ``(T, T)`` buckets, is ``shared`` then, whatever its size; the order of flattened
rows is not told apart, which the same values make irrelevant); padded positions are per-sample values like others;
dropout in train mode draws new masks in the rotated run, so everything after it is ``unknown``; a model whose
control flow depends on the order of the samples records a different number of calls (``unknown``).
Blocks that need the row→sample map (normalization, per-sample parameters, ``approx="reduce"``, the per-sample
passes of EKFAC and the fit) refuse a layer whose layout is not found, with the probe's reason; ``expand`` Kronecker
blocks need every row only, and refuse only outputs ``shared`` by all samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from .. import limits
from ..capture import LayerCall, LayerRecorder, RecordedRun, differentiable
from ..layers import Accumulator, KroneckerSums
from ..layers.embedding import EmbeddingKind
from ..layers.kronecker import PerSampleSums
from ..layers.linear import LinearKind
from ..layers.transposed_linear import TransposedLinearKind
from ..sample_layout import CONSTANT, LEADING, SHARED, WHOLE, SampleLayout, rows_layout, unknown

Layouts = dict[str, list[tuple[list[SampleLayout], list[SampleLayout]]]]  # key → per call (inputs, outputs)


def _check_model_output(output, rotated_output, n: int) -> None:
    """The model output must rotate along axis 0 with the inputs' samples (the data convention): data that carries
    them on another axis — sequence-first ``(T, N, …)`` inputs, whose rotation along axis 0 rotates the time steps —
    would make every layout the probe finds wrong, so it is refused here. An output the probe cannot place (constant,
    changed along no axis: dropout in train mode) says nothing and passes."""
    for leaf, other in zip(tree_flatten(output)[0], tree_flatten(rotated_output)[0]):
        if not differentiable(leaf) or not isinstance(other, Tensor):
            continue
        layout = classify(leaf, other, n)
        if layout.state in ("axis", "rows") and layout.axis == 0 or layout.state in ("unknown", "constant"):
            continue
        where = "along no axis" if layout.state == "shared" else f"along axis {layout.axis}"
        raise ValueError(f"the model output {tuple(leaf.shape)} does not follow the samples of the data: rotating the "
                         f"inputs' samples along axis 0 rotates it {where}. Every input must carry the samples on "
                         "axis 0 (for sequence-first data (T, N, …), transpose in the data or inside the model)")


def rotated(tensor: Tensor, axis: int, n: int, sample_major: bool = True, rows: bool = False) -> Tensor:
    """``tensor`` with its samples rotated by one along ``axis`` (as whole samples, or as flattened rows)."""
    if not rows:
        return tensor.roll(1, axis)
    if sample_major:
        return tensor.unflatten(axis, (n, -1)).roll(1, axis).flatten(axis, axis + 1)
    return tensor.unflatten(axis, (-1, n)).roll(1, axis + 1).flatten(axis, axis + 1)


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    tolerance = torch.finfo(a.dtype).eps ** 0.5
    a, b = a.contiguous(), b.contiguous()  # flattened as views below
    return _norm64(a, b) <= tolerance * max(_norm64(a), torch.finfo(torch.float32).tiny)


NORM_CHUNK = 1 << 15  # elements per partial norm of ``_norm64``: small enough to stay in the cache


def _norm64(a: Tensor, b: Tensor | None = None) -> float:
    """``‖a − b‖`` (``‖a‖`` without ``b``) accumulated in float64 chunk by chunk: a float64 copy of a whole recorded
    tensor (GPT-2's logits) costs more than the comparison itself, and a float32 sum of 10⁷ squares is off by 10⁻⁴."""
    a = a.reshape(-1)
    b = None if b is None else b.reshape(-1)
    partial = [torch.linalg.vector_norm(a[i : i + NORM_CHUNK] if b is None else a[i : i + NORM_CHUNK]
                                        - b[i : i + NORM_CHUNK], dtype=torch.float64)
               for i in range(0, a.numel(), NORM_CHUNK)]
    return float(torch.linalg.vector_norm(torch.stack(partial))) if partial else 0.0


def _sample_slices(tensor: Tensor, layout: SampleLayout, n: int) -> tuple[Tensor, ...]:
    """The ``n`` samples' slices of ``tensor`` under a candidate ``layout`` (views; ``rotated`` moves slice ``i`` to
    ``i + 1``)."""
    if layout.state != "rows":
        return tensor.unbind(layout.axis)
    if layout.sample_major:
        return tensor.unflatten(layout.axis, (n, -1)).unbind(layout.axis)
    return tensor.unflatten(layout.axis, (-1, n)).unbind(layout.axis + 1)


def _rotation_distance(original: Tensor, other: Tensor, layout: SampleLayout, n: int) -> float:
    """``‖rotated(original) − other‖`` in float64, slice by slice: the rotation is never copied."""
    moved, target = _sample_slices(original, layout, n), _sample_slices(other, layout, n)
    return math.sqrt(sum(_norm64(moved[i - 1] - target[i]) ** 2 for i in range(n)))


def classify(original: Tensor, permuted: Tensor, n: int) -> SampleLayout:
    """The layout of one tensor from its values in the plain and the rotated run (module docstring)."""
    if original.shape != permuted.shape:
        return unknown(f"its shape {tuple(original.shape)} changes to {tuple(permuted.shape)} when the samples are "
                       "rotated")
    candidates = []
    for axis, size in enumerate(original.shape):
        if size == n:
            candidates.append(SampleLayout("axis", axis, samples=n))
        elif size > n and size % n == 0:
            candidates += [SampleLayout("rows", axis, major, samples=n) for major in (True, False)]
    if original.is_floating_point():  # ``_close`` with the norm of ``original`` (a rotation keeps it) computed once
        tolerance = torch.finfo(original.dtype).eps ** 0.5 * max(_norm64(original.contiguous()),
                                                                 torch.finfo(torch.float32).tiny)
        same = _norm64(original.contiguous(), permuted.contiguous()) <= tolerance

        def rotates_to(layout: SampleLayout, other: Tensor) -> bool:
            return _rotation_distance(original, other, layout, n) <= tolerance
    else:
        same = bool(torch.equal(original, permuted))

        def rotates_to(layout: SampleLayout, other: Tensor) -> bool:
            moved = rotated(original, layout.axis, n, layout.sample_major, layout.state == "rows")
            return bool(torch.equal(moved, other))

    visible, matches = [], []
    for layout in candidates:
        match = rotates_to(layout, permuted)
        if not match and not same:  # neither a match nor needed for the shared/constant verdict below
            continue
        if not rotates_to(layout, original):
            visible.append(layout)
            if match:
                matches.append(layout)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        found = ", ".join(m.describe() for m in matches)
        return unknown(f"its values rotate with the samples along several axes ({found})")
    if same:
        return SHARED if len(visible) == len(candidates) else CONSTANT
    return unknown("its values change with the order of the samples, but along no axis as the samples do (dropout in "
                   "train mode, batch statistics, samples mixed?)")


def _batch_map(inputs, n: int, change: Callable[[Tensor], Tensor]):
    """The model's inputs with ``change`` applied to every tensor that has the ``n`` samples on axis 0."""
    def apply(value):
        return change(value) if isinstance(value, Tensor) and value.dim() and value.shape[0] == n else value

    if isinstance(inputs, dict):
        return {key: apply(value) for key, value in inputs.items()}
    return apply(inputs)


def _rotated_inputs(inputs, n: int):
    return _batch_map(inputs, n, lambda value: value.roll(1, 0))


def _first_samples(inputs, n: int, count: int):
    return _batch_map(inputs, n, lambda value: value[:count])


def shrunk_layout(shape: torch.Size, fewer: torch.Size, n: int) -> SampleLayout:
    """The layout of a tensor the rotation cannot place (the same for every sample) from its shape on the batch of
    ``n`` samples and on its first ``n − 1``: the one axis that shrinks by a sample (rows: by a sample's rows), or
    ``shared`` when none does. Every sample's slice is the same, so the order of flattened rows does not matter."""
    changed = [axis for axis, (a, b) in enumerate(zip(shape, fewer)) if a != b] if len(shape) == len(fewer) else None
    if changed == []:
        return SHARED
    if changed is None or len(changed) > 1:
        return unknown("its shape changes in several axes with the number of samples")
    axis = changed[0]
    if shape[axis] == n and fewer[axis] == n - 1:
        return SampleLayout("axis", axis, samples=n)
    if shape[axis] % n == 0 and fewer[axis] == shape[axis] // n * (n - 1):
        return SampleLayout("rows", axis, samples=n)
    return unknown(f"its axis {axis} changes from {shape[axis]} to {fewer[axis]} when a sample is left out")


def _resolve_constants(layouts: Layouts, plain: dict[str, list[LayerCall]], fewer: dict[str, list[LayerCall]],
                       n: int) -> None:
    """Every ``constant`` layout replaced by ``shrunk_layout`` where the run without the last sample has the call."""
    for key, per_call in layouts.items():
        if len(fewer.get(key, [])) != len(per_call):
            continue
        for (ins, outs), call, smaller in zip(per_call, plain[key], fewer[key]):
            for layouts_of, (a, b) in ((ins, (_leaves(call)[0], _leaves(smaller)[0])),
                                       (outs, (_leaves(call)[1], _leaves(smaller)[1]))):
                for i, layout in enumerate(layouts_of):
                    if layout is CONSTANT and i < len(b) and isinstance(b[i], Tensor):
                        layouts_of[i] = shrunk_layout(a[i].shape, b[i].shape, n)


def _recorded(recorder: LayerRecorder, run: Callable, inputs, keep: bool = False
              ) -> tuple[dict[str, list[LayerCall]], object, RecordedRun | None]:
    """The recorded calls and the detached output of one run, and with ``keep`` the run itself (``RecordedRun``)."""
    # in the pass's own grad mode: PyTorch takes fused fast paths without grad (nn.TransformerEncoderLayer in eval
    # mode), which would call other modules than the pass sees
    recorder.clear()
    live = run(inputs)
    output = tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, live)
    kept = recorder.snapshot(live) if keep else None
    calls = {key: list(calls) for key, calls in recorder.calls.items()}
    recorder.clear()
    return calls, output, kept


def _rng_states() -> list[Tensor]:
    """The global RNG states (CPU, and every CUDA device once CUDA is initialized)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return [torch.get_rng_state(), *cuda]


def _leaves(call: LayerCall) -> tuple[list, list[Tensor]]:
    inputs = tree_flatten((call.args, call.kwargs))[0]
    outputs = [leaf for leaf in tree_flatten(call.output_values)[0] if differentiable(leaf)]
    return inputs, outputs


def probe_sample_axes(recorder: LayerRecorder, run: Callable, inputs, n: int, keep: bool = False
                      ) -> tuple[Layouts, RecordedRun | None]:
    """The layouts of every recorded call's input and output leaves on a batch of ``n ≥ 2`` samples, found on its
    first ``limits.SAMPLE_AXIS_PROBE_SAMPLES``; sets ``recorder.expand`` to the verified expansions (module
    docstring). ``run(inputs)`` runs the model.

    With ``keep``, also the probe's run that is the pass's own forward of this batch, when there is one: a run on the
    whole batch (``n ≤ SAMPLE_AXIS_PROBE_SAMPLES``) with the expansions found, recording values, while the model draws
    no random numbers (the global RNG states are the same after the probe): the pass uses it instead of running the
    same function of the same inputs once more. ``None`` otherwise."""
    probed = min(n, limits.SAMPLE_AXIS_PROBE_SAMPLES)
    keep = keep and probed == n
    inputs, n = _first_samples(inputs, n, probed), probed
    states = _rng_states() if keep else []
    previous = recorder.keep_values
    recorder.keep_values, recorder.expand, recorder.batch_size = True, {}, n
    kept: dict[frozenset, RecordedRun] = {}  # runs that may be the pass's forward, by their expansions
    try:
        plain, output, kept[frozenset()] = _recorded(recorder, run, inputs, keep)
        rotated_calls, rotated_output, _ = _recorded(recorder, run, _rotated_inputs(inputs, n))
        _check_model_output(output, rotated_output, n)
        layouts: Layouts = {key: _layouts_of(calls, rotated_calls[key], n) for key, calls in plain.items()}
        del rotated_calls, rotated_output
        if any(layout is CONSTANT for per_call in layouts.values() for ins, outs in per_call for layout in ins + outs):
            try:
                fewer, _, _ = _recorded(recorder, run, _first_samples(inputs, n, n - 1))
            except Exception:  # noqa: BLE001 — a model that cannot run one sample fewer leaves them constant
                fewer = {}
            _resolve_constants(layouts, plain, fewer, n)
        candidates = {(key, i, leaf) for key, per_call in layouts.items() for i, (_, outs) in enumerate(per_call)
                      for leaf, layout in enumerate(outs)
                      if layout is SHARED and _leaves(plain[key][i])[1][leaf].shape[0] == 1}
        if candidates:  # the plain run is not the pass's forward then: its graph is let go
            kept.pop(frozenset())
        verified: dict[tuple[str, int, int], int] = {}
        for rows in (1, *sorted(_rows_per_sample(layouts, plain, n))):  # a sample's copies: 1, or its rows
            rest = candidates - verified.keys()
            if rest:
                found, run_kept = _verified_expansions(recorder, run, inputs, n, output, dict.fromkeys(rest, rows),
                                                       keep)
                verified.update(found)
                if run_kept is not None:
                    kept[frozenset(found.items())] = run_kept
    finally:
        recorder.keep_values = previous
        recorder.clear()
    for key, i, leaf in candidates:
        rows = verified.get((key, i, leaf))
        layouts[key][i][1][leaf] = (
            SampleLayout("shared", reason="its leading size 1 is not broadcast over the samples or their rows alone")
            if rows is None else LEADING if rows == 1 else SampleLayout("rows", 0))
    recorder.expand = verified
    same_draws = keep and all(torch.equal(a, b) for a, b in zip(states, _rng_states()))
    return layouts, kept.get(frozenset(verified.items())) if same_draws else None


def _rows_per_sample(layouts: Layouts, plain: dict[str, list[LayerCall]], n: int) -> set[int]:
    """The rows per sample of every sample-major ``rows`` layout on axis 0 the probe found (Swin's windows)."""
    found = set()
    for key, per_call in layouts.items():
        for (ins, outs), call in zip(per_call, plain[key]):
            inputs, outputs = _leaves(call)
            for layout, leaf in (*zip(ins, inputs), *zip(outs, outputs)):
                if layout.state == "rows" and layout.axis == 0 and layout.sample_major:
                    found.add(leaf.shape[0] // n)
    return found


def _layouts_of(calls: list[LayerCall], rotated_calls: list[LayerCall], n: int
                ) -> list[tuple[list[SampleLayout], list[SampleLayout]]]:
    if len(rotated_calls) == len(calls):
        return [_call_layouts(call, other, n) for call, other in zip(calls, rotated_calls)]
    reason = unknown(f"called {len(calls)} times, but {len(rotated_calls)} times with the samples rotated")
    return [([reason] * len(_leaves(c)[0]), [reason] * len(_leaves(c)[1])) for c in calls]


def _call_layouts(call: LayerCall, other: LayerCall, n: int) -> tuple[list[SampleLayout], list[SampleLayout]]:
    (inputs, outputs), (inputs_p, outputs_p) = _leaves(call), _leaves(other)

    def layout(a, b) -> SampleLayout:
        if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.dim() == 0:
            return SHARED
        return classify(a, b, n)

    if len(inputs) != len(inputs_p) or len(outputs) != len(outputs_p):
        reason = unknown("its inputs or outputs change structure when the samples are rotated")
        return [reason] * len(inputs), [reason] * len(outputs)
    return [layout(a, b) for a, b in zip(inputs, inputs_p)], [layout(a, b) for a, b in zip(outputs, outputs_p)]


def _verified_expansions(recorder: LayerRecorder, run: Callable, inputs, n: int, output,
                         candidates: dict[tuple[str, int, int], int], keep: bool = False
                         ) -> tuple[dict[tuple[str, int, int], int], RecordedRun | None]:
    """The candidates (→ rows per sample) whose expansion to the batch keeps the model output and keeps sample 0's
    copies at sample 0: all together when that holds, else each one alone; with ``keep``, the expanded run of all
    of them together when that holds."""
    holds, kept = _expansion_holds(recorder, run, inputs, n, output, candidates, keep)
    if holds:
        return candidates, kept
    return {c: rows for c, rows in candidates.items()
            if _expansion_holds(recorder, run, inputs, n, output, {c: rows})[0]}, None


def _expansion_holds(recorder: LayerRecorder, run: Callable, inputs, n: int, output,
                     expand: dict[tuple[str, int, int], int], keep: bool = False) -> tuple[bool, RecordedRun | None]:
    plain = [leaf for leaf in tree_flatten(output)[0] if isinstance(leaf, Tensor)]
    recorder.expand = expand
    try:
        _, expanded, kept = _recorded(recorder, run, inputs, keep)
        expanded = [leaf for leaf in tree_flatten(expanded)[0] if isinstance(leaf, Tensor)]
        recorder.perturb = torch.Generator().manual_seed(0)
        perturbed = [leaf for leaf in tree_flatten(_recorded(recorder, run, inputs)[1])[0] if isinstance(leaf, Tensor)]
    except Exception:  # noqa: BLE001 — an expansion the model cannot run (Swin: rows are N·windows) is not one
        return False, None
    finally:
        recorder.expand, recorder.perturb = {}, None
    if len(expanded) != len(plain) or not all(_close(e, p) for e, p in zip(expanded, plain)):
        return False, None
    holds = len(perturbed) == len(plain) and all(
        _close(q[1:], p[1:]) for q, p in zip(perturbed, plain) if q.shape == p.shape and q.dim() and q.shape[0] == n)
    return holds, kept if holds else None


def assign_layouts(calls: dict[str, list[LayerCall]], layouts: Layouts | None, n: int) -> None:
    """Every recorded call's layouts for this batch of ``n`` samples: the probe's, bound to ``n`` (a batch of one:
    ``whole``); a call the probe did not see is ``unknown``."""
    for key, key_calls in calls.items():
        probed = (layouts or {}).get(key, [])
        for index, call in enumerate(key_calls):
            n_inputs, n_outputs = len(tree_flatten((call.args, call.kwargs))[0]), len(call.output_shapes)
            if n == 1:
                call.input_layouts, call.output_layouts = [WHOLE] * n_inputs, [WHOLE] * max(n_outputs, 1)
            elif layouts is None or index >= len(probed):
                missing = unknown("this call was not seen by the sample-axis probe on the first batch")
                call.input_layouts, call.output_layouts = [missing] * n_inputs, [missing] * max(n_outputs, 1)
            else:
                ins, outs = probed[index]
                call.input_layouts = [layout.bound(n) for layout in ins]
                call.output_layouts = [layout.bound(n) for layout in outs]


class SamplesFirst(Accumulator):
    """A Kronecker accumulator that needs each row's sample (``approx="reduce"``, the per-sample passes of EKFAC and
    the fit), fed every call's input and output gradients with the samples on axis 0, where its kind's rows expect
    them. The rows of a linear layer (and of an embedding, ``transformers``' ``Conv1D``) are its leading axes in any
    order, so its samples may be anywhere but the feature axis (sequence-first, flattened rows); other kinds
    (convolutions) need them on axis 0 already. A layer whose samples the probe did
    not find, or cannot be moved there, is skipped with the reason."""

    def __init__(self, inner: Accumulator):
        self.inner, self.name, self.module = inner, inner.name, inner.module
        self.streams = inner.streams
        self.features_last = isinstance(inner.kind, (LinearKind, TransposedLinearKind, EmbeddingKind))
        self._layouts: list[SampleLayout] = []

    def __getattr__(self, name: str):
        # everything else is the wrapped accumulator's (a kind's pass context reads its own accumulators' attributes)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def skip_reason(self) -> str | None:
        return self.inner.skip_reason

    @skip_reason.setter
    def skip_reason(self, reason: str | None) -> None:
        self.inner.skip_reason = reason

    @property
    def called(self) -> bool:
        return self.inner.called

    def _reason(self, layout: SampleLayout, tensor: Tensor) -> str | None:
        if not layout.carries_samples:
            return f"the sample-axis probe did not find the samples of its rows: {layout.describe()}"
        if layout.state == "axis" and layout.axis == 0:
            return None
        if layout.state == "whole" and (self.features_last or tensor.shape[0] == 1):
            return None
        if not self.features_last:
            return (f"a {self.inner.kind.name} layer's rows need the samples on axis 0 of its input, not the "
                    f"{layout.describe()}")
        if layout.axis >= tensor.dim() - 1:
            return f"the sample-axis probe found the {layout.describe()}, its feature axis"
        return None

    def _first(self, tensor: Tensor, layout: SampleLayout, lead: int) -> Tensor:
        if layout.state == "axis" and layout.axis == 0:
            return tensor
        if layout.state == "whole" and not self.features_last:
            return tensor
        return layout.samples_first(tensor, lead)

    def add_inputs(self, calls: list[LayerCall]) -> None:
        self._layouts = []
        for call in calls:
            layout = rows_layout(call.input_layouts[0], call.output_layouts)
            reason = self._reason(layout, call.inputs)
            if reason is not None:
                self.skip_reason = reason
                return
            self._layouts.append(layout)
        for call, layout in zip(calls, self._layouts):
            if layout.fits(call.inputs):
                call.args = (self._first(call.inputs, layout, 0), *call.args[1:])
            elif layout.state == "rows":  # an unbatched call whose output was expanded to every sample's rows
                self.skip_reason = ("its unbatched input is broadcast over every sample's rows, which these "
                                    "per-sample sums do not take")
                return
            # else an unbatched call broadcast over the samples, as the sums take it
        self.inner.add_inputs(calls)

    def add_gradients(self, grads: list[list[Tensor]]) -> None:
        self.inner.add_gradients([[self._first(g[0], layout, 1), *g[1:]] for g, layout in zip(grads, self._layouts)])

    def block_names(self) -> list[str]:
        return self.inner.block_names()

    def hooked_module(self):
        return self.inner.hooked_module()

    def input_state(self) -> list[Tensor]:
        return self.inner.input_state()

    def state(self) -> list[Tensor]:
        return self.inner.state()

    def set_state(self, tensors: list[Tensor]) -> None:
        self.inner.set_state(tensors)

    def finalize(self, scale: float, device):
        return self.inner.finalize(scale, device)


def needs_sample_map(acc: Accumulator) -> bool:
    """Whether a Kronecker accumulator needs each row's sample (``SamplesFirst``)."""
    return isinstance(acc, PerSampleSums) or (isinstance(acc, KroneckerSums) and acc.approx == "reduce")
