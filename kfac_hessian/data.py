"""Data handling shared by the Kronecker and the exact paths.

``data`` is either one ``(inputs, targets)`` pair of tensors or an iterable of such pairs (a list, a
``DataLoader``). Batches are streamed: nothing here keeps more than the current batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Union

import torch
from torch import Tensor

Batch = tuple[Any, Tensor]
Data = Union[Batch, Iterable[Batch]]


def _is_single_batch(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)


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
