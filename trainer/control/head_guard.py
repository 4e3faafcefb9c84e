"""The heads of tasks a step does not train stay exactly as they were.

A task that is not in a step's plan (early-stopped, or not drawn this step) has zero gradients
in its head, yet AdamW still moves it: weight decay shrinks it, and the moments of earlier steps
keep pushing (measured: a stopped task's head drifted every step, and its validation score with
it). Optimizers cannot skip a parameter inside DeepSpeed's flat partitions, so the guard puts the
heads back: before the step it copies what this rank holds of each such head (the module's tensor
or ZeRO-3 partition, and the optimizer's fp32 master fragment), after the step it copies them
back. Everything is local to the rank (no collective: every rank restores its own part of the
same values) and stays on the device (no host read).
"""

from __future__ import annotations

import torch


def rank_tensors(p: torch.nn.Parameter) -> list[torch.Tensor]:
    """What this rank holds of a parameter: the module's tensor (under ZeRO-3 its partition, and
    the whole tensor where DeepSpeed keeps a small one gathered), and the optimizer's fp32 master
    fragment where there is one apart from it."""
    held = []
    if hasattr(p, "ds_tensor"):  # ZeRO-3
        held.append(p.ds_tensor)
        if p.data.numel():
            held.append(p.data)  # a persistent (small) parameter, kept whole between steps
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

    def hold(self, untrained: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of what this rank holds of the untrained tasks' heads, before a step."""
        return [(t, t.detach().clone()) for task in untrained for p in self.params.get(task, ())
                for t in rank_tensors(p)]

    @staticmethod
    @torch.no_grad()
    def restore(held: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for tensor, saved in held:
            tensor.copy_(saved)
