"""The device of a process that is not a training rank (validation tasks, serving replicas, `mtl eval`)."""

from __future__ import annotations

import torch


def helper_device() -> torch.device:
    """CUDA only where this process owns a GPU.

    A Ray task or actor that reserved no GPU still sees every GPU of its node (Ray sets
    CUDA_VISIBLE_DEVICES only for those that reserve some), so `torch.cuda.is_available()` would
    put it on a training rank's GPU: it computes on the CPU instead. Outside Ray (a command on the
    user's machine) a GPU there is its own.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if in_ray_worker():
        import ray

        return torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    return torch.device("cuda")


def in_ray_worker() -> bool:
    """Whether this process is a Ray task's or actor's (not a driver, not outside Ray)."""
    import ray

    if not ray.is_initialized():  # checked first: asking anything else of Ray would start one
        return False
    from ray._private.worker import WORKER_MODE, global_worker  # no public way to tell a driver from a worker

    return global_worker.mode == WORKER_MODE
