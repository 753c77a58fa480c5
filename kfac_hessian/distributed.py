"""Data-parallel helpers on ``torch.distributed`` (gloo on CPU, nccl on GPU).

Every rank streams its own shard of the data. The library sums unnormalized quantities (factor sums,
row and sample counts, operator products) and all-reduces them in **one flattened collective per call**
before any normalization, so ranks may hold different numbers of samples and every rank ends with the
same result. Eigendecompositions are split by cost (≈ d³ per factor, longest-processing-time first):
each rank decomposes its share and broadcasts it packed in one buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn


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


# A model sharded with torch FSDP (``torch.distributed.fsdp.fully_shard``) holds each parameter as a ``DTensor``
# sharded along one mesh axis: every rank stores a slice of it (its *local shard*), and FSDP reduce-scatters each
# gradient into the same slices. The helpers below let a product see a sharded parameter as its local shard plus
# the positions of that shard in the flattened full parameter.


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient of a model sharded with FSDP)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank stores: a ``DTensor``'s local shard (the same storage), else ``tensor``."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_positions(param: Tensor) -> Tensor:
    """Positions of this rank's local elements in ``param.flatten()``, in the order of ``local_tensor(param)
    .flatten()``: all of them for an ordinary tensor; for a ``DTensor``, those of its shard (uneven and empty shards
    included). Only a ``DTensor`` sharded over one mesh axis spanning the whole process group is supported (FSDP's
    ``fully_shard`` on the default mesh): a replicated axis (HSDP) would hold one gradient slice on several ranks."""
    device = local_tensor(param).device
    index = torch.arange(param.numel(), device=device)
    if not is_sharded(param):
        return index
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1 or not all(isinstance(p, Shard) for p in placements) or mesh.size() != dist.get_world_size():
        raise NotImplementedError(
            f"a DTensor parameter with placements {placements} on a mesh of shape {tuple(mesh.shape)} in a process "
            f"group of {dist.get_world_size()} ranks: only parameters sharded over one mesh axis spanning every rank "
            "(fully_shard on the default mesh) are supported, not hybrid sharding (HSDP) or sub-meshes")
    # without a source rank, every rank cuts its own slice of the (identical) index tensor: no communication
    return distribute_tensor(index.reshape(param.shape), mesh, placements, src_data_rank=None).to_local().reshape(-1)


@contextlib.contextmanager
def summed_fsdp_gradients(model: nn.Module) -> Iterator[None]:
    """FSDP reduce-scatters gradients as a mean over its ranks by default; inside, every ``fully_shard``'ed module of
    ``model`` sums them with a plain sum collective (gradient divide factor 1 and sum-only reductions, what
    ``FSDPModule.set_gradient_divide_factor(1.0)`` and ``set_force_sum_reduction_for_comms(True)`` set: a divide
    factor alone becomes a ``PREMUL_SUM`` in float32, which gloo lacks), and each group gets its own settings back on
    exit. Does nothing for a model without FSDP modules."""
    if not dist.is_available():
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [group for module in model.modules() if isinstance(module, FSDPModule)
              for group in module._get_fsdp_state()._fsdp_param_groups]
    settings = ("gradient_divide_factor", "force_sum_reduction_for_comms")
    if any(not hasattr(group, name) for group in groups for name in settings):
        raise NotImplementedError("this torch's FSDP parameter groups lack gradient_divide_factor or "
                                  "force_sum_reduction_for_comms; summed gradients need a torch whose FSDPModule has "
                                  "set_gradient_divide_factor and set_force_sum_reduction_for_comms")
    saved = [(group, [getattr(group, name) for name in settings]) for group in groups]
    for group in groups:
        group.gradient_divide_factor, group.force_sum_reduction_for_comms = 1.0, True
    try:
        yield
    finally:
        for group, values in saved:
            for name, value in zip(settings, values):
                setattr(group, name, value)

def free_gathered_parameters(model: nn.Module) -> None:
    """Free the full parameters FSDP gathered for a forward (``FSDPModule.reshard``): the root module keeps its own
    after a forward, for the backward it expects, so a forward without gradients that follows a change of the local
    shards would otherwise run on the stale gathered copy. Does nothing for a model without FSDP modules."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
