"""``compute_kfac``: the curvature blocks of every selected layer, gathered in one streamed pass over the data.

For a Kronecker layer ``z = W̄ ā`` the block of the objective's Hessian (augmented row-major order, see ``layout``)
is approximated by ``G ⊗ A`` with

* ``A = mean of ā āᵀ`` over samples (and, with ``approx="expand"``, over the shared locations);
* ``G = scale · Σ g gᵀ``, ``g`` the output gradients of the *summed* loss backpropagated from a set of
  columns at the model output: the loss-Hessian square-root columns (``curvature="ggn"``), labels sampled
  from the model (``"mc"``), or the true labels (``"empirical"``).

Normalization layers and the parameters no Kronecker kind covers get exact blocks ``scale · Σ u uᵀ`` from their
per-sample gradients ``u`` (``layers.normalization``, ``layers.parameters``). ``scale`` makes every block
approximate the Hessian of exactly the objective ``loss_fn`` computes over the whole data set (``N`` samples,
``τ`` loss terms per sample, ``m`` = ``mc_samples``):

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

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .. import distributed as _distributed
from ..capture import LayerCall, LayerRecorder
from ..data import Data, OutputSelector, call_model, iterate_batches, model_output
from ..layers import Accumulator, Entry, KroneckerKind, KroneckerSums, PassSettings, Selection, select
from ..layers.parameters import full_name
from ..losses import check_batch, loss_spec, terms_per_sample
from ..model_state import compute_dtype, eager_calls, eager_model, no_autocast, preserved_model_state
from .columns import Curvature, column_chunks, one_column_per_pass, output_columns
from .result import KFAC
from .routing import GradientRouter

Approx = Literal["expand", "reduce"]


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
    output: OutputSelector | None = None,
    position_signs: int | None = None,
) -> KFAC:
    """Curvature blocks of every selected layer (see the module docstring; the kinds: ``kfac_hessian.layers``).

    Args:
        model: any ``nn.Module`` (a ``torch.compile``'d one is unwrapped to its eager module); it runs as it is
            (except BatchNorm, see ``batch_norm_eval``) and is left as it was (modes, flags, ``.grad``).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (reduction mean/sum).
        data: an ``(inputs, targets)`` pair or an iterable of pairs, streamed batch by batch; ``inputs`` a tensor
            (``model(inputs)``) or a dict (``model(**inputs)``).
        curvature: ``"ggn"`` (exact Gauss-Newton output Hessian), ``"mc"`` (Monte-Carlo Fisher),
            ``"empirical"`` (empirical Fisher).
        layers: module names (from ``named_modules``), or parameter names for blocks of single parameters;
            ``None`` takes every trainable parameter.
        approx: weight-sharing approximation, ``"expand"`` or ``"reduce"``.
        mc_samples: labels drawn per sample for ``"mc"``.
        seed: makes the pass reproducible: a private generator draws the ``"mc"`` labels, and the model's own
            randomness (dropout in train mode) runs on a forked global RNG seeded with it; the global RNG is left as
            it was.
        device, dtype: where and in which precision the blocks are accumulated and kept (default: the
            model's; float32 for a bfloat16/float16 model). Forward and backward passes run on the model's device,
            under the caller's ``torch.autocast`` if any (our own sums are computed without it).
        progress: show a progress bar (needs ``tqdm``).
        column_chunk: output-gradient columns backpropagated together in one vectorized
            (``is_grads_batched``) pass. ``None``: all of them on CUDA, one per pass on CPU, where the
            vectorized backward of convolutions measured about 2× slower than separate passes
            (``docs/performance.md``). A chunk of ``K`` holds ``K`` copies of the activations' gradients.
            One column per pass (also ``mc`` with one sample and ``empirical`` by default) streams each
            layer's output gradient into its sums inside the backward (``capture.py``): the least memory.
        distributed: ``data`` is this rank's shard of a data set split over an initialized
            ``torch.distributed`` process group; the sums of all ranks are combined in one all-reduce and
            every rank returns the blocks of the whole data set.
        batch_norm_eval: run BatchNorm modules in eval mode (running statistics) during the pass, whatever
            the model's mode: the curvature is then that of the function the trained network computes at
            test time. ``False`` keeps the model's modes (train-mode BatchNorm couples the samples of a
            batch, which no per-sample factorization represents). Modes are restored afterwards.
        per_position: ``"ggn"`` only. Backpropagate every loss-Hessian square-root column at one output
            position at a time (``K·T`` columns instead of ``K``, ``T`` output positions per sample): the exact GGN
            outer products, at ``T`` times the backward passes. No effect with one output position per sample.
        position_signs: ``"ggn"`` only, for outputs with ``T > 1`` positions per sample (no effect otherwise). Joint
            columns — every column applied at all positions at once, ``position_signs=0`` — add cross-position
            products wherever a parameter acts at several positions that reach the output (normalization layers,
            embeddings, key/value projections, ``approx="reduce"``; docs/conventions.md §3): on a small GPT they put
            LayerNorm λ₁ up to 18× too high. ``R > 0``: ``R`` draws of every column with independent random signs at
            each (sample, position), scaled by ``1/√R`` (``K·R`` columns); the cross-position products vanish in
            expectation — an unbiased estimate of the per-position (exact) outer products at ``R/T`` of their passes,
            exact for every draw where there are no cross terms. The default (``None``) is one draw: the cost of the
            joint columns without their bias. The signs come from a private generator seeded with ``seed`` (0 without
            one), so results are reproducible and the global RNG is untouched.
        output: picks the output tensor from what the model returns (default: the tensor itself, or ``.logits``);
            ``kfac_hessian.sequence_logits`` presents language-model logits ``(N, T, V)`` as ``(N, V, T)``.
    """
    _check_settings(curvature, approx, mc_samples, per_position, position_signs)
    spec = loss_spec(loss_fn)
    model = eager_model(model)
    _warn_about_dropout(model, seed)
    selection = select(model, layers)
    settings = _settings(selection, approx, dtype)
    accumulators = _accumulators(selection, settings)
    options = PassOptions(curvature, mc_samples, seed, column_chunk, per_position, position_signs, batch_norm_eval,
                          progress, distributed, output)
    pass_ = _Pass(model, accumulators, selection, settings, layers is not None, output)
    n_samples, scale = stream_pass(model, spec, data, pass_, options)
    return pass_.result(scale, device, curvature, approx, spec, n_samples)


@dataclass(frozen=True)
class PassOptions:
    """How one curvature pass runs (``compute_kfac``'s arguments of the same names)."""

    curvature: str
    mc_samples: int = 1
    seed: int | None = None
    column_chunk: int | None = None
    per_position: bool = False
    position_signs: int | None = None
    batch_norm_eval: bool = True
    progress: bool = False
    distributed: bool = False
    output: OutputSelector | None = None


def stream_pass(model: nn.Module, spec, data: Data, pass_: "_Pass", options: PassOptions) -> tuple[int, float]:
    """Stream ``data`` once through ``model``: every batch's recorded calls to the accumulators' forward half, then the
    output columns backpropagated to them; returns ``(N, scale)``, the number of samples and the factor that turns
    the sums into the objective's curvature (module docstring)."""
    curvature, settings = options.curvature, pass_.settings
    generator = None
    if options.seed is not None and curvature == "mc":
        generator = torch.Generator(settings.device).manual_seed(options.seed)
    signs = _sign_draws(options)
    if signs:  # always seeded, on the CPU: the default estimate is reproducible, and the same on every device
        generator = torch.Generator().manual_seed(options.seed if options.seed is not None else 0)
    stream = one_column_per_pass(options.column_chunk, settings.device, curvature, options.mc_samples)
    router = GradientRouter(pass_.accumulators)
    n_samples, tau = 0, None
    with (
        _seeded_model_randomness(options.seed, settings.device),
        pass_.contexts(),
        preserved_model_state(model, options.batch_norm_eval),
        eager_calls(model),
        LayerRecorder(pass_.hooked(), router.receive_one if stream else None) as recorder,
        torch.enable_grad(),
    ):
        for index, inputs, target in _batches(data, settings.device, options.progress, curvature):
            output = pass_.forward(recorder, index, inputs, target.shape[0])
            check_batch(spec, output, target)
            _require_finite(output, f"model output at batch {index}")
            batch_tau = terms_per_sample(spec, output)
            if tau is not None and batch_tau != tau:
                raise ValueError(f"batch {index} has {batch_tau} loss terms per sample, earlier batches {tau}")
            tau = batch_tau
            n_samples += output.shape[0]
            if not pass_.add_inputs(recorder, index, output.shape[0]):
                continue
            router.start_batch(recorder.calls)
            with no_autocast():  # the columns in (at least) float32, handed to the backward in the output's dtype
                columns = output_columns(spec, curvature, output.detach().to(compute_dtype(output.dtype)), target,
                                         options.mc_samples, generator).to(output.dtype)
            if index == 0 and columns.dim() > 3 and curvature == "ggn" and not (options.per_position or signs):
                warnings.warn(f"joint loss-Hessian columns over {columns[0, 0, 0].numel()} output positions "
                              "(position_signs=0): blocks of parameters that act at several positions carry "
                              "cross-position products (on a small GPT LayerNorm λ₁ up to 18× the exact); the default "
                              "position_signs=1 removes them in expectation at the same cost, per_position=True exactly",
                              RuntimeWarning, stacklevel=3)
            n_chunks, chunks = column_chunks(columns, 1 if stream else options.column_chunk or len(columns),
                                             options.per_position, signs, generator)
            for chunk_index, chunk in enumerate(chunks):
                retain = chunk_index < n_chunks - 1
                if stream:  # the recorder hands each output gradient to the router inside the pass
                    torch.autograd.grad(output, recorder.anchors, chunk[0], retain_graph=retain, allow_unused=True)
                else:
                    _backpropagate_together(output, chunk, recorder.calls, router, retain)
                with recorder.paused(), no_autocast():  # per-sample parameter blocks re-run their modules here
                    router.flush(len(chunk), output.dtype, output.device)
            pass_.check_gradient_sums(index)
            recorder.clear()
    if options.distributed:
        n_samples, tau = _all_reduce_sums(pass_.accumulators, n_samples, tau, settings.device)
    scale = spec.scale(n_samples, tau)
    if curvature == "mc":
        scale /= options.mc_samples
    elif curvature == "empirical" and spec.reduction == "mean":
        scale /= tau
    return n_samples, scale


def input_second_moments(
    model: nn.Module,
    data: Data,
    layers: list[str] | None = None,
    approx: Approx = "expand",
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The ``A`` factors alone, ``A = mean over rows of ā āᵀ`` (as in ``compute_kfac``), from forward passes only,
    for every Kronecker layer with vector inputs (``KroneckerKind.dense_inputs``: not embeddings); ``A`` is
    ``(groups, width, width)`` for a grouped convolution.

    No loss is evaluated (targets in ``data`` are ignored) and nothing is backpropagated: this is the local
    Hessian ``∇²_W ℓ = I ⊗ A`` of a block's back-matching loss (``analyses.local_hessian``) and costs one
    forward pass over the data.
    """
    model = eager_model(model)
    selection = select(model, layers)
    kronecker = [e for e in selection.entries if isinstance(e.kind, KroneckerKind) and e.kind.dense_inputs]
    if layers is not None and len(kronecker) != len(selection.entries):
        other = [n for e in selection.entries if e not in kronecker for n in e.block_names()]
        raise ValueError(f"{other} have no input second moments (only Kronecker layers with vector inputs do)")
    if not kronecker:
        raise ValueError(f"{type(model).__name__} has no Kronecker layer with vector inputs (Linear, Conv, …)")
    selection = Selection(kronecker, selection.skipped)
    settings = _settings(selection, approx, dtype)
    accumulators = _accumulators(selection, settings)
    pass_ = _Pass(model, accumulators, selection, settings, True, output=None)
    with pass_.contexts(), preserved_model_state(model), eager_calls(model), \
            LayerRecorder(pass_.hooked()) as recorder, torch.no_grad():
        for index, inputs, target in iterate_batches(data, settings.device):
            pass_.forward(recorder, index, inputs, target.shape[0], select=False)
            pass_.add_inputs(recorder, index, target.shape[0])
            recorder.clear()
    missing = [acc.name for acc in accumulators.values() if not acc.called]
    if missing:
        raise ValueError(f"layers {missing} were never called in the model's forward pass")
    return {acc.name: acc.input_factor() for acc in accumulators.values()}


def _sign_draws(options: PassOptions) -> int:
    """The sign draws per column (``compute_kfac``'s ``position_signs``; ``None`` is one draw for ``"ggn"`` without
    ``per_position``)."""
    if options.position_signs is not None:
        return options.position_signs
    return 1 if options.curvature == "ggn" and not options.per_position else 0


def _check_settings(curvature: str, approx: str, mc_samples: int, per_position: bool, position_signs: int | None) -> None:
    if curvature not in ("ggn", "mc", "empirical"):
        raise ValueError(f"curvature must be 'ggn', 'mc' or 'empirical', got {curvature!r}")
    if (per_position or position_signs) and curvature != "ggn":
        raise ValueError("per_position and position_signs apply to curvature='ggn' (Monte-Carlo labels are drawn per "
                         "position, and the empirical Fisher is defined with the per-sample gradient)")
    if position_signs is not None and (isinstance(position_signs, bool) or not isinstance(position_signs, int)
                                       or position_signs < 0):
        raise ValueError(f"position_signs must be a non-negative integer (draws) or None, got {position_signs!r}")
    if per_position and position_signs:
        raise ValueError("per_position=True and position_signs are two ways to remove the cross-position terms: pick one")
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")


def _settings(selection: Selection, approx: str, dtype: torch.dtype | None) -> PassSettings:
    if not selection.entries:
        raise ValueError(f"nothing to factor: every parameterized module is skipped: {selection.skipped}")
    entry = selection.entries[0]
    first = getattr(entry.module, entry.local_names[0])
    return PassSettings(approx, dtype or compute_dtype(first.dtype), first.device)


@contextlib.contextmanager
def _seeded_model_randomness(seed: int | None, device: torch.device):
    """With a seed, the model's own random draws (dropout) come from a forked global RNG seeded with it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _warn_about_dropout(model: nn.Module, seed: int | None) -> None:
    active = [name for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training
              and m.p > 0]
    if active:
        warnings.warn(
            f"dropout is active (train mode) in {active[:3]}{' …' if len(active) > 3 else ''}: the curvature is that of a "
            f"random network{'' if seed is None else f' (reproducible with seed={seed})'}; call model.eval() for the "
            "deterministic one", UserWarning, stacklevel=3)


def _accumulators(selection: Selection, settings: PassSettings) -> dict[str, Accumulator]:
    """Accumulators by recorder key (a module with a kind's block and per-sample parameters has two)."""
    return {_key(entry): entry.accumulator(settings) for entry in selection.entries}


def _key(entry: Entry) -> str:
    return entry.module_name if entry.kind is not None else f"{entry.module_name}#parameters"


def _batches(data: Data, device: torch.device, progress: bool, curvature: str):
    batches = iterate_batches(data, device)
    if progress:
        from tqdm.auto import tqdm

        total = len(data) if hasattr(data, "__len__") and not (isinstance(data, tuple) and len(data) == 2) else None
        batches = tqdm(batches, desc=f"KFAC ({curvature})", unit="batch", total=total)
    return batches


class _Pass:
    """The per-pass bookkeeping shared by ``compute_kfac`` and ``input_second_moments``: kind contexts, the forward
    half (recorded calls → input sums, first-batch checks), the finiteness checks and the result."""

    def __init__(self, model: nn.Module, accumulators: dict[str, Accumulator], selection: Selection,
                 settings: PassSettings, named: bool, output: OutputSelector | None, check_formulas: bool = True):
        self.model, self.accumulators, self.selection, self.named = model, accumulators, selection, named
        self.settings, self.output = settings, output
        self.entries = dict(zip(accumulators, selection.entries))
        # a later pass over layers a first one has checked (the eigenvalue correction) does not check again
        self.checked: set[str] = set() if check_formulas else set(accumulators)

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
        """The model's output on one batch, with every call of the hooked modules recorded. A module output
        without the batch axis (leading 1, broadcast over the samples) is expanded to ``n`` so that its per-sample
        gradients are observable; on the first batch that must leave the model output unchanged (checked)."""
        recorder.clear()
        recorder.keep_values = index == 0
        recorder.batch_size = n
        if not select:  # forward half only: what the model returns is not used
            return call_model(self.model, inputs)
        output = model_output(self.model, inputs, self.output)
        if index == 0 and recorder.expanded:
            self._check_expansion(recorder, inputs, output)
        return output

    def _check_expansion(self, recorder: LayerRecorder, inputs, output: Tensor) -> None:
        with recorder.paused(), torch.no_grad():
            plain = model_output(self.model, inputs, self.output)
        if not (isinstance(plain, Tensor) and plain.shape == output.shape and torch.allclose(plain, output.detach())):
            raise ValueError(
                f"{sorted(recorder.expanded)} are called on inputs without the batch axis and their outputs (leading "
                "size 1) are broadcast over the samples; expanding them to the batch, which makes their per-sample "
                "gradients observable, changed the model's output. Call them on batched inputs, or leave them out "
                "with layers=")

    def add_inputs(self, recorder: LayerRecorder, index: int, n: int) -> bool:
        """The forward half of one batch; ``False`` when no recorded module was called."""
        called = False
        for key in list(self.accumulators):
            calls = recorder.calls[key]
            acc = self.accumulators[key]
            if not calls or acc.skip_reason is not None:
                continue
            if key not in self.checked:
                self.checked.add(key)
                acc = self._checked(key, _first_samples(calls[0], n))
            reason = _batch_axis_reason(acc, calls, n)
            if reason is not None:
                acc.skip_reason = reason
                continue
            with recorder.paused(), no_autocast():  # per-sample blocks check themselves by re-running their module
                acc.add_inputs(calls)
            for tensor in acc.input_state():
                # a NaN/Inf anywhere in the rows reaches the sums: checking them costs O(d²), not O(N·T·d)
                _require_finite(tensor, f"A factor of layer {acc.name!r} after batch {index} (its inputs)")
            called = True
        return called

    def _checked(self, key: str, call: LayerCall) -> Accumulator:
        """The accumulator for ``key`` after the first-batch check of its kind's formula: a kind whose formula does
        not reproduce the recorded output hands the module to per-sample parameter blocks."""
        entry = self.entries[key]
        # a non-finite output fails any formula: the finiteness checks that follow say what is wrong
        with torch.no_grad():
            trusted = entry.kind is None or not _finite(call.output_values) or entry.kind.reproduces(entry.module, call)
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
                        _require_finite(tensor, f"curvature sums of layer {acc.name!r} after batch {index} (its output "
                                                "gradients)")

    def result(self, scale: float, device, curvature: str, approx: str, spec, n_samples: int) -> KFAC:
        blocks, skipped, parameter_names = {}, dict(self.selection.skipped), {}
        for key, acc in self.accumulators.items():
            entry = self.entries[key]
            if acc.skip_reason is not None:
                if self.named:
                    raise ValueError(f"layer {acc.name!r}: {acc.skip_reason}")
                skipped.update({name: acc.skip_reason for name in acc.block_names()})
                continue
            if not acc.called:
                if self.named:
                    raise ValueError(f"layer {acc.name!r} was never called in the forward pass")
                skipped.update({name: "never called in the forward pass" for name in acc.block_names()})
                continue
            blocks.update(acc.finalize(scale, device))
            parameter_names.update(entry.parameter_names())
        if not blocks:
            raise ValueError(f"no block could be computed; skipped: {skipped}")
        zero = [name for name, block in blocks.items() if float(block.trace()) == 0.0]
        if zero:
            warnings.warn(f"blocks {zero[:5]}{' …' if len(zero) > 5 else ''} are exactly zero: on this data the outputs do "
                          "not depend on their parameters (e.g. a zero-initialised layer downstream, inputs that are all "
                          "zero, attention over a single key); their spectra are all zeros", RuntimeWarning, stacklevel=3)
        counts, total, tied = _parameter_counts(self.model, parameter_names, skipped)
        return KFAC(blocks, curvature, approx, spec.kind, spec.reduction, n_samples, skipped, parameter_names, counts,
                    total, tied)


def _batch_axis_reason(acc: Accumulator, calls: list[LayerCall], n: int) -> str | None:
    """Why the recorded calls do not fit the per-sample bookkeeping (``None`` when they do): every output leaf must
    carry the batch along axis 0 — or, for ``approx="expand"`` Kronecker sums, where every location is a row, along
    axis 1 (sequence-first layouts)."""
    shapes = [shape for call in calls for shape in call.output_shapes]
    if all(len(s) and s[0] == n for s in shapes):
        return None
    if isinstance(acc, KroneckerSums) and acc.approx == "expand" and all(len(s) > 1 and s[1] == n for s in shapes):
        return None
    bad = next(tuple(s) for s in shapes if not (len(s) and s[0] == n))
    return (f"its output {bad} does not carry the batch of {n} samples along axis 0, so per-sample curvature is not "
            "observable at it")


def _backpropagate_together(output: Tensor, chunk: Tensor, calls: Mapping[str, list[LayerCall]],
                            router: GradientRouter, retain: bool) -> None:
    """One (vectorized when ``len(chunk) > 1``) backward pass of ``chunk`` to all recorded outputs at once."""
    targets = [(key, i, leaf, z) for key, c in calls.items() for i, call in enumerate(c) for leaf, z in enumerate(call.outputs or [])]
    batched = len(chunk) > 1  # a single column skips vmap's batching rules
    grads = torch.autograd.grad(output, [z for *_, z in targets], grad_outputs=chunk if batched else chunk[0],
                                is_grads_batched=batched, allow_unused=True, retain_graph=retain)
    for (key, index, leaf, _), grad in zip(targets, grads):
        if grad is not None:  # None: the call did not influence the output
            router.receive(key, index, leaf, grad if batched else grad.unsqueeze(0))


CHECKED_SAMPLES = 2  # samples of the first batch on which each kind's formula is checked


def _first_samples(call: LayerCall, n: int) -> LayerCall:
    """The call restricted to its first ``CHECKED_SAMPLES`` samples (tensors with the batch axis first)."""
    def cut(value):
        return value[:CHECKED_SAMPLES] if isinstance(value, Tensor) and value.dim() and value.shape[0] == n else value

    return LayerCall(tree_map(cut, call.args), tree_map(cut, call.kwargs), list(call.output_shapes),
                     output_values=tree_map(cut, call.output_values))


def _finite(outputs) -> bool:
    return all(torch.isfinite(leaf).all() for leaf in tree_flatten(outputs)[0] if isinstance(leaf, Tensor))


def _require_finite(tensor: Tensor, what: str) -> None:
    # One reduction first: a NaN or ±Inf entry makes the sum non-finite, and it needs no O(numel) temporary
    # mask; only a non-finite sum (which an overflow of finite entries could also give) is checked entry-wise.
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise FloatingPointError(f"{what} contains NaN or Inf; no spectrum is computed from non-finite values")


def _parameter_counts(model: nn.Module, parameter_names: dict[str, list[str]], skipped: dict[str, str]
                      ) -> tuple[dict[str, int], int, dict[str, list[str]]]:
    """Parameters per block and skipped entry (each parameter counted once, at its first use in that order), the
    model's total, and the tied parameters per module."""
    modules = dict(model.named_modules())
    owned = {full_name(m, p): param for m, module in modules.items() for p, param in module.named_parameters(recurse=False)}
    seen: set[int] = set()
    counts: dict[str, int] = {}
    lines = [*parameter_names.items()]
    for name in skipped:
        own = [full_name(name, p) for p, _ in modules[name].named_parameters(recurse=False)] if name in modules else []
        lines.append((name, own or ([name] if name in owned else [])))
    for name, params in lines:
        count = 0
        for param_name in params:
            param = owned[param_name]
            if id(param) not in seen:
                seen.add(id(param))
                count += param.numel()
        counts[name] = count
    total = sum(p.numel() for p in model.parameters())
    first_owner: dict[int, str] = {}
    tied: dict[str, list[str]] = {}
    for name, module in modules.items():
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in first_owner:
                tied.setdefault(name, []).append(f"{p_name} is {first_owner[id(param)]}")
            else:
                first_owner[id(param)] = full_name(name, p_name)
    return counts, total, tied


def _all_reduce_sums(accumulators: dict[str, Accumulator], n_samples: int, tau: int, device: torch.device) -> tuple[int, int]:
    """Combine every rank's sums and counts in one collective; returns the global ``(N, τ)``."""
    import torch.distributed as dist

    _distributed.require_process_group()
    states = [acc.state() for acc in accumulators.values()]
    counts = torch.tensor([n_samples, tau], dtype=torch.float64, device=device)
    reduced = _distributed.all_reduce_sum([*[t for state in states for t in state], counts])
    position = 0
    for acc, state in zip(accumulators.values(), states):
        acc.set_state([reduced[position + i].to(t.dtype) for i, t in enumerate(state)])
        position += len(state)
    counts = reduced[-1].cpu()
    if int(counts[1]) != tau * dist.get_world_size():
        raise ValueError("ranks disagree on the number of loss terms per sample")
    return int(counts[0]), tau

