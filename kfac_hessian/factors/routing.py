"""Output gradients from the backward pass to the accumulators, call by call and output leaf by leaf.

The gradients of a module called once (with one output leaf, and an accumulator that ``streams``) are added as
they arrive, so each is dropped right after its use; those of a module called several times, with several output
leaves, or whose accumulator needs them together (per-sample parameters) are held until ``flush`` (after each
backward pass), where a call or leaf the output did not depend on counts as zeros.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..capture import LayerCall
from ..layers import Accumulator
from ..model_state import no_autocast


class GradientRouter:
    """Hands the gradient of every recorded output leaf to the accumulator recorded under its key."""

    def __init__(self, accumulators: Mapping[str, Accumulator]):
        self.accumulators = accumulators
        self.calls: Mapping[str, list[LayerCall]] = {}
        self.pending: dict[str, list[list[Tensor | None]]] = {}

    def start_batch(self, calls: Mapping[str, list[LayerCall]]) -> None:
        self.calls = calls
        self.pending = {}
        for key, key_calls in calls.items():
            acc = self.accumulators.get(key)
            if acc is None or not key_calls:
                continue
            if len(key_calls) > 1 or not acc.streams or any(len(c.output_shapes) != 1 for c in key_calls):
                self.pending[key] = [[None] * len(c.output_shapes) for c in key_calls]

    def receive(self, key: str, call: int, leaf: int, grads: Tensor) -> None:
        """``grads`` ``(K, N, *leaf.shape[1:])``: ``K`` columns' gradients w.r.t. one output leaf of one call."""
        acc = self.accumulators.get(key)
        if acc is None or acc.skip_reason is not None:
            return
        if key in self.pending:
            self.pending[key][call][leaf] = grads
        else:
            with no_autocast():  # inside the backward, where the caller's autocast state still holds
                acc.add_gradients([[grads]])

    def receive_one(self, key: str, call: int, leaf: int, grad: Tensor) -> None:
        """One column's gradient (shaped like the output leaf), as the recorder hands it over."""
        self.receive(key, call, leaf, grad.unsqueeze(0))

    def flush(self, k: int, dtype: torch.dtype, device: torch.device) -> None:
        for key, slots in self.pending.items():
            if all(g is None for call in slots for g in call):
                continue
            for call, leaves in zip(self.calls[key], slots):
                for leaf, g in enumerate(leaves):
                    if g is None:
                        leaves[leaf] = torch.zeros((k, *call.output_shapes[leaf]), dtype=dtype, device=device)
            acc = self.accumulators[key]
            if acc.skip_reason is None:
                acc.add_gradients(slots)
            self.pending[key] = [[None] * len(c.output_shapes) for c in self.calls[key]]


def backpropagate_together(output: Tensor, chunk: Tensor, calls: Mapping[str, list[LayerCall]],
                           router: GradientRouter, retain: bool) -> None:
    """One (vectorized when ``len(chunk) > 1``) backward pass of ``chunk`` to all recorded outputs at once."""
    targets = [(key, i, leaf, z) for key, key_calls in calls.items() for i, call in enumerate(key_calls)
               for leaf, z in enumerate(call.outputs or [])]
    batched = len(chunk) > 1  # a single column skips vmap's batching rules
    grads = torch.autograd.grad(output, [z for *_, z in targets], grad_outputs=chunk if batched else chunk[0],
                                is_grads_batched=batched, allow_unused=True, retain_graph=retain)
    for (key, index, leaf, _), grad in zip(targets, grads):
        if grad is not None:  # None: the call did not influence the output
            router.receive(key, index, leaf, grad if batched else grad.unsqueeze(0))
