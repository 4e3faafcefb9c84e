"""Version files are read back from shared storage, which other jobs and people can write to, so
they are never unpickled as code: every `torch.load` of a process that reads them loads weights
only (tensors, plain containers, numbers, strings), DeepSpeed's own loads included, although
DeepSpeed passes `weights_only=False` (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides it).

DeepSpeed's files hold four types of its own besides those; they are allowed by name. They were
found by loading every file of ZeRO 0-3 versions, resized ones included, with weights only.
Our own small files (RNG states, data positions, trainer state) are JSON.

    python -m trainer.versions.safe_load MODULE ARGS...   runs a module (DeepSpeed's ds_to_universal) the same way
"""

from __future__ import annotations

import os
import runpy
import sys

import torch


def deepspeed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_loads() -> None:
    """From now on, every torch.load of this process (and of the processes it starts) loads weights only."""
    torch.serialization.add_safe_globals(deepspeed_globals())
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


if __name__ == "__main__":
    weights_only_loads()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
