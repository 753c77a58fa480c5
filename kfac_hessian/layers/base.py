"""What a layer kind declares, once, and the accumulator protocol ``compute_kfac`` drives.

A ``LayerKind`` says whether it applies to a module (``claims``) and, if it cannot handle a claimed module, why
(``unsupported_reason``); which of the module's own parameters its block covers, in public order
(``parameter_names``); whether a recorded call computes what the kind assumes (``reproduces``: checked on the
first batch; a mismatch hands the module to the per-sample kind); and the ``Accumulator`` that turns recorded calls
and output gradients into the block's sums and, at the end, blocks. A context for the pass (``pass_context``) may
make functional calls hook-visible; the accumulator says which module the recorder hooks (``hooked_module``).

An ``Accumulator`` receives, per batch, the recorded calls (``add_inputs``: the forward half) and, per backward
pass, the gradient of every call's output leaves for the backpropagated columns (``add_gradients``: lists per
call and leaf of ``(K, N, *leaf.shape[1:])``, zeros where the output did not depend on the call). ``state``/
``set_state`` expose its sums (summed over ranks when distributed); ``finalize(scale, device)`` returns the
blocks, keyed by block name, with the reduction scale applied.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..blocks import CurvatureBlock
from ..capture import LayerCall


@dataclass(frozen=True)
class PassSettings:
    """How the sums of one pass are kept: weight-sharing approximation, accumulation dtype and device."""

    approx: str
    dtype: torch.dtype
    device: torch.device


class Accumulator(ABC):
    """Running sums of one kind for one module ``module`` named ``name`` (module docstring)."""

    name: str
    module: nn.Module
    streams: bool = True  # the output gradients of a module called once may be added as they arrive
    skip_reason: str | None = None  # set during the pass when the module turns out not to fit the kind

    def hooked_module(self) -> nn.Module:
        """The module whose calls this accumulator needs (default: its own)."""
        return self.module

    def block_names(self) -> list[str]:
        """The names of the blocks ``finalize`` returns."""
        return [self.name]

    @abstractmethod
    def add_inputs(self, calls: list[LayerCall]) -> None: ...

    @abstractmethod
    def add_gradients(self, grads: list[list[Tensor]]) -> None: ...

    @property
    @abstractmethod
    def called(self) -> bool: ...

    @abstractmethod
    def state(self) -> list[Tensor]: ...

    @abstractmethod
    def set_state(self, tensors: list[Tensor]) -> None: ...

    @abstractmethod
    def finalize(self, scale: float, device: torch.device | str | None) -> dict[str, CurvatureBlock]: ...

    def input_state(self) -> list[Tensor]:
        """The sums ``add_inputs`` changes (checked for NaN/Inf after it); default: none apart."""
        return []

    def prepare_reduce(self) -> None:
        """Bring ``state`` into a form that sums over ranks (before a distributed reduction); default: it is."""
        return None


def forward_is(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` runs ``base``'s own ``forward`` (not a subclass override, not an instance attribute)."""
    return type(module).forward is base.forward and "forward" not in module.__dict__


def outputs_match(expected: Tensor, output) -> bool:
    """Whether a recorded output equals what the kind's formula gives, to a tolerance of ``√ε`` of its dtype
    (relative, in the Frobenius norm)."""
    if not isinstance(output, Tensor) or output.shape != expected.shape:
        return False
    tolerance = torch.finfo(output.dtype).eps ** 0.5 if output.is_floating_point() else 0.0
    error = float((output - expected.to(output.dtype)).float().norm())
    return error <= tolerance * max(float(output.float().norm()), torch.finfo(torch.float32).tiny)


class LayerKind(ABC):
    """One family of modules with a curvature block of its own (module docstring)."""

    name: str = ""

    @abstractmethod
    def claims(self, module: nn.Module) -> bool:
        """Whether this kind is responsible for ``module`` (usually: its type, with the type's own ``forward``)."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why a claimed module cannot be handled by this kind (``None`` when it can). Its parameters then get
        per-sample blocks, unless ``per_sample_fallback`` says no (the module is then skipped with the reason)."""
        return None

    def per_sample_fallback(self, module: nn.Module) -> bool:
        """Whether an unsupported module's parameters may get per-sample blocks (re-running its forward per sample)."""
        return True

    def parameter_names(self, module: nn.Module) -> list[str]:
        """The module's own parameters the block covers, in public order (default: ``weight``, then ``bias``)."""
        return [n for n in ("weight", "bias") if getattr(module, n, None) is not None]

    def functional_children(self, module: nn.Module) -> list[str]:
        """Children of a claimed module that it cannot handle (``unsupported_reason``) whose parameters its own forward
        uses without calling them as modules (``MultiheadAttention``'s ``out_proj``): they join the module's per-sample
        blocks, since no hook ever sees those children called (default: none)."""
        return []

    def pass_context(self, accumulators: Mapping[str, Accumulator]) -> contextlib.AbstractContextManager:
        """Entered once per pass around the forward passes, with this kind's accumulators (default: nothing)."""
        return contextlib.nullcontext()

    def reproduces(self, module: nn.Module, call: LayerCall) -> bool:
        """Whether the recorded call's output is what the kind assumes the module computes (default: trusted)."""
        return True

    @abstractmethod
    def accumulator(self, name: str, module: nn.Module, settings: PassSettings) -> Accumulator: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
