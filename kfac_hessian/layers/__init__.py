"""The layer-kind registry: which curvature block every parameterized module of a model gets.

Kinds, tried in order (kinds you ``register`` come first):

============================  ======================================================  ==============================
kind                          modules                                                 block
============================  ======================================================  ==============================
``attention``                 ``nn.MultiheadAttention`` (self-attention)              ``G ⊗ A`` of the in-projection
                              (cross-attention)                                       ``G ⊗ A`` per input, block-diag.
``linear``                    ``nn.Linear``                                           ``G ⊗ A``
``transposed_linear``         ``transformers``' ``Conv1D`` (GPT-2)                    ``G ⊗ A``, weight
                                                                                      ``(d_in, d_out)``
``conv``                      ``nn.Conv1d/2d/3d``, any ``groups``                     ``G_g ⊗ A_g`` per group
``embedding``                 ``nn.Embedding``                                        ``G ⊗ diag(A)``
``batch_norm`` … ``rms_norm``  ``BatchNorm*``, ``GroupNorm``, ``LayerNorm``, ``RMSNorm``  exact ``(γ, β)`` block
``recurrent``                 ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (run unrolled)       ``G ⊗ A`` per layer, direction
                                                                                      and linear map
(per-sample parameters)       everything else with parameters                        exact block per parameter
============================  ======================================================  ==============================

A built-in kind claims a module of its type only when the module runs that type's own ``forward``; on the first
batch every call is also checked against the kind's formula (``LayerKind.reproduces``). A module no kind claims, a
subclass with its own ``forward``, a call the formula does not reproduce, and free parameters of any module get the
exact per-sample block of ``parameters.py`` — so every trainable parameter is covered, or skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from .attention import AttentionKind
from .base import Accumulator, LayerKind, PassSettings, forward_is, outputs_match
from .conv import ConvKind
from .embedding import EmbeddingKind
from .kronecker import KroneckerKind, KroneckerSums, PerSampleStatistic
from .linear import LinearKind
from .normalization import BATCH_NORM, GROUP_NORM, LAYER_NORM, RMS_NORM, NormalizationKind
from .parameters import ParameterSums, full_name, is_parametrization, own_parameters
from .recurrent import RecurrentKind
from .transposed_linear import TransposedLinearKind

_BUILT_IN: tuple[LayerKind, ...] = (AttentionKind(), LinearKind(), TransposedLinearKind(), ConvKind(), EmbeddingKind(),
                                     BATCH_NORM, GROUP_NORM, LAYER_NORM, RMS_NORM, RecurrentKind())
_REGISTERED: list[LayerKind] = []


def register(kind: LayerKind) -> LayerKind:
    """Add a kind, tried before every kind registered earlier and before the built-in ones; returns it."""
    if not isinstance(kind, LayerKind):
        raise TypeError(f"expected a LayerKind, got {type(kind).__name__}")
    _REGISTERED.insert(0, kind)
    return kind


def unregister(kind: LayerKind) -> None:
    """Remove a kind added with ``register``."""
    if kind not in _REGISTERED:
        raise ValueError(f"{kind!r} is not registered")
    _REGISTERED.remove(kind)


def kinds() -> list[LayerKind]:
    """The kinds in the order they are tried."""
    return [*_REGISTERED, *_BUILT_IN]


def kind_for(module: nn.Module) -> LayerKind | None:
    """The first kind that claims ``module`` (``None``: its parameters get per-sample blocks). A module with a
    parametrized tensor is claimed by none: its trainable tensors are the parametrization's originals, not the
    computed tensor a kind's formula takes."""
    if parametrize.is_parametrized(module):
        return None
    return next((kind for kind in kinds() if kind.claims(module)), None)


def hook_computed_reason(module: nn.Module) -> str | None:
    """Why a module whose tensors a forward pre-hook recomputes from other parameters is skipped (``None``: it is
    not). The deprecated ``torch.nn.utils.weight_norm`` writes ``weight`` on the module at every call, which a
    per-sample re-run would leave behind as a batched tensor."""
    if any(isinstance(hook, WeightNorm) for hook in module._forward_pre_hooks.values()):
        return ("its weight is recomputed from weight_g and weight_v by the deprecated hook "
                "torch.nn.utils.weight_norm; use torch.nn.utils.parametrizations.weight_norm, whose originals get "
                "exact per-sample blocks")
    return None


