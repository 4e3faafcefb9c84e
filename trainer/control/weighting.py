"""Per-task loss weighting: static, uncertainty (Kendall et al. 2018), DWA (Liu et al. 2019).

Each strategy turns a micro-batch's task loss into the loss that is back-propagated
(`weighted`), learns from the step's per-task mean losses (`end_step`; the loop passes
values averaged over all ranks, so every rank keeps identical state), reports its current
weights, and has a state that a resumed run restores.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class LossWeighting(Protocol):
    def weighted(self, task: str, loss: torch.Tensor) -> torch.Tensor: ...
    def end_step(self, mean_losses: dict[str, float]) -> None: ...
    def weights(self) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class StaticWeighting:
    def __init__(self, static: dict[str, float]):
        self.static = dict(static)

    def weighted(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        return self.static[task] * loss

    def end_step(self, mean_losses: dict[str, float]) -> None:
        pass

    def weights(self) -> dict[str, float]:
        return dict(self.static)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class UncertaintyWeighting(torch.nn.Module):
    """loss_t -> w_t * (exp(-s_t) * loss_t + s_t), s_t = log sigma_t^2 learned with the model.

    It is an nn.Module so the loop can attach it to the trained model: its parameters are
    then optimised, partitioned (ZeRO-3) and checkpointed by DeepSpeed like any other.
    """

    def __init__(self, static: dict[str, float]):
        super().__init__()
        self.tasks = list(static)
        self.static = dict(static)
        self.log_vars = torch.nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        s = self.log_vars[self.tasks.index(task)].to(loss.dtype)
        return self.static[task] * (torch.exp(-s) * loss + s)

    def weighted(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        return self(task, loss)

    def end_step(self, mean_losses: dict[str, float]) -> None:
        pass

    def weights(self) -> dict[str, float]:
        values = _read_param(self.log_vars)
        return {t: self.static[t] * math.exp(-s) for t, s in zip(self.tasks, values)}


def _read_param(p: torch.Tensor) -> list[float]:
    """A parameter's values, gathering it first when ZeRO-3 has partitioned it across ranks."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().float().tolist()
    return p.detach().float().tolist()


class DWAWeighting:
    """w_t = static_t * K * softmax(r_t / T), r_t = mean loss of the last window / the one before.

    Windows are `window` optimizer steps long (tasks are sampled, so a single step may lack
    a task); until two windows are complete the static weights hold.
    """

    def __init__(self, static: dict[str, float], temperature: float = 2.0, window: int = 10):
        self.static, self.temperature, self.window = dict(static), temperature, window
        self.current = dict(static)
        self.history: list[dict[str, float]] = []  # the last two complete windows' mean losses
        self.sums = {t: 0.0 for t in static}
        self.counts = {t: 0 for t in static}
        self.steps = 0

    def weighted(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        return self.current[task] * loss

    def end_step(self, mean_losses: dict[str, float]) -> None:
        for task, value in mean_losses.items():
            self.sums[task] += value
            self.counts[task] += 1
        self.steps += 1
        if self.steps % self.window:
            return
        means = {t: self.sums[t] / self.counts[t] if self.counts[t] else math.nan for t in self.static}
        self.history = (self.history + [means])[-2:]
        self.sums = {t: 0.0 for t in self.static}
        self.counts = {t: 0 for t in self.static}
        if len(self.history) == 2:
            self.current = self._from_history()

    def _from_history(self) -> dict[str, float]:
        before, last = self.history
        ratios = {}
        for t in self.static:
            ok = before[t] > 0 and not math.isnan(before[t]) and not math.isnan(last[t])
            ratios[t] = last[t] / before[t] if ok else 1.0
        top = max(r / self.temperature for r in ratios.values())
        exp = {t: math.exp(r / self.temperature - top) for t, r in ratios.items()}
        total = sum(exp.values())
        k = len(self.static)
        return {t: self.static[t] * k * exp[t] / total for t in self.static}

    def weights(self) -> dict[str, float]:
        return dict(self.current)

    def state_dict(self) -> dict:
        return {"current": self.current, "history": self.history, "sums": self.sums,
                "counts": self.counts, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.current = dict(state["current"])
        self.history = [dict(h) for h in state["history"]]
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])
        self.steps = int(state["steps"])


def build_weighting(strategy: str, static: dict[str, float], *, temperature: float = 2.0,
                    window: int = 10) -> LossWeighting:
    if strategy == "static":
        return StaticWeighting(static)
    if strategy == "uncertainty":
        return UncertaintyWeighting(static)
    if strategy == "dwa":
        return DWAWeighting(static, temperature=temperature, window=window)
    raise ValueError(f"unknown loss weighting '{strategy}' (choose from static, uncertainty, dwa)")
