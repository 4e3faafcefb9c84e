"""Every collective the worker runs, and the one rule they follow: tensors live on the worker's device.

NCCL (the backend on GPU workers) only reduces CUDA tensors: an `all_reduce` of a CPU tensor
fails with "No backend type associated with device type cpu", while gloo (CPU workers) takes
either. So each helper moves what it sends to `device` first and hands results back on the CPU,
where the loop keeps its counters. Nothing else in `trainer/` calls `torch.distributed` for
data; a test keeps it so.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: torch.Tensor, device: torch.device | str, *, to_host: bool = True) -> torch.Tensor:
    """The element-wise sum of `values` over all ranks, as a new CPU tensor (`to_host=False`: left on
    `device`, where the host need not wait for it)."""
    if not distributed():
        return values.clone() if to_host else values.to(device, copy=True)
    buffer = values.to(device, copy=True)
    dist.all_reduce(buffer)
    return buffer.cpu() if to_host else buffer


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (pickled; torch stages them on the current device)."""
    if not distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def from_rank0(obj):
    """Rank 0's `obj` on every rank: what rank 0 decided (or saw), agreed by all."""
    return all_gather_objects(obj)[0]


def regather_persistent(params: list) -> None:
    """ZeRO-3: the whole tensor of each released parameter DeepSpeed keeps gathered between steps,
    gathered again from the ranks' partitions (DeepSpeed's own gather, as at the end of its step).
    Every rank passes the same parameters."""
    if params:
        params[0].all_gather(param_list=params)


def barrier() -> None:
    if distributed():
        dist.barrier()


def to_device(batch: dict, device: torch.device | str) -> dict:
    """A micro-batch's tensors on `device`; on CUDA through pinned memory, without blocking the host."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
