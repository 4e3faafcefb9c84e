"""A DeepSpeed checkpoint engine that leaves the writing of a version's files for later.

`engine.save_checkpoint` hands each state dict to its checkpoint engine's `save`; DeepSpeed's
own engine serialises it there, on the training thread. Here `save` only copies the state to
host memory, and the version's upload thread (trainer.versions.checkpoint.Upload) writes the copies.
DeepSpeed's decoupled engine does the same in a subprocess but needs its async-IO op, which
is not built on every machine.

A copy needs host memory for this rank's whole state. Where the host cannot spare it (training
on CPU or with the optimizer offloaded, where the state already lives in host memory and a
0.7B model's AdamW state is 4.3 GB per rank of 2), `save` serialises the state where it is
instead: training waits for torch.save, and memory stays as it was.
"""

from __future__ import annotations

import copy

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine


def snapshot(obj, copy_tensor, memo: dict | None = None):
    """A copy of a state dict whose tensors are copies (`copy_tensor`), so training can change
    the originals.

    Containers are copied (their types kept), other values are shared: they are not changed by
    a training step. A tensor that appears twice is copied once.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = copy_tensor(obj)
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps OrderedDict's _metadata, a defaultdict's factory
        for key, value in obj.items():
            out[key] = snapshot(value, copy_tensor, memo)
        return out
    if isinstance(obj, list):
        return [snapshot(v, copy_tensor, memo) for v in obj]
    if isinstance(obj, tuple):
        values = [snapshot(v, copy_tensor, memo) for v in obj]
        if all(a is b for a, b in zip(values, obj)):
            return obj  # immutable and holds no tensor (torch.Size, shapes): keep it as it is
        return obj._make(values) if hasattr(obj, "_make") else type(obj)(values)
    return obj


class DeferredWrites(TorchCheckpointEngine):
    """DeepSpeed's checkpoint engine, with `save` split in two: during `save_checkpoint` each
    state is copied to host memory (`snapshot`); trainer.versions.checkpoint.write_pending serialises
    the copies later, on the upload thread. Training waits for a memory copy instead of
    torch.save and the disk.

    The copies go into the same host buffers each version (in the order DeepSpeed saves, which
    does not change): fresh memory would cost a page fault per page on every version. The price
    is host memory for one copy of this rank's state, for the whole run (pinned on GPUs, so the
    copy from the device is a DMA). A buffer is reused only once the previous version's files
    are written: `save` refuses to run before.

    `spare_bytes()` says how much fresh host memory a copy may take (None: no limit); a state
    whose copy would need more is written by `save` itself (`written_in_place` counts them).
    """

    def __init__(self, spare_bytes=None):
        super().__init__()
        self.pending: list[tuple[object, str]] = []
        self._taken: list = []  # emptied by write_pending once the files are on disk
        self._buffers: list[torch.Tensor] = []
        self._used = 0
        self._spare_bytes = spare_bytes
        self.written_in_place = 0

    def save(self, state_dict, path: str) -> None:
        if self._taken:
            raise RuntimeError("a version was saved before the previous one's files were written")
        if not self._copy_fits(state_dict):
            self.written_in_place += 1
            super().save(state_dict, path)
            return
        self.pending.append((snapshot(state_dict, self._copy), path))

    def _copy_fits(self, state_dict) -> bool:
        """Whether copying this state takes no more fresh memory than the host can spare (buffers
        of the right shape left from the last version are reused, not fresh)."""
        if self._spare_bytes is None:
            return True
        tensors: list[torch.Tensor] = []
        snapshot(state_dict, lambda t: tensors.append(t) or t)  # in the order, and as often, as _copy runs
        fresh, index = 0, self._used
        for tensor in tensors:
            buffer = self._buffers[index] if index < len(self._buffers) else None
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                fresh += tensor.numel() * tensor.element_size()
            index += 1
        if fresh == 0:
            return True
        spare = self._spare_bytes()
        return spare is None or fresh <= spare

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        index, self._used = self._used, self._used + 1
        if index == len(self._buffers):
            self._buffers.append(None)
        buffer = self._buffers[index]
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
            self._buffers[index] = buffer
        return buffer.copy_(tensor.detach())

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)  # see trainer.versions.safe_load

    def preserves_storage_sharing(self) -> bool:
        return False  # every tensor is copied on its own: no view drags its whole buffer along

    def take(self) -> list[tuple[object, str]]:
        """The states saved since the last take, for write_pending (which empties the list)."""
        self._taken, self.pending, self._used = self.pending, [], 0
        return self._taken
