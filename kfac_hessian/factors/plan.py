"""The cost of a curvature pass, known before it runs: ``plan(model, loss_fn, data, **options)``.

From the model's structure, one forward pass of the first batch and the options, without any backward pass:

* **columns and backward passes per batch** — ``"ggn"``: ``K`` loss-Hessian square-root columns (``K`` = classes − 1
  for cross-entropy, the output width otherwise), ``K·T`` with ``per_position``, ``K·R`` with ``position_signs=R``,
  ``R`` with ``column_signs=R``; ``"mc"``: ``mc_samples``; ``"empirical"``: 1. A backward pass carries one column on
  the CPU by default, ``column_chunk`` columns otherwise (``PassOptions``).
* **every factor's size and representation** — a Kronecker layer's ``A`` (width ``w``) over ``r_A`` input rows and
  ``G`` (``d_out``) over ``r_G`` output-gradient rows (``r = N·T`` for ``approx="expand"``, ``N`` for ``"reduce"``,
  times the columns for ``G``, over the whole data set): kept as rows ``(r, w)`` while ``r < w`` (one group, at least
  ``limits.ROW_FACTOR_MIN_WIDTH`` wide), dense ``(w, w)`` per group otherwise; an embedding's ``A`` is a diagonal
  ``(w,)``; every other block the sums its accumulator holds (measured on the ``meta`` device: nothing allocated).
* **the peak memory** beyond what exists when the pass starts — the forward's saved tensors (parameters and inputs
  excluded), the recorded layer outputs, the same again on the first batch's probed samples (the sample-axis
  probe's further runs on ``limits.SAMPLE_AXIS_PROBE_SAMPLES`` samples: with it the estimate came within 11 % of the
  measured peak of live tensors on GPT-2 with 2 and 12 layers and a Llama-style model, ``docs/results/scale.md``),
  the columns of one chunk and the
  loss-Hessian pieces they come from, the gradients of one backward chunk (a chunk of ``k > 1`` columns holds ``k``
  gradients of every recorded output) and the factors.
* **the time in forward+backward passes over the same data** — in multiply-adds of one batch, with ``F`` the
  forward's (the Kronecker layers' products): ``(F + P·F + Gram) / 3F``, ``P`` backward passes (each about one
  forward: it computes input gradients only) and the Gram sums ``Σ 2·r·w²`` of every dense factor (a copy of the
  rows of a row-kept one), plus the first batch's further work (the plan's forward, the sample-axis probe, the
  formula checks) and the finalization, counted in forwards (``_first_batch_forwards``); the seconds follow from
  the timed forward (a forward+backward ≈ 3 forwards).

``compute_kfac`` plans first and refuses a plan above its budgets (``PassOptions.memory_budget``, by default the
memory available; ``PassOptions.time_budget`` in seconds, by default ``limits.PASS_SECONDS_LIMIT``) with
``PlanExceedsBudget``,
whose message names the cheaper choices, before any backward pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import limits
from ..data import Data, iterate_batches, model_output
from ..layers import KroneckerSums, PassSettings, Selection, select
from ..losses import HessianSqrt, LossSpec, loss_spec
from ..model_state import compute_dtype, eager_calls, eager_model, preserved_model_state
from .columns import column_count, one_column_per_pass
from .options import Approx, Curvature, PassOptions, check_approx
from .stream import Pass, accumulators_for, pass_settings

GIB = 2**30


class PlanExceedsBudget(ValueError):
    """A pass whose plan exceeds the memory or time it may use; ``plan`` is the ``Plan``, the message names the
    cheaper choices."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class FactorPlan:
    """One factor (``"A"``, ``"G"``) or other block (``"block"``) as the pass keeps it: ``representation`` is
    ``"dense"`` ``(w, w)``, ``"rows"`` ``(r, w)``, ``"diagonal"`` ``(w,)`` or ``"sums"`` (an accumulator's own
    tensors); ``shape`` per group; ``bytes`` over all groups."""

    block: str
    factor: str
    representation: str
    shape: tuple[int, ...]
    groups: int
    bytes: int


