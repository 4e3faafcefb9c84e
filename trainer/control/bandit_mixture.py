"""Online mixing by a bandit (`mixture.strategy: bandit`), in the style of ODM (Albalak et al. 2023,
"Efficient Online Data Mixing for Language Model Pre-Training"): each sampled task is an arm of
EXP3, and a task whose loss still has far to fall is drawn more.

ODM's rule, per step t, over the K sampled tasks:

    eps_t  = min(1/K, sqrt(ln K / (K t)))
    pi_t   = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t         (the step's rates)
    R_i   <- a R_i + (1 - a) r_i / pi_i                          (each task the step trained)

R is a smoothed, importance-weighted estimate of each task's reward (`a` = `mixture.smoothing`,
ODM's 0.9). ODM's reward is the task's training loss; mtl's tasks' losses live on different
scales (span, label and per-token cross-entropies), so r_i is the task's mean loss of the step
divided by its first one: the share of its loss still left to learn. The first step is uniform
(eps_1 = 1/K) and every task keeps at least eps_t. Every rank gets the same averaged losses and
computes the same rates; the state is saved with each version, so a resumed run mixes exactly as
the uninterrupted one.
"""

from __future__ import annotations

import math


class BanditMixer:
    def __init__(self, tasks: list[str], smoothing: float = 0.9):
        self.tasks, self.smoothing = list(tasks), smoothing
        self.rewards = {t: 0.0 for t in self.tasks}
        self.first: dict[str, float] = {}  # each task's mean loss the first time it trained
        self.step = 0  # steps learned from so far

    def epsilon(self, step: int) -> float:
        k = len(self.tasks)
        return 1.0 / k if step < 1 else min(1.0 / k, math.sqrt(math.log(k) / (k * step)))

    def rates(self) -> dict[str, float]:
        """The rates of the next step (step + 1)."""
        k = len(self.tasks)
        if k == 1:
            return {self.tasks[0]: 1.0}
        eps, eps_before = self.epsilon(self.step + 1), self.epsilon(self.step)
        scores = [eps_before * self.rewards[t] for t in self.tasks]
        top = max(scores)
        exp = [math.exp(s - top) for s in scores]
        total = sum(exp)
        return {t: (1 - k * eps) * e / total + eps for t, e in zip(self.tasks, exp)}

    def update(self, mean_losses: dict[str, float]) -> dict[str, float]:
        """Learn from the step just trained (each trained task's mean loss over every rank); the
        rates of the next step."""
        drawn = self.rates()  # what this step was drawn with
        for task, loss in mean_losses.items():
            if task not in self.rewards:
                continue  # a task with a fixed accumulation is not an arm
            first = self.first.setdefault(task, float(loss))
            reward = float(loss) / first if first > 0 else 0.0
            self.rewards[task] = self.smoothing * self.rewards[task] + (1 - self.smoothing) * reward / drawn[task]
        self.step += 1
        return self.rates()

    def state_dict(self) -> dict:
        return {"rewards": dict(self.rewards), "first": dict(self.first), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.rewards.update({t: float(v) for t, v in state["rewards"].items() if t in self.rewards})
        self.first = {t: float(v) for t, v in state["first"].items() if t in self.rewards}
        self.step = int(state["step"])
