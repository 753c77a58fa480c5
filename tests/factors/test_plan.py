"""The plan of a pass against the pass itself: every factor's representation, shape and bytes against the factors
compute_kfac returns, the backward passes against the backward passes it runs, the columns' arithmetic per option; the
refusal before any backward pass; no side effects of the planning forward."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import kfac_hessian as kh
from kfac_hessian import limits
from kfac_hessian.blocks.row_factor import RowFactor
from kfac_hessian.factors.plan import PlanExceedsBudget, plan

from ..conftest import PerPosition, classification_data, mlp


def _tiny_gpt():
    from benchmarks.reference_models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(40, dim=8, depth=1, heads=2, context=6).double()
    tokens = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    return model, (tokens[:, :-1], tokens[:, 1:])


class _CountedBackward:
    """Counts the backward passes (``torch.autograd.grad`` calls) of a pass."""

    def __init__(self, monkeypatch):
        self.calls, original = 0, torch.autograd.grad

        def grad(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", grad)


def _actual_bytes_and_form(block, factor: str) -> tuple[int, str, tuple[int, ...]]:
    if factor == "block":
        return block.blocks.numel() * block.blocks.element_size(), "sums", tuple(block.blocks.shape)
    matrix = block.a_factor if factor == "A" else block.g_factor
    if isinstance(matrix, RowFactor):
        return matrix.rows.numel() * matrix.rows.element_size(), "rows", tuple(matrix.rows.shape)
    form = "diagonal" if matrix.dim() == 1 else "dense"
    return matrix.numel() * matrix.element_size(), form, tuple(matrix.shape[-2:] if matrix.dim() > 1 else matrix.shape)


@pytest.mark.parametrize("options", [dict(curvature="mc", seed=0), dict(per_position=True), dict(column_signs=3),
                                     dict(curvature="mc", mc_samples=2, seed=0, column_chunk=2)])
def test_plan_matches_the_factors_and_backward_passes_of_the_pass(monkeypatch, options):
    """Factors of width ≥ 16 keep their rows while fewer (the row limit lowered so that a tiny model has both forms):
    the plan's representation, shape and bytes are those of the returned factors, and its backward passes per batch
    those the pass runs."""
    monkeypatch.setattr(limits, "ROW_FACTOR_MIN_WIDTH", 16)
    model, data = _tiny_gpt()
    cost = plan(model, nn.CrossEntropyLoss(), data, **options)
    counter = _CountedBackward(monkeypatch)
    kfac = kh.compute_kfac(model, nn.CrossEntropyLoss(), data, **options)
    assert counter.calls == cost.backward_passes_per_batch  # one batch
    assert {f.block for f in cost.factors} == set(kfac)
    forms = set()
    for f in cost.factors:
        actual_bytes, form, shape = _actual_bytes_and_form(kfac[f.block], f.factor)
        forms.add(form)
        assert (f.representation, f.bytes) == (form, actual_bytes), f
        if form != "sums":
            assert f.shape == shape, f
    assert {"rows", "dense", "diagonal", "sums"} <= forms or options.get("per_position") or options.get(
        "column_signs")  # ggn columns outgrow every width: no rows there


@pytest.mark.parametrize("options, columns", [
    (dict(), 6),  # C − 1 = 6 loss-Hessian columns, one random-sign draw per position
    (dict(position_signs=0), 6),
    (dict(position_signs=2), 12),
    (dict(per_position=True), 18),  # K·T
    (dict(column_signs=5), 5),
    (dict(curvature="mc", mc_samples=3), 3),
    (dict(curvature="empirical"), 1),
])
def test_columns_and_backward_passes_per_option(options, columns):
    model = PerPosition(c=7).double()
    X = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for chunk in (None, 4):
            cost = plan(model, nn.CrossEntropyLoss(), (X, y), column_chunk=chunk, **options)
            assert cost.columns_per_batch == columns and cost.positions == 3 and cost.samples_per_batch == 2
            assert cost.backward_passes_per_batch == (columns if chunk is None else math.ceil(columns / chunk))
    # the factors: A (w, w) per Linear, G (d_out, d_out); float64
    widths = {"fc1": (5, 5), "fc2": (6, 7)}
    for f in cost.factors:
        d_in, d_out = widths[f.block]
        side = d_in if f.factor == "A" else d_out
        assert (f.representation, f.shape, f.bytes) == ("dense", (side, side), side * side * 8)


def test_refused_before_any_backward_pass_with_the_cheaper_choices(monkeypatch):
    model, data = _tiny_gpt()
    counter = _CountedBackward(monkeypatch)
    with pytest.raises(PlanExceedsBudget, match="exceeds the budget") as refused:
        kh.compute_kfac(model, nn.CrossEntropyLoss(), data, memory_budget=1000)
    assert counter.calls == 0 and isinstance(refused.value, ValueError)
    message = str(refused.value)
    assert "curvature='mc'" in message and "column_signs=" in message and "fewer positions" in message
    assert refused.value.plan.peak_bytes > 1000
    with pytest.raises(PlanExceedsBudget, match=r"above time_budget=1e-06 s") as refused:
        kh.compute_kfac(model, nn.CrossEntropyLoss(), data, time_budget=1e-6)
    assert counter.calls == 0 and refused.value.plan.seconds > 1e-6
    # within the budgets the same call runs
    kh.compute_kfac(model, nn.CrossEntropyLoss(), data, curvature="mc", seed=0, time_budget=600)
    assert counter.calls == 1


def test_the_planning_forward_leaves_model_and_rng_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3)).double().train()
    X, y = classification_data()
    X = X.double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    printed = str(plan(model, nn.CrossEntropyLoss(), (X, y)))
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())
    assert "| 0 | A | dense | 6 × 6 | 1 |" in printed and "fits the budgets" in printed


def test_one_shot_iterators_are_planned_and_streamed_whole():
    model = mlp(nn.Tanh).double()
    X, y = classification_data()
    batches = [(X[:6].double(), y[:6]), (X[6:].double(), y[6:])]
    from_list = kh.compute_kfac(model, nn.CrossEntropyLoss(), batches)
    from_generator = kh.compute_kfac(model, nn.CrossEntropyLoss(), (b for b in batches))
    assert from_generator.n_samples == from_list.n_samples == len(X)
    assert all(torch.equal(from_list[n].G, from_generator[n].G) for n in from_list)
    assert plan(model, nn.CrossEntropyLoss(), (b for b in batches)).batches is None
    assert plan(model, nn.CrossEntropyLoss(), batches).batches == 2


@pytest.mark.parametrize("n", [2, 6])
def test_the_first_batch_counts_the_probes_recorded_tensors_on_its_samples(monkeypatch, n):
    """The sample-axis probe runs the model on the first ``limits.SAMPLE_AXIS_PROBE_SAMPLES`` samples of the first
    batch: the tensors its run records (every recorded call's outputs and the model output) are the plan's recorded
    bytes in that share of the batch, and the first batch's extra memory is that share of a forward's."""
    from kfac_hessian.factors import sample_axis

    model = mlp(nn.Tanh).double()
    X, y = classification_data(n=n)
    X = X.double()
    recorded = []
    original = sample_axis._recorded

    def spy(recorder, run, inputs, keep=False):
        calls, output, kept = original(recorder, run, inputs, keep)
        if not recorded:  # the probe's first run, on the samples it probes
            leaves = [call.output_values for key_calls in calls.values() for call in key_calls]
            recorded.append(sum(t.numel() * t.element_size() for t in [*leaves, output]))
        return calls, output, kept

    monkeypatch.setattr(sample_axis, "_recorded", spy)
    cost = plan(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=0)
    kh.compute_kfac(model, nn.CrossEntropyLoss(), (X, y), curvature="mc", seed=0)
    share = min(n, limits.SAMPLE_AXIS_PROBE_SAMPLES) / n
    assert recorded[0] == cost.recorded_bytes * share
    assert cost.first_batch_bytes == round((cost.activation_bytes + cost.recorded_bytes) * share)
    assert cost.peak_bytes == (cost.activation_bytes + cost.recorded_bytes + cost.first_batch_bytes
                               + cost.column_bytes + cost.backward_bytes + cost.factor_bytes)
