"""The outlier count."""

from __future__ import annotations

import pytest
import torch

from kfac_hessian.analyses import count_outliers


@pytest.mark.parametrize("n_outliers", [0, 1, 9])
def test_planted_outliers(n_outliers):
    g = torch.Generator().manual_seed(n_outliers)
    bulk = torch.rand(500, generator=g) * 0.1  # bulk within [0, 0.1]
    outliers = 5 + torch.rand(n_outliers, generator=g) * 10
    assert count_outliers(torch.cat([bulk, outliers])) == n_outliers
