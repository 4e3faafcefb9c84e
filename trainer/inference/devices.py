"""The device of a process that is not a training rank (validation tasks, serving replicas, `mtl eval`)."""

from __future__ import annotations

import torch

from trainer.runtime import in_ray_worker, ray_gpu_ids


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
        return torch.device("cuda" if ray_gpu_ids() else "cpu")
    return torch.device("cuda")