@dataclass(frozen=True)
class Plan:
    """The cost of one ``compute_kfac`` pass (module docstring). Byte counts are beyond what exists when the pass
    starts; ``batches`` is ``None`` when the data does not say how many batches it has (then the rows, and with them
    the row-kept factors, are those of one batch: a lower bound)."""

    options: PassOptions
    batches: int | None
    samples_per_batch: int
    positions: int
    columns_per_batch: int
    column_chunk: int
    backward_passes_per_batch: int
    factors: tuple[FactorPlan, ...]
    activation_bytes: int
    recorded_bytes: int
    column_bytes: int
    backward_bytes: int
    time_units: float
    seconds_per_unit: float
    memory_budget: int | None
    time_budget: float
    cheaper: tuple[str, ...] = ()

    @property
    def factor_bytes(self) -> int:
        return sum(f.bytes for f in self.factors)

    @property
    def first_batch_bytes(self) -> int:
        """What the first batch holds beyond the others: one more forward's activations and recorded tensors on the
        ``limits.SAMPLE_AXIS_PROBE_SAMPLES`` samples the sample-axis probe runs (``factors.sample_axis``: on a batch of
        that many or fewer, its run that becomes the pass's forward is alive while it runs the model again)."""
        share = min(self.samples_per_batch, limits.SAMPLE_AXIS_PROBE_SAMPLES) / self.samples_per_batch
        return round((self.activation_bytes + self.recorded_bytes) * share)

    @property
    def peak_bytes(self) -> int:
        """The peak estimate: activations, recorded outputs, the first batch's second forward, columns, one backward
        chunk's gradients, factors."""
        return (self.activation_bytes + self.recorded_bytes + self.first_batch_bytes + self.column_bytes
                + self.backward_bytes + self.factor_bytes)

    @property
    def seconds(self) -> float:
        """The time estimate in seconds (``time_units`` times a forward+backward of the data, from the timed
        forward)."""
        return self.time_units * self.seconds_per_unit

    @property
    def over_budget(self) -> list[str]:
        """What exceeds the budgets, in words (empty: the plan fits)."""
        reasons = []
        if self.memory_budget is not None and self.peak_bytes > self.memory_budget:
            reasons.append(f"its peak memory ≈ {_size(self.peak_bytes)} exceeds the budget of "
                           f"{_size(self.memory_budget)}")
        if self.seconds > self.time_budget:
            reasons.append(f"it would take ≈ {_duration(self.seconds)} (≈ {self.time_units:,.0f} forward+backward "
                           f"passes of the data), above time_budget={self.time_budget:,.6g} s")
        return reasons

    def check(self) -> None:
        """Raise ``PlanExceedsBudget`` when the plan exceeds a budget, naming the cheaper choices."""
        reasons = self.over_budget
        if reasons:
            raise PlanExceedsBudget(
                f"compute_kfac refuses this pass before any backward pass: {' and '.join(reasons)} "
                f"({self.summary_line()}). Cheaper: {'; '.join(self.cheaper)}. (memory_budget= and time_budget= "
                "set the budgets; kfac_hessian.plan(...) prints the whole plan.)", self)

    def summary_line(self) -> str:
        return (f"curvature={self.options.curvature!r}: {self.columns_per_batch:,} column"
                f"{'s' if self.columns_per_batch != 1 else ''} per batch in {self.backward_passes_per_batch:,} "
                f"backward pass{'es' if self.backward_passes_per_batch != 1 else ''}")

    def __str__(self) -> str:
        batches = f"{self.batches:,}" if self.batches is not None else "≥ 1 (unknown)"
        lines = [
            f"Plan of a KFAC pass, {self.summary_line()}",
            f"  data: {batches} batch(es) of {self.samples_per_batch:,} samples × {self.positions:,} output positions",
            f"  time: ≈ {self.time_units:,.1f} forward+backward passes of the data (≈ {_duration(self.seconds)}, "
            "from one timed forward)",
            f"  peak memory: ≈ {_size(self.peak_bytes)} = activations {_size(self.activation_bytes)} + recorded "
            f"outputs {_size(self.recorded_bytes)} + first batch {_size(self.first_batch_bytes)} + columns "
            f"{_size(self.column_bytes)} + backward "
            f"{_size(self.backward_bytes)} + factors {_size(self.factor_bytes)}; budget "
            f"{_size(self.memory_budget) if self.memory_budget is not None else 'none'}",
            "",
            "| block | factor | representation | shape (per group) | groups | MiB |",
            "|---|---|---|---|---|---|",
        ]
        largest = sorted(self.factors, key=lambda f: -f.bytes)
        for f in largest[:FACTOR_ROWS]:
            shape = " × ".join(f"{s:,}" for s in f.shape)
            lines.append(f"| {f.block} | {f.factor} | {f.representation} | {shape} | {f.groups} | "
                         f"{f.bytes / 2**20:,.3g} |")
        if len(largest) > FACTOR_ROWS:
            rest = largest[FACTOR_ROWS:]
            lines.append(f"| … {len(rest)} more | | | | | {sum(f.bytes for f in rest) / 2**20:,.3g} |")
        verdict = self.over_budget
        lines += ["", "fits the budgets" if not verdict else "exceeds: " + "; ".join(verdict)]
        if self.cheaper:
            lines.append("cheaper: " + "; ".join(self.cheaper))
        return "\n".join(lines)


