"""Gradient routing: every call's output gradient reaches its accumulator; a call the output does not depend on
counts as zeros."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kfac_hessian as kh

from ..conftest import batches, classification_data
from ..references import EXACT, rel_err


class _CalledTwiceOnceUnused(nn.Module):
    """``shared`` is called twice; the second call's output never reaches the model output (zero gradient)."""

    def __init__(self, unused_call: bool):
        super().__init__()
        torch.manual_seed(5)
        self.shared, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.unused_call = unused_call

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        if self.unused_call:
            self.shared(2 * x)
        return self.head(h)


@pytest.mark.parametrize("column_chunk", [1, 100])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_a_call_without_influence_counts_as_zero_gradients(column_chunk, approx):
    X, y = classification_data(n=6, d=4, classes=3)
    with_call, without = (
        kh.compute_kfac(_CalledTwiceOnceUnused(u).double(), nn.CrossEntropyLoss(), batches(X, y, [4, 2]),
                        approx=approx, column_chunk=column_chunk)
        for u in (True, False)
    )
    # the unused call's input joins A as further locations; its (zero) gradients add nothing to G
    assert rel_err(with_call["shared"].G, without["shared"].G) < EXACT
    rows = torch.cat([torch.cat([X, torch.ones(6, 1)], 1), torch.cat([2 * X, torch.ones(6, 1)], 1)])
    if approx == "reduce":
        rows = (rows[:6] + rows[6:]) / 2
    assert rel_err(with_call["shared"].A, rows.T @ rows / len(rows)) < EXACT


class _Recording:
    """An accumulator that only records what it is handed."""

    def __init__(self, streams: bool):
        self.streams, self.skip_reason, self.received = streams, None, []

    def add_gradients(self, gradients):
        self.received.append(gradients)


def test_the_router_streams_single_calls_and_holds_the_others_until_flush():
    from kfac_hessian.capture import LayerCall
    from kfac_hessian.factors.routing import GradientRouter

    shape = torch.Size([2, 3])
    accumulators = {"once": _Recording(True), "twice": _Recording(True), "held": _Recording(False),
                    "skipped": _Recording(True)}
    accumulators["skipped"].skip_reason = "not per sample"
    router = GradientRouter(accumulators)
    router.start_batch({"once": [LayerCall(None, None, [shape])], "twice": [LayerCall(None, None, [shape])] * 2,
                        "held": [LayerCall(None, None, [shape])], "skipped": [LayerCall(None, None, [shape])],
                        "unknown": [LayerCall(None, None, [shape])]})
    g = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for key in accumulators.keys() | {"unknown"}:
        router.receive(key, 0, 0, g)
    assert len(accumulators["once"].received) == 1 and accumulators["once"].received[0][0][0] is g  # as it came
    assert not accumulators["twice"].received and not accumulators["held"].received  # held until the flush
    router.flush(1, torch.float64, torch.device("cpu"))
    (twice,) = accumulators["twice"].received
    assert twice[0][0] is g and torch.equal(twice[1][0], torch.zeros(1, *shape, dtype=torch.float64))  # no gradient
    assert accumulators["held"].received == [[[g]]] and not accumulators["skipped"].received
    router.flush(1, torch.float64, torch.device("cpu"))  # nothing received since: nothing handed on
    assert len(accumulators["twice"].received) == 1 and len(accumulators["held"].received) == 1
