"""Data handling shared by the Kronecker and the exact paths: batches in, the model's output tensor out.

``data`` is either one ``(inputs, targets)`` pair or an iterable of such pairs (a list, a ``DataLoader``).
``inputs`` is a tensor (``model(inputs)``) or a dict of keyword arguments (``model(**inputs)``: transformers'
``input_ids``, ``attention_mask``, …). Batches are streamed: nothing here keeps more than the current batch.

The model's output is a tensor; a ``ModelOutput``-like object with ``.logits`` (transformers) gives its logits; any
other output needs ``output=``, a function from the model's return value to the output tensor. Losses take the
feature (class) axis as axis 1 (``docs/conventions.md`` §1): language-model logits ``(N, T, V)`` are presented as
``(N, V, T)`` with ``output=sequence_logits``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

Batch = tuple[Any, Tensor]
Data = Batch | Iterable[Batch]
OutputSelector = Callable[[Any], Tensor]


def sequence_logits(output: Any) -> Tensor:
    """Language-model logits ``(N, T, V)`` (``output.logits``, or the tensor itself) as ``(N, V, T)``: the class axis
    first, as ``CrossEntropyLoss`` takes it with ``(N, T)`` targets. Pass it as ``output=``."""
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"sequence_logits expects (N, T, V) logits (or an output with .logits), "
                         f"got {_describe(output)}")
    return logits.transpose(1, 2)


def _describe(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def model_output(model: nn.Module, inputs: Any, output: OutputSelector | None = None,
                 params: dict[str, Tensor] | None = None) -> Tensor:
    """The output tensor of ``model`` on one batch's ``inputs`` (``model(**inputs)`` for a dict), run with ``params``
    substituted functionally when given; ``output`` picks the tensor from what the model returns."""
    raw = call_model(model, inputs, params)
    if output is not None:
        selected = output(raw)
        if not isinstance(selected, Tensor):
            raise ValueError(f"output= must return a tensor of model outputs, it returned {_describe(selected)}")
        return selected
    if isinstance(raw, Tensor):
        return raw
    logits = getattr(raw, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ValueError(f"the model returned {_describe(raw)}, not a tensor: pass output=, a function from the model's "
                     "return value to the output tensor (e.g. output=lambda out: out[0]); outputs with .logits are "
                     "taken automatically")


def call_model(model: nn.Module, inputs: Any, params: dict[str, Tensor] | None = None) -> Any:
    """``model(**inputs)`` for a dict, ``model(inputs)`` otherwise (``functional_call`` with ``params`` when given)."""
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
    return model(*args, **kwargs) if params is None else functional_call(model, params, args, kwargs)


def _is_single_batch(data: Any) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)
            and isinstance(data[0], (Tensor, dict)))


def to_device(obj: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensors inside a tuple/list/dict, to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def iterate_batches(data: Data, device: torch.device) -> Iterator[tuple[int, Any, Tensor]]:
    """Yield ``(batch_index, inputs, targets)`` on ``device``; raise ``ValueError`` for malformed or empty data."""
    batches = [data] if _is_single_batch(data) else data
    if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
        raise ValueError(
            f"data must be an (inputs, targets) pair or an iterable of such pairs, got {type(data).__name__}"
        )
    count = 0
    for index, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"batch {index} is not an (inputs, targets) pair (got {type(batch).__name__}"
                f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}); "
                "kfac_hessian needs the targets to evaluate the loss"
            )
        inputs, targets = batch
        if not isinstance(targets, Tensor):
            raise ValueError(f"batch {index}: targets must be a tensor, got {type(targets).__name__}")
        if targets.dim() == 0 or targets.shape[0] == 0:
            raise ValueError(f"batch {index} is empty (targets of shape {tuple(targets.shape)})")
        count += 1
        yield index, to_device(inputs, device), targets.to(device)
    if count == 0:
        raise ValueError("data is empty: it yielded no batch")


def require_reiterable(data: Data) -> None:
    """The exact path passes over the data many times: a one-shot iterator would silently run dry."""
    if not _is_single_batch(data) and iter(data) is data:
        raise ValueError(
            "data is a one-shot iterator; operators pass over the data once per product, "
            "so give a list of batches or a DataLoader"
        )