# The first batch's work besides its own forward and backward passes, in forwards of its samples (profiled on GPT-2
# with 2 layers, 2 × 64 tokens): the plan's forward (1), the sample-axis probe's runs and comparisons on
# ``limits.SAMPLE_AXIS_PROBE_SAMPLES`` samples (about 8: ``factors.sample_axis``; one less on a batch of that many
# samples or fewer, whose probe run is the pass's own forward), the kinds' formula checks on
# ``limits.CHECKED_SAMPLES`` samples (about 1.5), and the blocks' finalization once per pass (about 1).
PLAN_FORWARDS, PROBE_FORWARDS, CHECK_FORWARDS, FINALIZE_FORWARDS = 1.0, 8.0, 1.5, 1.0


def _first_batch_forwards(n: int) -> float:
    """The first batch's further work in forwards of a batch of ``n`` samples (``PLAN_FORWARDS`` …)."""
    probed = min(n, limits.SAMPLE_AXIS_PROBE_SAMPLES)
    return (PLAN_FORWARDS + FINALIZE_FORWARDS + PROBE_FORWARDS * probed / n - (1.0 if probed == n else 0.0)
            + CHECK_FORWARDS * min(n, limits.CHECKED_SAMPLES) / n)

FACTOR_ROWS = 12  # the largest factors listed by ``Plan.__str__``; the rest in one line


def _size(n: float) -> str:
    if n >= GIB / 10:
        return f"{n / GIB:,.2f} GiB"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 / 10 else f"{n / 1024:,.1f} KiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:,.1f} min" if seconds < 7200 else f"{seconds / 3600:,.1f} h"


@dataclass(frozen=True)
class _Kronecker:
    """What the forward shows of one Kronecker layer: rows per sample (locations × calls), layout numbers."""

    name: str
    locations: int
    d_out: int
    width: int
    groups: int
    diagonal_a: bool


@dataclass(frozen=True)
class Recording:
    """Everything the plan needs from one forward of the first batch (options apart: plans for other options come
    from the same recording without another forward)."""

    spec: LossSpec
    output_shape: torch.Size
    kronecker: tuple[_Kronecker, ...]
    other_blocks: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]
    approx: str
    itemsize: int
    output_itemsize: int
    activation_bytes: int
    recorded_bytes: int
    largest_tensor_bytes: int
    parameters: int
    forward_seconds: float
    batches: int | None
    device: torch.device


