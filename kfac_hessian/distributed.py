"""Data-parallel helpers on ``torch.distributed`` (gloo on CPU, nccl on GPU).

Every rank streams its own shard of the data. The library sums unnormalized quantities (factor sums,
row and sample counts, operator products) and all-reduces them in **one flattened collective per call**
before any normalization, so ranks may hold different numbers of samples and every rank ends with the
same result. Eigendecompositions are split by cost (≈ d³ per factor, longest-processing-time first):
each rank decomposes its share and broadcasts it packed in one buffer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialized torch.distributed process group (init_process_group)")


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sum each tensor over all ranks with a single all-reduce of one flat buffer."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out


def assign_by_cost(costs: list[float], world_size: int) -> list[int]:
    """Owner rank of each job: longest first, each to the least loaded rank (LPT scheduling)."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(world_size), key=loads.__getitem__)
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def broadcast_packed(owner: int, shapes: list[tuple[int, ...]], tensors: list[Tensor] | None,
                     like: Tensor) -> list[Tensor]:
    """Rank ``owner`` sends ``tensors`` (with the given shapes) packed in one buffer; all ranks return them."""
    size = sum(int(torch.Size(s).numel()) for s in shapes)
    if dist.get_rank() == owner:
        buffer = torch.cat([t.reshape(-1).to(like.dtype) for t in tensors]) if tensors else like.new_zeros(0)
    else:
        buffer = like.new_empty(size)
    if size:
        dist.broadcast(buffer, src=owner)
    out, start = [], 0
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        out.append(buffer[start : start + n].reshape(shape))
        start += n
    return out


def require_seed_for(op, seed: int | None) -> None:
    """Random start vectors must be the same on every rank: a distributed operator needs an explicit seed."""
    if getattr(op, "distributed", False) and seed is None:
        raise ValueError("a distributed operator needs seed= so that every rank draws the same random vectors")
