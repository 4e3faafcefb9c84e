"""Gradient surgery across tasks: PCGrad (Yu et al., NeurIPS 2020), `loss_weighting.surgery: pcgrad`.

A step's micro-batches are of one task each, so each task's gradient of the step exists without
extra passes: `TaskGradients` keeps one fp32 sum per task (torch.autograd.grad, outside DeepSpeed),
summed over the ranks. Where two tasks' gradients on the shared parameters point against each other
(a negative dot product), PCGrad removes from each the component along the other, in a random order
of the others; then the step's gradient is the sum. The heads (and learned loss weights) belong to
one task each and are summed as they are.

The per-task gradients are computed through the model itself, outside DeepSpeed's forward and
backward; the combined gradient G goes to DeepSpeed as the gradient of a surrogate loss Σ_p ⟨p, G_p⟩,
back-propagated once per accumulation micro-step: DeepSpeed then averages, clips and steps it as
any other.
Each task's whole gradient is held on every rank, so ZeRO-2/3, which partition gradients to save
that memory, are refused; fp16 too (these gradients are computed without its loss scaling).
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.collectives import all_reduce_sum
from trainer.model import SURROGATE

OWN_PREFIXES = ("heads.", "loss_weighting.")  # parameters that belong to one task (or to the weighting)


class TaskGradients:
    """Per-task gradient sums of one optimizer step, on the trainable parameters of `model`, for a
    run of `world` ranks whose order of tasks comes from `seed` and the step (the same on every rank
    and on a resumed run)."""

    def __init__(self, model: torch.nn.Module, *, seed: int, world: int):
        self.seed, self.world = seed, world
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.shared = [not n.startswith(OWN_PREFIXES) for n, _ in named]
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.conflicts: torch.Tensor | None = None  # pairs of tasks whose last step's gradients conflicted

    def add(self, task: str, loss: torch.Tensor) -> None:
        """Add the gradient of `loss` (a micro-batch's part of the step) to `task`'s sum."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        sums = self.sums.setdefault(task, [torch.zeros_like(p, dtype=torch.float32) for p in self.params])
        for total, grad in zip(sums, grads):
            if grad is not None:
                total.add_(grad.float())

    def combined(self, step: int, device) -> list[torch.Tensor]:
        """The step's gradient per parameter: each task's sum averaged over the ranks, PCGrad on the
        shared parameters, then summed over tasks."""
        tasks = sorted(self.sums)  # every rank ran the same plan: the same tasks
        flat = torch.stack([torch.cat([g.flatten() for g in self.sums[t]]) for t in tasks])
        self.sums.clear()  # at most two copies of every task's gradient at once (trainer.model.memory_plan)
        flat = all_reduce_sum(flat, device, to_host=False) / self.world
        sizes = [p.numel() for p in self.params]
        shared = torch.cat([torch.full((n,), s, dtype=torch.bool, device=flat.device)
                            for n, s in zip(sizes, self.shared)])
        total = flat.sum(0)
        on_shared = flat[:, shared]
        self.conflicts = ((on_shared @ on_shared.T).triu(1) < 0).sum()  # read with the step's metrics
        total[shared] = pcgrad(on_shared, np.random.default_rng([self.seed, step])).sum(0)
        return [part.view_as(p) for part, p in zip(total.split(sizes), self.params)]

    def apply(self, engine, micro_batches: int, step: int, device) -> None:
        """Hand the step's combined gradient to DeepSpeed: its surrogate loss (MultiTaskModel's
        forward of SURROGATE) through the engine once per accumulation micro-step, so DeepSpeed's
        own backward, averaging, clipping and optimizer step take it as they take any gradient."""
        combined = self.combined(step, device)
        for _ in range(micro_batches):
            loss, _ = engine(SURROGATE, {"gradient": combined})
            engine.backward(loss)  # each adds combined / micro_batches
            engine.step()


def pcgrad(grads: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """PCGrad of task gradients `grads` [tasks, n]: each row with its conflicts with the other rows
    (taken in a random order, as the paper does) projected away; the rows are returned, not summed."""
    out = grads.clone()
    norms = (grads * grads).sum(1)
    for i in range(len(grads)):
        for j in (j for j in rng.permutation(len(grads)).tolist() if j != i):
            # Only a conflict (a negative dot product) is projected; computed on the device, so the
            # host never waits for the comparison.
            conflict = (out[i] @ grads[j]).clamp(max=0.0)
            out[i] -= torch.where(norms[j] > 0, conflict / norms[j].clamp(min=1e-30), 0.0) * grads[j]
    return out


def surgery_problem(surgery: str, stage: int, precision: str) -> str | None:
    """Why a job's `loss_weighting.surgery` cannot run with its ZeRO stage and precision (None: it can)."""
    if surgery == "none":
        return None
    if stage >= 2:
        return (f"loss_weighting.surgery: {surgery} holds each task's whole gradient of a step on every rank, "
                f"which ZeRO-{stage} partitions to save that memory: use a ZeRO-0 or ZeRO-1 config "
                f"(deepspeed: zero1), or surgery: none")
    if precision == "fp16":
        return (f"loss_weighting.surgery: {surgery} computes each task's gradient without fp16's loss scaling: "
                "use train.precision bf16 or fp32")
    return None