def plan(model: nn.Module, loss_fn: nn.Module, data: Data, curvature: Curvature | None = None,
         layers: list[str] | None = None, approx: Approx = "expand", *, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None, options: PassOptions | None = None, **pass_options: Any) -> Plan:
    """The plan of ``compute_kfac`` with the same arguments (module docstring): one forward of the first batch, no
    backward pass; ``print(plan)`` shows it. ``device`` is accepted for symmetry and does not change the plan."""
    check_approx(approx)
    options = PassOptions.build(options, **({"curvature": curvature} if curvature else {}), **pass_options)
    spec = loss_spec(loss_fn)
    model = eager_model(model)
    selection = select(model, layers)
    settings = pass_settings(selection, approx, dtype)
    first, _ = peek(data, settings.device)
    return evaluate(record(model, spec, first, selection, settings, options, batch_count(data)), options)


def peek(data: Data, device: torch.device) -> tuple[tuple[Any, torch.Tensor], Data]:
    """The first batch ``(inputs, targets)`` on ``device``, and ``data`` to stream from the start again (a one-shot
    iterator is chained behind its first batch)."""
    if isinstance(data, Iterator):  # a generator, zip, map: its first batch would be gone
        first_raw = next(data, None)
        data = itertools.chain([first_raw] if first_raw is not None else [], data)
        _, inputs, targets = next(iterate_batches([first_raw] if first_raw is not None else [], device))
        return (inputs, targets), data
    _, inputs, targets = next(iterate_batches(data, device))
    return (inputs, targets), data


