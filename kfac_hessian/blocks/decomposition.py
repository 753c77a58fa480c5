"""Eigendecompositions of many small symmetric matrices in one place: batched by size, split over ranks when
distributed.

Every block reduces to a few small PSD matrices (``CurvatureBlock.eig_matrices``: ``A`` and ``G`` of a Kronecker
block, the sub-blocks of ``DenseBlocks``); ``blocks.base.eig_blocks`` hands all of them here at once, keyed by
``(block name, index)``. Eigenvectors come from ``spectra.symmetric_eigs`` (concurrent ``syevd`` calls on the CPU,
one batched ``eigh`` per size elsewhere), eigenvalues alone from ``spectra.symmetric_eigvals`` (concurrent
tridiagonalizations on the CPU, batched ``eigvalsh`` elsewhere).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import distributed as _distributed
from ..spectra import ClampReport, symmetric_eigs, symmetric_eigvals


def decompose(matrices: dict, vectors: bool) -> dict:
    """``{key: (values (B, d), vectors (B, d, d) or None, reports, forms)}`` for ``{key: (B, d, d)}``."""
    keys = list(matrices)
    if not vectors:
        decomposed = symmetric_eigvals([matrices[k] for k in keys])
        return {k: (values, None, reports, forms) for k, (values, reports, forms) in zip(keys, decomposed)}
    decomposed = symmetric_eigs([matrices[k] for k in keys])
    return {k: (values, vecs, reports, [None] * len(values)) for k, (values, vecs, reports) in zip(keys, decomposed)}


def decompose_distributed(matrices: dict, vectors: bool) -> dict:
    """Each rank decomposes the matrices assigned to it by cost and broadcasts them, packed (a ``Tridiagonal`` form
    stays with its rank: elsewhere the leading eigenvectors come from a full ``eigh`` when asked for)."""
    _distributed.require_process_group()
    keys = list(matrices)
    costs = [float(len(matrices[k])) * float(matrices[k].shape[-1]) ** 3 for k in keys]
    owners = _distributed.assign_by_cost(costs, dist.get_world_size())
    mine = decompose({k: matrices[k] for k, o in zip(keys, owners) if o == dist.get_rank()}, vectors)
    like = next(iter(matrices.values()))
    results = {}
    for rank in range(dist.get_world_size()):
        owned = [k for k, o in zip(keys, owners) if o == rank]
        shapes, tensors = [], []
        for k in owned:
            b, d = matrices[k].shape[:2]
            shapes += [(b, d), (b, 2)] + ([(b, d, d)] if vectors else [])
            if rank == dist.get_rank():
                values, vecs, reports, _ = mine[k]
                tensors += ([values, torch.tensor([[r.count, r.most_negative] for r in reports])]
                            + ([vecs] if vectors else []))
        received = iter(_distributed.broadcast_packed(rank, shapes, tensors, matrices[owned[0]] if owned else like))
        for k in owned:
            values, report = next(received), next(received)
            vecs = next(received) if vectors else None
            reports = [ClampReport(int(c), float(v)) for c, v in report.tolist()]
            results[k] = (values, vecs, reports, [None] * len(values))
    return results