def kronecker_kind(module: nn.Module) -> KroneckerKind | None:
    """The module's kind when it is a Kronecker kind with vector inputs (local Hessians, the optimizer)."""
    kind = kind_for(module)
    if isinstance(kind, KroneckerKind) and kind.dense_inputs and kind.unsupported_reason(module) is None:
        return kind
    return None


@dataclass
class Entry:
    """One accumulator to build: ``kind`` (``None``: per-sample parameter blocks) for ``module``'s own parameters
    ``local_names``; ``origin``: why per-sample parameters are here."""

    kind: LayerKind | None
    module_name: str
    module: nn.Module
    local_names: list[str]
    origin: str = ""

    def block_names(self) -> list[str]:
        if self.kind is None:
            return [full_name(self.module_name, local) for local in self.local_names]
        return [self.module_name]

    def parameter_names(self) -> dict[str, list[str]]:
        """Block name → the full names of the parameters it covers, public order."""
        if self.kind is None:
            return {full_name(self.module_name, n): [full_name(self.module_name, n)] for n in self.local_names}
        return {self.module_name: [full_name(self.module_name, n) for n in self.local_names]}

    def accumulator(self, settings: PassSettings) -> Accumulator:
        if self.kind is None:
            return ParameterSums(self.module_name, self.module, self.local_names, self.origin, settings)
        return self.kind.accumulator(self.module_name, self.module, settings)


@dataclass
class Selection:
    """What ``compute_kfac`` covers: the entries, and every other parameterized module or parameter with why not."""

    entries: list[Entry]
    skipped: dict[str, str] = field(default_factory=dict)


FROZEN = "all its parameters are frozen (requires_grad=False); name it in layers= to include it"


