"""The one implementation of a pass over the data, used by ``compute_kfac``, EKFAC's correction, the Kronecker fit and
``input_second_moments``.

A ``Pass`` holds the accumulators of the selected layers (``kfac_hessian.layers``) and does the per-batch
bookkeeping: the kinds' contexts, the forward half (recorded calls → input sums, first-batch formula checks), the
finiteness checks and, at the end, the blocks. ``stream_pass`` streams the data through the model once: each batch's
forward half, then the output columns (``columns``) backpropagated to the recorded layers, whose gradients reach the
accumulators through a ``GradientRouter``. It returns the number of samples ``N`` and the reduction scale that turns
the sums into the curvature of the objective ``loss_fn`` computes over the whole data set (``N`` samples,
``τ`` counted loss terms per sample — fewer than the positions where targets equal ``ignore_index`` —,
``m = mc_samples``):

=============  =======================  ==========
curvature      reduction="mean"          "sum"
=============  =======================  ==========
``ggn``        ``1/(N τ)``               ``1``
``mc``         ``1/(N τ m)``             ``1/m``
``empirical``  ``1/(N τ²)``              ``1``
=============  =======================  ==========

(the empirical Fisher uses the per-sample loss ``ℓ_n`` = ``loss_fn`` on sample ``n`` alone, whose gradient is ``1/τ``
that of the summed loss under "mean").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as _distributed
from ..blocks import CurvatureBlock
from ..capture import LayerCall, LayerRecorder
from ..data import Data, OutputSelector, call_model, iterate_batches, model_output
from ..layers import Accumulator, Entry, PassSettings, Selection
from ..losses import LossSpec, check_batch, counted_terms, terms_per_sample
from ..model_state import compute_dtype, eager_calls, no_autocast, preserved_model_state
from .checks import all_finite, first_samples, require_finite, sample_axis_reason, warn_about_joint_columns
from .columns import column_chunks, one_column_per_pass, output_columns
from .options import PassOptions
from .progress import tracked
from .routing import GradientRouter, backpropagate_together
from .sample_axis import Layouts, SamplesFirst, assign_layouts, needs_sample_map, probe_sample_axes


def pass_settings(selection: Selection, approx: str, dtype: torch.dtype | None) -> PassSettings:
    """How the sums are kept: ``approx``, ``dtype`` (default: the model's, float32 for a low-precision model) and
    the device of the first selected parameter."""
    if not selection.entries:
        raise ValueError(f"nothing to factor: every parameterized module is skipped: {selection.skipped}")
    entry = selection.entries[0]
    first = entry.module.get_parameter(entry.local_names[0])  # a dotted name for a parametrization original
    return PassSettings(approx, dtype or compute_dtype(first.dtype), first.device)


def accumulators_for(selection: Selection, settings: PassSettings) -> dict[str, Accumulator]:
    """Accumulators by recorder key (a module with a kind's block and per-sample parameters has two)."""
    return {recorder_key(entry): entry.accumulator(settings) for entry in selection.entries}


def recorder_key(entry: Entry) -> str:
    return entry.module_name if entry.kind is not None else f"{entry.module_name}#parameters"


class Pass:
    """The accumulators of one pass and the bookkeeping around them (module docstring). ``named``: the layers were
    named by the user, so a layer that cannot be factored is an error rather than a skipped entry;
    ``check_formulas=False``: a later pass over layers a first one has checked (EKFAC, the fit) does not check
    again."""

    def __init__(self, model: nn.Module, accumulators: dict[str, Accumulator], selection: Selection,
                 settings: PassSettings, named: bool, output: OutputSelector | None, check_formulas: bool = True):
        self.model, self.selection, self.named = model, selection, named
        self.accumulators = {key: SamplesFirst(acc) if needs_sample_map(acc) else acc
                             for key, acc in accumulators.items()}
        self.settings, self.output = settings, output
        self.entries = dict(zip(accumulators, selection.entries))
        self.checked: set[str] = set() if check_formulas else set(accumulators)
        self.layouts: Layouts | None = None  # the sample-axis probe's, from the first batch of two samples or more

    def hooked(self) -> dict[str, nn.Module]:
        return {key: acc.hooked_module() for key, acc in self.accumulators.items()}

    def contexts(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        by_kind: dict[int, tuple] = {}
        for key, entry in self.entries.items():
            if entry.kind is not None:
                by_kind.setdefault(id(entry.kind), (entry.kind, {}))[1][key] = self.accumulators[key]
        for kind, accumulators in by_kind.values():
            stack.enter_context(kind.pass_context(accumulators))
        return stack

    def forward(self, recorder: LayerRecorder, index: int, inputs, n: int, select: bool = True):
        """The model's output on one batch, with every call of the hooked modules recorded. On the first batch of
        two samples or more the sample-axis probe runs first (``sample_axis``): where the samples are in every
        recorded tensor, and which unbatched outputs (leading size 1, broadcast over the samples) are expanded to the
        batch so that their per-sample gradients are observable."""
        def run(batch):
            return model_output(self.model, batch, self.output) if select else call_model(self.model, batch)

        kept = None
        if self.layouts is None and n > 1:
            self.layouts, kept = probe_sample_axes(recorder, run, inputs, n, keep=index == 0)
        recorder.clear()
        recorder.keep_values = index == 0
        recorder.batch_size = n
        if kept is not None:  # the probe ran this very forward pass (same inputs, expansions, no random draws)
            recorder.restore(kept)
            return kept.output
        return run(inputs)

    def add_inputs(self, recorder: LayerRecorder, index: int, n: int) -> bool:
        """The forward half of one batch; ``False`` when no recorded module was called."""
        called = False
        assign_layouts(recorder.calls, self.layouts, n)
        for key in list(self.accumulators):
            calls = recorder.calls[key]
            acc = self.accumulators[key]
            if not calls or acc.skip_reason is not None:
                continue
            if key not in self.checked:
                self.checked.add(key)
                acc = self._checked(key, first_samples(calls[0]))
            reason = sample_axis_reason(acc, calls)
            if reason is not None:
                acc.skip_reason = reason
                continue
            with recorder.paused(), no_autocast():  # per-sample blocks check themselves by re-running their module
                acc.add_inputs(calls)
            for tensor in acc.input_state():
                # a NaN/Inf anywhere in the rows reaches the sums: checking them costs O(d²), not O(N·T·d)
                require_finite(tensor, f"A factor of layer {acc.name!r} after batch {index} (its inputs)")
            called = True
        return called

    def _checked(self, key: str, call: LayerCall) -> Accumulator:
        """The accumulator for ``key`` after the first-batch check of its kind's formula: a kind whose formula does
        not reproduce the recorded output hands the module to per-sample parameter blocks."""
        entry = self.entries[key]
        # a non-finite output fails any formula: the finiteness checks that follow say what is wrong
        with torch.no_grad():
            trusted = (entry.kind is None or not all_finite(call.output_values)
                       or entry.kind.reproduces(entry.module, call))
        if trusted:
            return self.accumulators[key]
        replacement = Entry(None, entry.module_name, entry.module, entry.local_names,
                            f"{type(entry.module).__name__} whose output differs from the {entry.kind.name} formula "
                            "(an overridden forward or a forward hook?)")
        self.entries[key] = replacement
        self.accumulators[key] = replacement.accumulator(self.settings)
        return self.accumulators[key]

    def check_gradient_sums(self, index: int) -> None:
        for acc in self.accumulators.values():
            if acc.called and acc.skip_reason is None:
                checked = acc.input_state()  # already checked after the forward half
                for tensor in acc.state():
                    if not any(tensor is t for t in checked):
                        require_finite(tensor, f"curvature sums of layer {acc.name!r} after batch {index} (its "
                                               "output gradients)")

    def finalize(self, scale: float, device) -> tuple[dict[str, CurvatureBlock], dict[str, str], dict[str, list[str]]]:
        """``(blocks, skipped, parameter_names)``: the scaled blocks of every accumulator that was called and fits,
        every parameterized entry left out with why, and the parameters of every block."""
        blocks, skipped, parameter_names = {}, dict(self.selection.skipped), {}
        for key, acc in self.accumulators.items():
            reason = acc.skip_reason if acc.skip_reason is not None else (
                None if acc.called else "never called in the forward pass")
            if reason is not None:
                if self.named:
                    raise ValueError(f"layer {acc.name!r}: {reason}" if acc.skip_reason is not None
                                     else f"layer {acc.name!r} was {reason}")
                skipped.update({name: reason for name in acc.block_names()})
                continue
            blocks.update(acc.finalize(scale, device))
            parameter_names.update(self.entries[key].parameter_names())
        if not blocks:
            raise ValueError(f"no block could be computed; skipped: {skipped}")
        return blocks, skipped, parameter_names


def stream_pass(model: nn.Module, spec: LossSpec, data: Data, pass_: Pass, options: PassOptions
                ) -> tuple[int, float, int]:
    """Stream ``data`` once through ``model``: every batch's recorded calls to the accumulators' forward half, then the
    output columns backpropagated to them; returns ``(N, scale, T)`` (module docstring), ``T`` the output positions
    per sample (1 for outputs without a position axis)."""
    curvature, settings = options.curvature, pass_.settings
    generator = None
    if options.seed is not None and curvature == "mc":
        generator = torch.Generator(settings.device).manual_seed(options.seed)
    signs = options.sign_draws
    if signs or options.column_signs:  # always seeded, on the CPU: reproducible, and the same on every device
        generator = torch.Generator().manual_seed(options.seed if options.seed is not None else 0)
    stream = one_column_per_pass(options.column_chunk, settings.device, curvature, options.mc_samples)
    router = GradientRouter(pass_.accumulators)
    n_samples, tau, positions, counted = 0, None, 1, 0
    with (
        seeded_model_randomness(options.seed, settings.device),
        pass_.contexts(),
        preserved_model_state(model, options.batch_norm_eval),
        eager_calls(model),
        LayerRecorder(pass_.hooked(), router.receive_one if stream else None) as recorder,
        torch.enable_grad(),
    ):
        for index, inputs, target in batches(data, settings.device, options.progress, f"KFAC ({curvature})"):
            output = pass_.forward(recorder, index, inputs, target.shape[0])
            check_batch(spec, output, target)
            require_finite(output, f"model output at batch {index}")
            batch_tau = terms_per_sample(spec, output)
            if tau is not None and batch_tau != tau:
                raise ValueError(f"batch {index} has {batch_tau} loss terms per sample, earlier batches {tau}")
            tau = batch_tau
            n_samples += output.shape[0]
            counted += counted_terms(spec, output, target)  # the loss's own count: less its ignored targets
            if not pass_.add_inputs(recorder, index, output.shape[0]):
                continue
            router.start_batch(recorder.calls)
            with no_autocast():  # the columns in (at least) float32, handed to the backward in the output's dtype
                columns = output_columns(spec, curvature, output.detach().to(compute_dtype(output.dtype)), target,
                                         options.mc_samples, generator)
            positions = math.prod(output.shape[2:]) if output.dim() > 2 else 1
            if (index == 0 and positions > 1 and curvature == "ggn"
                    and not (options.per_position or signs or options.column_signs)):
                warn_about_joint_columns(positions)
            n_chunks, chunks = column_chunks(columns, output.shape, 1 if stream else options.column_chunk,
                                             options.per_position, signs, options.column_signs, generator)
            if options.progress and n_chunks >= CHUNKS_WORTH_A_BAR:
                chunks = tracked(chunks, f"batch {index}: backward passes", n_chunks, "chunk", leave=False)
            for chunk_index, chunk in enumerate(chunks):
                chunk = chunk.to(output.dtype)
                retain = chunk_index < n_chunks - 1
                if stream:  # the recorder hands each output gradient to the router inside the pass
                    torch.autograd.grad(output, recorder.anchors, chunk[0], retain_graph=retain, allow_unused=True)
                else:
                    backpropagate_together(output, chunk, recorder.calls, router, retain)
                with recorder.paused(), no_autocast():  # per-sample parameter blocks re-run their modules here
                    router.flush(len(chunk), output.dtype, output.device)
            pass_.check_gradient_sums(index)
            recorder.clear()
    if options.distributed:
        n_samples, tau, counted = all_reduce_sums(pass_.accumulators, n_samples, tau, counted, settings.device)
    counted_per_sample = counted / n_samples if n_samples else 0  # τ of the scale: T, or fewer with ignored targets
    scale = spec.scale(n_samples, counted_per_sample)
    if curvature == "mc":
        scale /= options.mc_samples
    elif curvature == "empirical" and spec.reduction == "mean":
        scale /= counted_per_sample
    return n_samples, scale, positions


CHUNKS_WORTH_A_BAR = 32  # backward chunks in one batch from which they get a progress bar of their own (fewer: a
# flash of nested bars in every batch of a small model, as the demo's 9 classes gave)


def forward_pass(pass_: Pass, data: Data) -> None:
    """The forward half alone over ``data`` (no loss, no backward): the accumulators' input sums."""
    with pass_.contexts(), preserved_model_state(pass_.model), eager_calls(pass_.model), \
            LayerRecorder(pass_.hooked()) as recorder, torch.no_grad():
        for index, inputs, target in iterate_batches(data, pass_.settings.device):
            pass_.forward(recorder, index, inputs, target.shape[0], select=False)
            pass_.add_inputs(recorder, index, target.shape[0])
            recorder.clear()


@contextlib.contextmanager
def seeded_model_randomness(seed: int | None, device: torch.device):
    """With a seed, the model's own random draws (dropout) come from a forked global RNG seeded with it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def batches(data: Data, device: torch.device, progress: bool, description: str) -> Iterator:
    """``(index, inputs, targets)`` of every batch on ``device``, with a progress bar when asked for."""
    stream = iterate_batches(data, device)
    if not progress:
        return stream
    total = len(data) if hasattr(data, "__len__") and not (isinstance(data, tuple) and len(data) == 2) else None
    return tracked(stream, description, total, "batch")


def all_reduce_sums(accumulators: dict[str, Accumulator], n_samples: int, tau: int, counted: int,
                    device: torch.device) -> tuple[int, int, int]:
    """Combine every rank's sums and counts in one collective; returns the global ``(N, τ, counted terms)``."""
    _distributed.require_process_group()
    for acc in accumulators.values():
        acc.prepare_reduce()
    states = [acc.state() for acc in accumulators.values()]
    counts = torch.tensor([n_samples, tau, counted], dtype=torch.float64, device=device)
    reduced = _distributed.all_reduce_sum([*[t for state in states for t in state], counts])
    position = 0
    for acc, state in zip(accumulators.values(), states):
        acc.set_state([reduced[position + i].to(t.dtype) for i, t in enumerate(state)])
        position += len(state)
    counts = reduced[-1].cpu()
    if int(counts[1]) != tau * dist.get_world_size():
        raise ValueError("ranks disagree on the number of loss terms per sample")
    return int(counts[0]), tau, int(counts[2])
