"""Outliers above the bulk (Sagun et al. 2017; Papyan 2020).

The bulk edge is placed at the widest gap, on a log scale, among the largest ``search`` eigenvalues: the
eigenvalues above the gap are outliers when the gap is a factor ``min_ratio`` or more. Values below
``1e-8 ×`` the largest are ignored (round-off). For cross-entropy the
expected count is about ``C − 1`` (the loss Hessian has rank ``C − 1``); report it beside ``C``.
"""

from __future__ import annotations

from torch import Tensor


def count_outliers(eigenvalues: Tensor, search: int = 50, min_ratio: float = 2.0) -> int:
    """Number of eigenvalues above the widest log-gap among the top ``search`` (0 when no gap reaches ``min_ratio``)."""
    values = eigenvalues.detach().double().flatten().sort(descending=True).values
    values = values[values > 1e-8 * values[0]][: search + 1]  # round-off-sized values have no meaningful gaps
    if len(values) < 2:
        return 0
    ratios = values[:-1] / values[1:]
    best = int(ratios.argmax())
    return best + 1 if float(ratios[best]) >= min_ratio else 0
