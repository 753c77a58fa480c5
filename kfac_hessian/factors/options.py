"""``PassOptions``: the single place where the options of a curvature pass are declared, documented and validated.

Every ``compute_*`` function takes them, either as ``options=PassOptions(...)`` or as keyword arguments of the same
names (``compute_kfac(model, loss_fn, data, curvature="mc", seed=0)``); the keywords override the object's fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ..data import OutputSelector

Curvature = Literal["ggn", "mc", "empirical"]
Approx = Literal["expand", "reduce"]


@dataclass(frozen=True)
class PassOptions:
    """How one pass over the data runs: which columns are backpropagated from the output, how, and where.

    Attributes:
        curvature: ``"ggn"`` (exact Gauss-Newton output Hessian through its square-root columns), ``"mc"``
            (Monte-Carlo Fisher: gradients at labels sampled from the model), ``"empirical"`` (empirical Fisher: the
            gradient at the true labels).
        mc_samples: labels drawn per sample for ``"mc"``.
        seed: makes the pass reproducible: a private generator draws the ``"mc"`` labels, and the model's own
            randomness (dropout in train mode) runs on a forked global RNG seeded with it; the global RNG is left as
            it was.
        column_chunk: output-gradient columns backpropagated together in one vectorized (``is_grads_batched``) pass.
            ``None``: all of them on CUDA, one per pass on CPU, where the vectorized backward of convolutions
            measured about 2× slower than separate passes (``docs/performance.md``). A chunk of ``K`` holds ``K``
            copies of the activations' gradients. One column per pass (also ``mc`` with one sample and ``empirical``
            by default) streams each layer's output gradient into its sums inside the backward (``capture.py``): the
            least memory.
        per_position: ``"ggn"`` only. Backpropagate every loss-Hessian square-root column at one output position at a
            time (``K·T`` columns instead of ``K``, ``T`` output positions per sample): the exact GGN outer products, at
            ``T`` times the backward passes. No effect with one output position per sample.
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
        column_signs: ``"ggn"`` only. ``R``: instead of the ``K`` loss-Hessian square-root columns (``K`` = classes − 1:
            50 256 backward passes per batch for GPT-2's vocabulary), ``R`` random-sign combinations
            ``Σ_k s_k c_k / √R`` with independent Rademacher signs per (draw, column, sample, position) —
            ``E[s sᵀ] = I``, so an unbiased estimate of the per-position GGN outer products (the cross-position
            products vanish in expectation too) at ``R`` backward passes. Labelled an estimate; signs from a private
            generator seeded with ``seed`` (0 without one). ``None``: the columns themselves.
        memory_budget: bytes the pass may use beyond what exists when it starts (``None``: the memory available
            now — ``MemAvailable`` of ``/proc/meminfo``, or the free memory of a CUDA device). ``compute_kfac``
            plans the pass first (``kfac_hessian.plan``) and refuses one whose peak estimate exceeds it with
            ``PlanExceedsBudget``, before any backward pass.
        time_budget: the most seconds the pass may take by the plan's estimate (its forward+backward passes of the
            data times one timed forward's; ``None``: ``limits.PASS_SECONDS_LIMIT``, an hour); a longer plan is
            refused with ``PlanExceedsBudget``. ``float("inf")`` runs whatever it takes.
        batch_norm_eval: run BatchNorm modules in eval mode (running statistics) during the pass, whatever the model's
            mode: the curvature is then that of the function the trained network computes at test time. ``False``
            keeps the model's modes (train-mode BatchNorm couples the samples of a batch, which no per-sample
            factorization represents). Modes are restored afterwards.
        progress: show a progress bar (needs ``tqdm``).
        distributed: ``data`` is this rank's shard of a data set split over an initialized ``torch.distributed``
            process group; the sums of all ranks are combined in one all-reduce and every rank returns the blocks of
            the whole data set.
        output: picks the output tensor from what the model returns (default: the tensor itself, or ``.logits``);
            ``kfac_hessian.sequence_logits`` presents language-model logits ``(N, T, V)`` as ``(N, V, T)``.
    """

    curvature: Curvature = "ggn"
    mc_samples: int = 1
    seed: int | None = None
    column_chunk: int | None = None
    per_position: bool = False
    position_signs: int | None = None
    column_signs: int | None = None
    memory_budget: int | None = None
    time_budget: float | None = None
    batch_norm_eval: bool = True
    progress: bool = False
    distributed: bool = False
    output: OutputSelector | None = None

    def __post_init__(self) -> None:
        if self.curvature not in ("ggn", "mc", "empirical"):
            raise ValueError(f"curvature must be 'ggn', 'mc' or 'empirical', got {self.curvature!r}")
        if (self.per_position or self.position_signs) and self.curvature != "ggn":
            raise ValueError("per_position and position_signs apply to curvature='ggn' (Monte-Carlo labels are drawn "
                             "per position, and the empirical Fisher is defined with the per-sample gradient)")
        signs = self.position_signs
        if signs is not None and (isinstance(signs, bool) or not isinstance(signs, int) or signs < 0):
            raise ValueError(f"position_signs must be a non-negative integer (draws) or None, got {signs!r}")
        if self.per_position and signs:
            raise ValueError("per_position=True and position_signs are two ways to remove the cross-position terms: "
                             "pick one")
        columns = self.column_signs
        if columns is not None:
            if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
                raise ValueError(f"column_signs must be a positive integer (combinations) or None, got {columns!r}")
            if self.curvature != "ggn":
                raise ValueError("column_signs applies to curvature='ggn' (it combines the loss-Hessian square-root "
                                 "columns)")
            if self.per_position or signs is not None:
                raise ValueError("column_signs draws independent signs per (sample, position) already: leave "
                                 "per_position and position_signs unset")
        budget = self.memory_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"memory_budget must be a positive number of bytes or None, got {budget!r}")
        cost = self.time_budget
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost > 0):
            raise ValueError(f"time_budget must be a positive number of seconds or None, got {cost!r}")
        if isinstance(self.mc_samples, bool) or not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {self.mc_samples!r}")
        chunk = self.column_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"column_chunk must be a positive integer or None, got {chunk!r}")

    @property
    def sign_draws(self) -> int:
        """The sign draws per column (``position_signs``; ``None`` is one draw for ``"ggn"`` without
        ``per_position`` or ``column_signs``)."""
        if self.column_signs:
            return 0
        if self.position_signs is not None:
            return self.position_signs
        return 1 if self.curvature == "ggn" and not self.per_position else 0

    @classmethod
    def build(cls, options: PassOptions | None, **fields: Any) -> PassOptions:
        """``options`` (default: all defaults) with ``fields`` replacing its fields of the same names."""
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; the pass options are {list(FIELDS)}")
        if options is not None and not isinstance(options, PassOptions):
            raise TypeError(f"options must be a PassOptions, got {type(options).__name__}")
        return dataclasses.replace(options or cls(), **fields)


FIELDS = tuple(field.name for field in dataclasses.fields(PassOptions))


def split_pass_options(arguments: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``arguments`` split into the fields of ``PassOptions`` and the rest."""
    return ({k: v for k, v in arguments.items() if k in FIELDS},
            {k: v for k, v in arguments.items() if k not in FIELDS})


def check_approx(approx: str) -> None:
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
