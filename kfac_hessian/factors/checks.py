"""The checks of a curvature pass, in one place: finite values, the batch axis of every recorded call, the first
batch's samples on which a kind's formula is checked, and the warnings about what makes a result random or empty."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture import LayerCall, differentiable
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


def sample_axis_reason(acc: Accumulator, calls: list[LayerCall]) -> str | None:
    """Why the recorded calls do not fit ``acc``'s per-sample bookkeeping (``None`` when they do), from the layouts
    the sample-axis probe found (``factors/sample_axis.py``). ``expand`` Kronecker sums take every row of every call
    and refuse only outputs that every sample shares (their gradient sums over the samples); the others — normalization,
    per-sample parameters, ``reduce``, the per-sample passes — check the layouts they use themselves, as they are
    fed."""
    if not (isinstance(acc, KroneckerSums) and acc.approx == "expand"):
        return None
    for call in calls:
        shared = next((layout for layout in call.output_layouts or [] if layout.state == "shared"), None)
        if shared is not None:
            why = f": {shared.reason}" if shared.reason else ""
            return (f"its output {tuple(call.output_shapes[0])} is shared by all samples of the batch (no sample "
                    f"axis{why}), so per-sample curvature is not observable at it")
    return None


def first_samples(call: LayerCall) -> LayerCall:
    """The call restricted to its first ``CHECKED_SAMPLES`` samples, where the probe found them (the whole call when
    it did not find them in every tensor, or the call is unbatched)."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    outputs, out_spec = tree_flatten(call.output_values)
    out_layouts = iter(call.output_layouts or [])
    paired_outputs = [(leaf, next(out_layouts, None) if differentiable(leaf) else None) for leaf in outputs]
    tensors = [(leaf, layout) for leaf, layout in [*zip(leaves, call.input_layouts or []), *paired_outputs]
               if isinstance(leaf, Tensor) and layout is not None]
    if not call.input_layouts or not all(layout.carries_samples and layout.fits(leaf) for leaf, layout in tensors):
        return call

    def cut(pairs):
        return [layout.first(leaf, CHECKED_SAMPLES) if isinstance(leaf, Tensor) and layout is not None else leaf
                for leaf, layout in pairs]

    args, kwargs = tree_unflatten(cut(zip(leaves, call.input_layouts)), spec)
    values = tree_unflatten(cut(paired_outputs), out_spec)
    return LayerCall(args, kwargs, list(call.output_shapes), output_values=values)


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
