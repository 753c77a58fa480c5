"""Sample layouts: moving the samples of a tensor first and back, for every layout the probe can find — checked
against the tensor built sample by sample."""

from __future__ import annotations

import pytest
import torch

from kfac_hessian.sample_layout import SHARED, WHOLE, SampleLayout


def _per_sample(n: int = 3, rows: int = 2, d: int = 4) -> torch.Tensor:
    """Sample ``i``'s rows are ``(rows, d)`` values that name it: ``100·i + …``."""
    return torch.stack([100 * i + torch.arange(rows * d, dtype=torch.float64).reshape(rows, d) for i in range(n)])


def test_an_axis_layout_moves_the_samples_first_and_one_sample_round_trips():
    samples = _per_sample()  # (N, T, d)
    sequence_first = samples.transpose(0, 1)  # (T, N, d)
    layout = SampleLayout("axis", 1, samples=3)
    assert layout.fits(sequence_first) and not layout.fits(sequence_first[:, :2])
    assert torch.equal(layout.samples_first(sequence_first), samples)
    one = layout.samples_first(sequence_first)[1]
    assert torch.equal(layout.from_batch_of_one(layout.as_batch_of_one(one)), one)
    assert layout.as_batch_of_one(one).shape == (2, 1, 4)
    assert torch.equal(layout.first(sequence_first, 2), sequence_first[:, :2])


@pytest.mark.parametrize("sample_major", [True, False])
def test_flattened_rows_in_either_order_give_each_sample_its_rows(sample_major):
    samples = _per_sample()  # (N, R, d)
    flat = samples.reshape(-1, 4) if sample_major else samples.transpose(0, 1).reshape(-1, 4)  # (N·R, d)
    layout = SampleLayout("rows", 0, sample_major, samples=3)
    assert layout.fits(flat)
    assert torch.equal(layout.samples_first(flat), samples)
    first_two = layout.first(flat, 2)
    assert torch.equal(SampleLayout("rows", 0, sample_major, samples=2).samples_first(first_two), samples[:2])


def test_whole_shared_and_bound():
    tensor = torch.randn(2, 4)
    assert torch.equal(WHOLE.samples_first(tensor), tensor.unsqueeze(0))
    assert SampleLayout("axis", 1).bound(1) is WHOLE and SampleLayout("axis", 1).bound(5).samples == 5
    assert not SHARED.carries_samples and SHARED.bound(1) is not WHOLE
    with pytest.raises(ValueError, match="no sample axis"):
        SHARED.samples_first(tensor)
    assert "position-major" in SampleLayout("rows", 0, False, 3).describe()