def batch_count(data: Data) -> int | None:
    """Batches in ``data``: 1 for one ``(inputs, targets)`` pair, ``len`` of a sized iterable, else ``None``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor) and not isinstance(
            data[0], (tuple, list)):
        return 1
    return len(data) if hasattr(data, "__len__") else None


def record(model: nn.Module, spec: LossSpec, batch: tuple[Any, torch.Tensor], selection: Selection,
           settings: PassSettings, options: PassOptions, batches: int | None) -> Recording:
    """One forward of ``batch`` with the pass's hooks' modules observed (module docstring). The model's state and the
    global RNG are left as they were."""
    meta = accumulators_for(selection, PassSettings(settings.approx, settings.dtype, torch.device("meta")))
    pass_ = Pass(model, meta, selection, PassSettings(settings.approx, settings.dtype, torch.device("meta")),
                 False, options.output)
    shapes: dict[str, list[torch.Size]] = {key: [] for key in meta}
    # parameters, buffers and inputs exist before the pass: the saved tensors that share their storage cost nothing
    existing = {t.untyped_storage().data_ptr()
                for t in itertools.chain(model.parameters(), model.buffers(), _tensors(batch[0]))}
    saved: dict[int, int] = {}
    largest = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in existing:
            saved[storage.data_ptr()] = storage.nbytes()
            largest[0] = max(largest[0], storage.nbytes())
        return tensor

    def observe(key: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                shapes[key].append(output.shape)
            elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                shapes[key].append(output[0].shape)

        return hook

    handles = []
    with (torch.random.fork_rng(devices=[settings.device] if settings.device.type == "cuda" else []),
          pass_.contexts(), preserved_model_state(model, options.batch_norm_eval), eager_calls(model),
          torch.enable_grad()):
        try:
            for key, module in pass_.hooked().items():
                handles.append(module.register_forward_hook(observe(key)))
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                output = model_output(model, batch[0], options.output)
            seconds = time.perf_counter() - start
        finally:
            for handle in handles:
                handle.remove()
    kronecker, other = [], []
    for key, acc in meta.items():
        calls = shapes[key]
        if not calls:
            continue
        if isinstance(acc, KroneckerSums):
            kronecker.append(_kronecker(acc, calls))
        else:
            other.append((acc.name, tuple(tuple(t.shape) for t in acc.state() if t.dim() > 0)))
    recorded = sum(math.prod(s) for calls in shapes.values() for s in calls) * output.element_size()
    saved.pop(output.untyped_storage().data_ptr(), None)
    return Recording(spec, output.shape, tuple(kronecker), tuple(other), settings.approx,
                     torch.empty((), dtype=settings.dtype).element_size(),
                     torch.empty((), dtype=compute_dtype(output.dtype)).element_size(), sum(saved.values()),
                     recorded + output.numel() * output.element_size(), largest[0],
                     sum(p.numel() for p in model.parameters() if p.requires_grad), seconds, batches, settings.device)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _kronecker(acc: KroneckerSums, calls: list[torch.Size]) -> _Kronecker:
    """Locations per sample from the output shape of every call (``output_rows`` on a ``meta`` tensor)."""
    locations = sum(acc.kind.output_rows(acc.module, torch.empty((1, *shape), device="meta")).shape[2]
                    for shape in calls)
    layout = acc.layout
    return _Kronecker(acc.name, locations, layout.d_out, layout.width, layout.groups, acc.kind.diagonal_a)


def evaluate(recording: Recording, options: PassOptions, with_cheaper: bool = True) -> Plan:
    """The plan of a pass with ``options`` over the recorded forward (module docstring)."""
    spec, shape = recording.spec, recording.output_shape
    n = shape[0]
    positions = math.prod(shape[2:]) if len(shape) > 2 else 1
    columns = _columns(spec, shape, options, positions)
    stream = one_column_per_pass(options.column_chunk, recording.device, options.curvature, options.mc_samples)
    chunk = 1 if stream else min(options.column_chunk or columns, columns)
    passes = -(-columns // chunk)
    samples = n * (recording.batches or 1)
    factors, gram = [], 0.0
    expand = recording.approx == "expand"
    forward = 0.0
    for layer in recording.kronecker:
        rows_per_batch = n * (layer.locations if expand or layer.diagonal_a else 1)
        forward += 2.0 * n * layer.locations * layer.groups * layer.d_out * (
            1 if layer.diagonal_a else layer.width)
        if layer.diagonal_a:
            factors.append(FactorPlan(layer.name, "A", "diagonal", (layer.width,), 1,
                                      layer.width * recording.itemsize))
        else:
            factors.append(_factor(layer.name, "A", samples // n * rows_per_batch, layer.width, layer.groups,
                                   recording.itemsize))
            gram += _gram_cost(factors[-1], rows_per_batch)
        factors.append(_factor(layer.name, "G", samples // n * rows_per_batch * columns, layer.d_out, layer.groups,
                               recording.itemsize))
        gram += _gram_cost(factors[-1], rows_per_batch * columns)
    for name, shapes in recording.other_blocks:
        elements = sum(math.prod(s) for s in shapes)
        factors.append(FactorPlan(name, "block", "sums", shapes[0] if len(shapes) == 1 else (elements,), 1,
                                  elements * recording.itemsize))
        gram += 2.0 * n * columns * elements
    forward = max(forward, 2.0 * n * recording.parameters, 1.0)  # every parameter used once per sample, at least
    output_bytes = math.prod(shape) * recording.output_itemsize
    column_bytes = output_bytes * _column_tensors(options.curvature, columns, chunk)
    backward = chunk * recording.recorded_bytes if chunk > 1 else 2 * recording.largest_tensor_bytes
    batches = recording.batches or 1
    units = (forward * (1 + passes + _first_batch_forwards(n) / batches) + gram) / (3 * forward)
    budget = options.memory_budget if options.memory_budget is not None else available_memory(recording.device)
    time_budget = options.time_budget if options.time_budget is not None else limits.PASS_SECONDS_LIMIT
    result = Plan(options, recording.batches, n, positions, columns, chunk, passes, tuple(factors),
                  recording.activation_bytes, recording.recorded_bytes, column_bytes, backward, units,
                  3 * recording.forward_seconds * (recording.batches or 1), budget, time_budget)
    if with_cheaper and result.over_budget:
        result = dataclasses.replace(result, cheaper=tuple(_cheaper(recording, result)))
    return result


def _columns(spec: LossSpec, shape: torch.Size, options: PassOptions, positions: int) -> int:
    if options.curvature == "mc":
        return options.mc_samples
    if options.curvature == "empirical":
        return 1
    rank = HessianSqrt(spec, torch.zeros((1, *shape[1:]), device="meta")).rank
    return column_count(rank, positions, options.per_position, options.sign_draws, options.column_signs)


def _column_tensors(curvature: Curvature, columns: int, chunk: int) -> int:
    """Output-sized tensors alive while a chunk is made: ``"ggn"`` keeps ``√p`` and ``b`` (``losses.HessianSqrt``) and
    makes a chunk through about 4 chunk-sized temporaries; ``"mc"`` holds its columns, the softmax they are drawn from
    and a chunk's copy; ``"empirical"`` the gradient and its softmax and one-hot temporaries."""
    if curvature == "ggn":
        return 2 + 4 * chunk
    return columns + 1 + chunk if curvature == "mc" else 4 + chunk


