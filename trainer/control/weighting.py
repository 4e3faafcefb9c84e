"""Per-task loss weighting: static, uncertainty (Kendall et al. 2018), DWA (Liu et al. 2019),
FAMO (Liu et al. 2023).

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


class FAMOWeighting:
    """FAMO (Liu et al., NeurIPS 2023): weights that balance how fast each task's loss falls, from
    the losses alone (no per-task gradients), O(tasks) per step.

    FAMO keeps logits w, z = softmax(w), and back-propagates sum_t z_t log L_t / c with
    c = sum_t z_t / L_t: task t's gradient is scaled by z_t / (c L_t), so every task's loss falls
    at the same *log* rate unless z says otherwise. Here a micro-batch's loss is scaled by that
    factor times K (K tasks: the weights sum to K, as static weights of 1 do, so `train.lr` keeps
    its meaning) and the task's static weight, with L_t the task's mean loss when it last trained
    (a step's losses are known only after its micro-batches ran). Until every task has trained
    once the static weights hold.

    After each step, w learns from how much each task's log loss fell since it last trained
    (delta_t; 0 for a task the step left out): its gradient is J_softmax(w)^T delta, applied with
    Adam (lr, weight decay `decay`, the paper's gamma), as the authors' code does. Every rank gets
    the same averaged losses, so every rank keeps the same state; it is saved with each version.
    """

    BETAS, EPS, LOSS_EPS = (0.9, 0.999), 1e-8, 1e-8

    def __init__(self, static: dict[str, float], lr: float = 0.025, decay: float = 0.01):
        self.static, self.lr, self.decay = dict(static), lr, decay
        self.tasks = list(static)
        self.logits = [0.0] * len(self.tasks)
        self.m, self.v, self.t = [0.0] * len(self.tasks), [0.0] * len(self.tasks), 0
        self.last: dict[str, float] = {}  # each task's mean loss the last time it trained

    def weighted(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        return self.weights()[task] * loss

    def _z(self) -> list[float]:
        top = max(self.logits)
        exp = [math.exp(w - top) for w in self.logits]
        return [e / sum(exp) for e in exp]

    def weights(self) -> dict[str, float]:
        if any(t not in self.last for t in self.tasks):
            return dict(self.static)
        z = self._z()
        inverse = [zi / (self.last[t] + self.LOSS_EPS) for zi, t in zip(z, self.tasks)]
        c = sum(inverse)
        k = len(self.tasks)
        return {t: self.static[t] * k * q / c for t, q in zip(self.tasks, inverse)}

    def end_step(self, mean_losses: dict[str, float]) -> None:
        delta = [math.log(self.last[t] + self.LOSS_EPS) - math.log(mean_losses[t] + self.LOSS_EPS)
                 if t in self.last and t in mean_losses else 0.0 for t in self.tasks]
        self.last.update({t: float(v) for t, v in mean_losses.items() if t in self.static})
        if not any(delta):
            return
        z = self._z()
        mean = sum(zi * d for zi, d in zip(z, delta))
        grads = [zi * (d - mean) + self.decay * w for zi, d, w in zip(z, delta, self.logits)]
        (b1, b2), self.t = self.BETAS, self.t + 1
        for i, g in enumerate(grads):  # Adam with L2 decay, as torch.optim.Adam(weight_decay=decay)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m_hat, v_hat = self.m[i] / (1 - b1 ** self.t), self.v[i] / (1 - b2 ** self.t)
            self.logits[i] -= self.lr * m_hat / (math.sqrt(v_hat) + self.EPS)

    def state_dict(self) -> dict:
        return {"logits": list(self.logits), "m": list(self.m), "v": list(self.v), "t": self.t,
                "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.logits, self.m, self.v = list(state["logits"]), list(state["m"]), list(state["v"])
        self.t, self.last = int(state["t"]), dict(state["last"])


def build_weighting(strategy: str, static: dict[str, float], *, temperature: float = 2.0,
                    window: int = 10, famo_lr: float = 0.025, famo_decay: float = 0.01) -> LossWeighting:
    if strategy == "static":
        return StaticWeighting(static)
    if strategy == "uncertainty":
        return UncertaintyWeighting(static)
    if strategy == "dwa":
        return DWAWeighting(static, temperature=temperature, window=window)
    if strategy == "famo":
        return FAMOWeighting(static, lr=famo_lr, decay=famo_decay)
    raise ValueError(f"unknown loss weighting '{strategy}' (choose from static, uncertainty, dwa, famo)")
