"""How many parameters every block and skipped entry holds, and which parameters modules share (weight tying)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..layers.parameters import full_name


@dataclass(frozen=True)
class ParameterCounts:
    """``counts``: parameters per block and skipped entry (each parameter counted once, at its first use in that
    order); the model's ``total`` and ``trainable`` (``requires_grad``) parameters; the trainable ones the blocks
    cover (``covered_trainable``); the tied parameters per module (``tied``)."""

    counts: dict[str, int]
    total: int
    trainable: int
    covered_trainable: int
    tied: dict[str, list[str]]


def parameter_counts(model: nn.Module, parameter_names: dict[str, list[str]], skipped: dict[str, str]
                     ) -> ParameterCounts:
    """How many parameters every block and skipped entry holds, and the model's totals (``ParameterCounts``)."""
    modules = dict(model.named_modules())
    owned = {full_name(m, p): param for m, module in modules.items()
             for p, param in module.named_parameters(recurse=False)}
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
    covered = {id(owned[n]): owned[n] for names in parameter_names.values() for n in names}
    return ParameterCounts(counts, sum(p.numel() for p in model.parameters()),
                           sum(p.numel() for p in model.parameters() if p.requires_grad),
                           sum(p.numel() for p in covered.values() if p.requires_grad), tied_parameters(modules))


def tied_parameters(modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Per module, which of its own parameters another module registered first (``"weight is wte.weight"``)."""
    first_owner: dict[int, str] = {}
    tied: dict[str, list[str]] = {}
    for name, module in modules.items():
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in first_owner:
                tied.setdefault(name, []).append(f"{p_name} is {first_owner[id(param)]}")
            else:
                first_owner[id(param)] = full_name(name, p_name)
    return tied