def _factor(block: str, factor: str, rows: int, width: int, groups: int, itemsize: int) -> FactorPlan:
    """Rows ``(r, w)`` while ``r < w`` for a factor of one group at least ``limits.ROW_FACTOR_MIN_WIDTH`` wide (as
    ``layers.kronecker.KroneckerSums`` keeps them), else dense ``(w, w)`` per group."""
    if groups == 1 and width >= limits.ROW_FACTOR_MIN_WIDTH and rows < width:
        return FactorPlan(block, factor, "rows", (rows, width), 1, rows * width * itemsize)
    return FactorPlan(block, factor, "dense", (width, width), groups, groups * width * width * itemsize)


def _gram_cost(factor: FactorPlan, rows: int) -> float:
    """Multiply-adds of adding one batch's ``rows`` to a factor: a copy of the rows while they are kept, the Gram
    product ``2·r·w²`` per group once it is dense."""
    width = factor.shape[-1]
    return float(rows * width) if factor.representation == "rows" else 2.0 * rows * width**2 * factor.groups


def _cheaper(recording: Recording, plan_: Plan) -> list[str]:
    """The cheaper choices, each with its plan's numbers."""
    options, choices = plan_.options, []

    def costs(alternative: Plan) -> str:
        return f"≈ {alternative.time_units:,.1f} passes of the data, peak ≈ {_size(alternative.peak_bytes)}"

    if options.curvature == "ggn" and plan_.columns_per_batch > 1:
        mc = evaluate(recording, dataclasses.replace(options, curvature="mc", mc_samples=1, per_position=False,
                                                     position_signs=None, column_signs=None, column_chunk=None),
                      with_cheaper=False)
        choices.append(f"curvature='mc' (1 backward pass per batch, an unbiased estimate: {costs(mc)})")
        draws = max(1, min(COLUMN_SIGNS_OFFERED, plan_.columns_per_batch // 2))
        signs = evaluate(recording, dataclasses.replace(options, per_position=False, position_signs=None,
                                                        column_signs=draws, column_chunk=None), with_cheaper=False)
        choices.append(f"column_signs={draws} ({draws} random-sign combinations of the loss-Hessian columns, an "
                       f"unbiased estimate: {costs(signs)})")
    largest = sorted((f for f in plan_.factors), key=lambda f: -f.bytes)[:3]
    if largest and largest[0].bytes > plan_.peak_bytes / 4:
        names = list(dict.fromkeys(f.block for f in largest if f.bytes > plan_.peak_bytes / 10))
        choices.append(f"layers= without {names} (their factors take "
                       f"{_size(sum(f.bytes for f in plan_.factors if f.block in names))})")
    if plan_.positions > 1 or plan_.samples_per_batch > 1:
        choices.append(f"fewer positions or samples per batch (the activations of one batch take "
                       f"{_size(plan_.activation_bytes + plan_.recorded_bytes)}; the output columns scale with "
                       "N·T)")
    return choices


COLUMN_SIGNS_OFFERED = 16  # the number of random-sign combinations a refusal offers in place of K columns


def available_memory(device: torch.device) -> int | None:
    """Bytes available for the pass: free memory of a CUDA device, ``MemAvailable`` of ``/proc/meminfo`` on the CPU,
    ``None`` where neither is known (then only ``memory_budget=`` limits the plan)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_pass(model: nn.Module, spec: LossSpec, data: Data, selection: Selection, settings: PassSettings,
              options: PassOptions) -> tuple[Plan, Data]:
    """``compute_kfac``'s plan and the data to stream from its start (``peek``)."""
    first, data_again = peek(data, settings.device)
    return evaluate(record(model, spec, first, selection, settings, options, batch_count(data)), options), data_again

