"""The checks of a curvature pass, in one place: finite values, the batch axis of every recorded call, the first
batch's samples on which a kind's formula is checked, and the warnings about what makes a result random or empty."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from ..capture import LayerCall
from ..layers import Accumulator, KroneckerSums
from ..limits import CHECKED_SAMPLES


def require_finite(tensor: Tensor, what: str) -> None:
    """``FloatingPointError`` when ``tensor`` holds a NaN or ±Inf."""
    # One reduction first: a NaN or ±Inf entry makes the sum non-finite, and it needs no O(numel) temporary
    # mask; only a non-finite sum (which an overflow of finite entries could also give) is checked entry-wise.
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise FloatingPointError(f"{what} contains NaN or Inf; no spectrum is computed from non-finite values")


def all_finite(outputs) -> bool:
    """Whether every tensor leaf of ``outputs`` is finite."""
    return all(torch.isfinite(leaf).all() for leaf in tree_flatten(outputs)[0] if isinstance(leaf, Tensor))


def batch_axis_reason(acc: Accumulator, calls: list[LayerCall], n: int) -> str | None:
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


def first_samples(call: LayerCall, n: int) -> LayerCall:
    """The call restricted to its first ``CHECKED_SAMPLES`` samples (tensors with the batch axis first)."""
    def cut(value):
        return value[:CHECKED_SAMPLES] if isinstance(value, Tensor) and value.dim() and value.shape[0] == n else value

    return LayerCall(tree_map(cut, call.args), tree_map(cut, call.kwargs), list(call.output_shapes),
                     output_values=tree_map(cut, call.output_values))


def warn_about_dropout(model: nn.Module, seed: int | None) -> None:
    active = [name for name, m in model.named_modules()
              if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    if active:
        warnings.warn(
            f"dropout is active (train mode) in {active[:3]}{' …' if len(active) > 3 else ''}: "
            f"the curvature is that of a random network{'' if seed is None else f' (reproducible with seed={seed})'}; "
            "call model.eval() for the deterministic one", UserWarning, stacklevel=3)


def warn_about_joint_columns(positions: int) -> None:
    warnings.warn(f"joint loss-Hessian columns over {positions} output positions (position_signs=0): blocks of "
                  "parameters that act at several positions carry cross-position products (on a small GPT LayerNorm λ₁ "
                  "up to 18× the exact); the default position_signs=1 removes them in expectation at the same cost, "
                  "per_position=True exactly", RuntimeWarning, stacklevel=4)


def warn_about_zero_blocks(traces: dict[str, float]) -> None:
    zero = [name for name, trace in traces.items() if trace == 0.0]
    if zero:
        warnings.warn(f"blocks {zero[:5]}{' …' if len(zero) > 5 else ''} are exactly zero: on this data the outputs do "
                      "not depend on their parameters (e.g. a zero-initialised layer downstream, inputs that are all "
                      "zero, attention over a single key); their spectra are all zeros", RuntimeWarning, stacklevel=3)
