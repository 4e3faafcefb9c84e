"""The heads of tasks a step does not train stay exactly as they were.

A task that is not in a step's plan (early-stopped, or not drawn this step) has zero gradients
in its head, yet AdamW still moves it: weight decay shrinks it, and the moments of earlier steps
keep pushing (measured: a stopped task's head drifted every step, and its validation score with
it). Optimizers cannot skip a parameter inside DeepSpeed's flat partitions, so the guard puts the
heads back: before the step it copies what this rank holds of each such head (the module's tensor
or ZeRO-3 partition, and the optimizer's fp32 master fragment), after the step it copies them
back. Everything stays on the device (no host read) and is local to the rank (every rank
restores its own part of the same values) but for one gather under ZeRO-3: a small parameter kept
whole between steps is gathered from the partitions at the end of each step, before the guard
puts the partitions back, so it is gathered again after (without that, the live model kept the
moved head while its version held the restored one).
"""

from __future__ import annotations

import torch

from trainer.collectives import regather_persistent


def rank_tensors(p: torch.nn.Parameter) -> list[torch.Tensor]:
    """What this rank holds of a parameter that a step may change: the module's tensor (under ZeRO-3
    its partition), and the optimizer's fp32 master fragment where there is one apart from it. A
    ZeRO-3 parameter small enough to be kept whole between steps (`ds_persist`) is gathered anew
    from the partitions at the end of every step; `HeadGuard.restore` gathers it again."""
    held = []
    if hasattr(p, "ds_tensor"):  # ZeRO-3
        held.append(p.ds_tensor)
        optimizer = getattr(p, "_z3_optimizer", None)
        if optimizer is not None:
            held.append(optimizer.get_local_fp32_param(p))
    else:
        held.append(p.data)
        fragment = getattr(getattr(p, "_hp_mapping", None), "hp_fragment", None)  # ZeRO-1/2, bf16
        if fragment is not None:
            held.append(fragment)
    seen, unique = set(), []
    for t in held:
        if t is None or not t.numel():
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


class HeadGuard:
    def __init__(self, heads: torch.nn.ModuleDict):
        self.params = {task: list(head.parameters()) for task, head in heads.items()}

    def hold(self, untrained: list[str]) -> list[tuple[torch.nn.Parameter, list[torch.Tensor]]]:
        """Copies of what this rank holds of the untrained tasks' heads, before a step."""
        return [(p, [t.detach().clone() for t in rank_tensors(p)]) for task in untrained
                for p in self.params.get(task, ())]

    @staticmethod
    @torch.no_grad()
    def restore(held: list[tuple[torch.nn.Parameter, list[torch.Tensor]]]) -> None:
        """After the step: the held values back in place. Every rank calls it with the same heads
        (the step's plan is the same everywhere): under ZeRO-3 it ends in a collective."""
        whole = [p for p, _ in held if getattr(p, "ds_persist", False)]
        if whole:  # drop the whole tensors gathered from the moved partitions (DeepSpeed keeps the partitions)
            whole[0].partition(param_list=whole)
        for p, saved in held:
            for tensor, value in zip(rank_tensors(p), saved):
                tensor.copy_(value)
        regather_persistent(whole)  # and gather them from the partitions put back