def _origin(module: nn.Module) -> str:
    """Why a module's parameters get per-sample blocks, in a few words."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        tensors = ", ".join(module.parametrizations)
        return f"{tensors} of {cls.__name__.removeprefix('Parametrized')} computed by a parametrization: its originals"
    kind = kind_for(module)
    if kind is not None and kind.unsupported_reason(module) is not None:
        return f"{kind.unsupported_reason(module)} (no {kind.name} block)"
    if "forward" in module.__dict__:
        return f"{cls.__name__} with a forward replaced on the instance"
    base = next((b for b in cls.__mro__[1:] if b.__module__.startswith("torch.nn.") and b is not nn.Module), None)
    if base is not None and base.forward is not cls.forward:
        return f"{cls.__name__} overrides nn.{base.__name__}.forward"
    if any(True for _ in module.children()):
        return f"free parameter of {cls.__name__}"
    return f"parameter of {cls.__name__} (no layer kind claims it)"


def select(model: nn.Module, layers: list[str] | str | None) -> Selection:
    """The entries for ``layers`` (module names, or parameter names for per-sample blocks; ``None``: everything
    trainable), and the reason for every parameterized module or parameter left out."""
    modules = dict(model.named_modules())
    if layers is None:
        return _select_all(modules)
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("layers=[] selects nothing; pass None for every layer")
    owners = {full_name(m_name, p_name): (m_name, p_name) for m_name, m in modules.items()
              if not is_parametrization(m) for p_name, _ in own_parameters(m)}
    entries: dict[tuple, Entry] = {}
    for name in names:
        if name in modules and name != "" and own_parameters(modules[name]):
            module = modules[name]
            if hook_computed_reason(module) is not None:
                raise ValueError(f"layer {name!r}: {hook_computed_reason(module)}")
            kind = kind_for(module)
            covered = []
            if (kind is not None and kind.unsupported_reason(module) is not None
                    and not kind.per_sample_fallback(module)):
                raise ValueError(f"layer {name!r}: {kind.unsupported_reason(module)}")
            if kind is not None and kind.unsupported_reason(module) is None:
                covered = kind.parameter_names(module)
                entries[(name, None)] = Entry(kind, name, module, covered)
            for local, _ in own_parameters(module):
                if local not in covered:
                    _add_parameter(entries, name, module, local)
            if kind is not None and kind.unsupported_reason(module) is not None:
                for child in kind.functional_children(module):
                    for local, _ in own_parameters(module.get_submodule(child)):
                        _add_parameter(entries, name, module, f"{child}.{local}")
        elif name in owners:
            m_name, local = owners[name]
            module = modules[m_name]
            if hook_computed_reason(module) is not None:
                raise ValueError(f"parameter {name!r}: {hook_computed_reason(module)}")
            kind = kind_for(module)
            if kind is not None and kind.unsupported_reason(module) is None and local in kind.parameter_names(module):
                raise ValueError(f"parameter {name!r} is part of layer {m_name!r}'s {kind.name} block: name the layer")
            _add_parameter(entries, m_name, module, local)
        else:
            candidates = [n for n, m in modules.items() if n and not is_parametrization(m) and own_parameters(m)]
            if name in modules and name != "":
                raise ValueError(f"module {name!r} ({type(modules[name]).__name__}) has no parameters of its own; "
                                 f"layers with parameters: {candidates}")
            raise ValueError(f"no layer or parameter named {name!r} in {type(model).__name__}; layers with parameters: "
                             f"{candidates}")
    selection = Selection(list(entries.values()))
    chosen = {n for e in selection.entries for n in e.block_names()} | {e.module_name for e in selection.entries}
    for name, reason in _select_all(modules).skipped.items():
        if name not in chosen:
            selection.skipped[name] = reason
    for entry in _select_all(modules).entries:
        for block in entry.block_names():
            if block not in chosen:
                selection.skipped[block] = "not selected (layers= names the layers to factor)"
    return selection


def _add_parameter(entries: dict, module_name: str, module: nn.Module, local: str) -> None:
    key = (module_name, "parameters")
    if key not in entries:
        entries[key] = Entry(None, module_name, module, [], _origin(module))
    entries[key].local_names.append(local)


def _select_all(modules: dict[str, nn.Module]) -> Selection:
    selection = Selection([])
    used_by_parent: set[str] = set()  # children whose parameters their parent's per-sample blocks cover
    for name, module in modules.items():
        own = own_parameters(module)
        if not own or is_parametrization(module) or name in used_by_parent:  # originals: see their module
            continue
        if hook_computed_reason(module) is not None:
            selection.skipped[name] = hook_computed_reason(module)
            continue
        kind = kind_for(module)
        covered: list[str] = []
        if kind is not None and kind.unsupported_reason(module) is not None and not kind.per_sample_fallback(module):
            selection.skipped[name] = kind.unsupported_reason(module)
            continue
        if kind is not None and kind.unsupported_reason(module) is None:
            covered = kind.parameter_names(module)
            if not any(p.requires_grad for n, p in own if n in covered):
                selection.skipped[name] = FROZEN
            else:
                selection.entries.append(Entry(kind, name, module, covered))
        elif kind is not None:
            for child in kind.functional_children(module):
                used_by_parent.add(full_name(name, child))
                own = own + [(f"{child}.{local}", p) for local, p in own_parameters(module.get_submodule(child))]
        rest = [n for n, p in own if n not in covered]
        trainable = [n for n, p in own if n not in covered and p.requires_grad]
        if trainable:
            selection.entries.append(Entry(None, name, module, trainable, _origin(module)))
        for local in rest:
            if local not in trainable:
                selection.skipped[full_name(name, local)] = FROZEN
    return selection


# the extension API (a new kind: docs/layer_kinds.md); Entry, Selection, select, kronecker_kind and the accumulators
# of the built-in kinds are package-internal
__all__ = [
    "Accumulator",
    "KroneckerKind",
    "KroneckerSums",
    "LayerKind",
    "NormalizationKind",
    "PassSettings",
    "PerSampleStatistic",
    "forward_is",
    "kind_for",
    "kinds",
    "outputs_match",
    "register",
    "unregister",
]
