"""Mixing tasks: each optimizer step is a plan of how many micro-batches each task gets.

Rates come from a mixture strategy over the tasks' train sizes (T5's proportional,
capped-proportional and temperature mixing, uniform, or explicit rates). Tasks with a fixed
`accumulation` take exactly that many micro-batches every step; the remaining slots of a
step are dealt by the rates: `even` (the default) keeps each task's count within about one
micro-batch of its rate times the micro-batches so far (smooth weighted round robin, from a
seeded phase), so a task at rate 0.12 gets its 5 of 40 one-task steps; `random` draws each step
independently (a multinomial), where that task went unseen for 40 steps in a benchmark run. The
draw uses one seeded generator that every rank holds in the same state, so plans agree across
ranks without communication, and its state is saved so a resumed run draws the same plans.

During a run, a sampled task's rate can be scaled (early stopping's down-weighting,
mixture.adapt) or set to zero (early stopping's freezing); the others share what it gives up.
Fixed accumulations are never scaled: a step's size is DeepSpeed's, fixed for the run.
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("proportional", "capped", "temperature", "uniform", "explicit", "bandit")
DRAWS = ("even", "random")


def mixture_rates(strategy: str, sizes: dict[str, int], *, temperature: float = 1.0, cap: int | None = None,
                  explicit: dict[str, float] | None = None) -> dict[str, float]:
    """Task -> sampling rate (sums to 1) over the tasks in `sizes`."""
    tasks = list(sizes)
    if strategy == "proportional":
        raw = [float(sizes[t]) for t in tasks]
    elif strategy == "capped":
        raw = [float(min(sizes[t], cap)) for t in tasks]
    elif strategy == "temperature":
        total = sum(sizes.values())
        raw = [(sizes[t] / total) ** (1.0 / temperature) for t in tasks]
    elif strategy in ("uniform", "bandit"):  # a bandit starts uniform (trainer.control.bandit_mixture)
        raw = [1.0] * len(tasks)
    elif strategy == "explicit":
        raw = [float(explicit[t]) for t in tasks]
    else:
        raise ValueError(f"unknown mixture strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    total = sum(raw)
    return {t: r / total for t, r in zip(tasks, raw)}


class StepPlanner:
    """Draws one plan per optimizer step: {task: micro-batches}, in task order."""

    def __init__(self, tasks: list[str], rates: dict[str, float], fixed: dict[str, int],
                 micro_batches_per_step: int, seed: int, draw: str = "even"):
        if draw not in DRAWS:
            raise ValueError(f"unknown draw '{draw}' (choose from {', '.join(DRAWS)})")
        self.draw = draw
        self.tasks = list(tasks)
        self.fixed = {t: fixed[t] for t in self.tasks if t in fixed}
        self.free = [t for t in self.tasks if t not in self.fixed]
        self.slots = micro_batches_per_step - sum(self.fixed.values())
        if self.free and self.slots < 1:
            raise ValueError("no micro-batches left for tasks without a fixed accumulation")
        self.rates: dict[str, float] = {}
        if self.free:
            self.set_rates(rates)
        self.frozen: set[str] = set()  # tasks early stopping took out (trainer.control.early_stopping)
        self.scales = {t: 1.0 for t in self.free}  # rate multipliers (down-weighting, trainer.control.adapt_mixture)
        self.rng = np.random.default_rng(seed)
        self.step = 0
        # even: what each sampled task is owed, in micro-batches; a seeded phase in [0, 1) so that
        # seeds differ in the order of the tasks, not in their shares
        self.credit = {t: float(c) for t, c in zip(self.free, self.rng.random(len(self.free)))} \
            if draw == "even" else {}

    def freeze(self, task: str) -> None:
        """No more micro-batches for `task`; a step keeps its size (DeepSpeed's accumulation is
        fixed), so the slots go to the tasks still training."""
        self.frozen.add(task)

    def set_rates(self, rates: dict[str, float]) -> None:
        """New starting rates of the sampled tasks (an online mixer's); scales and freezing still apply."""
        probs = np.array([rates[t] for t in self.free], dtype=float)
        self.rates = dict(zip(self.free, probs / probs.sum()))

    def scale(self, task: str, factor: float) -> None:
        """Multiply a sampled task's rate by `factor` (relative to its starting rate, before normalising)."""
        self.scales[task] = factor

    def all_frozen(self) -> bool:
        return set(self.tasks) <= self.frozen

    def _layout(self) -> tuple[dict[str, int], list[str], np.ndarray, int]:
        """(fixed counts, free tasks, their probabilities, free slots) among the tasks not frozen."""
        fixed = {t: n for t, n in self.fixed.items() if t not in self.frozen}
        free = [t for t in self.free if t not in self.frozen]
        slots = self.slots + sum(n for t, n in self.fixed.items() if t in self.frozen)
        if free:
            probs = np.array([self.rates[t] * self.scales[t] for t in free])
            changed = self.frozen or any(self.scales[t] != 1.0 for t in free)
            return fixed, free, probs / probs.sum() if changed else probs, slots
        order = list(fixed)
        for i in range(slots if fixed else 0):  # only fixed tasks are left: they share the slots in turn
            fixed[order[i % len(order)]] += 1
        return fixed, [], np.zeros(0), 0

    def plan(self) -> dict[str, int]:
        if self.all_frozen():
            raise RuntimeError("every task is frozen: nothing left to train")
        counts, free, probs, slots = self._layout()
        if free and self.draw == "random":
            drawn = self.rng.multinomial(slots, probs)
            counts.update({t: int(n) for t, n in zip(free, drawn)})
        elif free:
            counts.update(self._deal(free, probs, slots))
        self.step += 1
        return {t: counts[t] for t in self.tasks if counts.get(t, 0) > 0}

    def _deal(self, free: list[str], probs: np.ndarray, slots: int) -> dict[str, int]:
        """Each task is owed its rate times the step's slots; each slot goes to the task owed most
        (the first in job order on a tie) and pays one back. What a task is owed stays within
        about one micro-batch of zero, so its count follows its rate at every step, not on average."""
        for t, p in zip(free, probs):
            self.credit[t] += float(p) * slots
        counts = dict.fromkeys(free, 0)
        for _ in range(slots):
            t = max(free, key=self.credit.__getitem__)
            counts[t] += 1
            self.credit[t] -= 1.0
        return counts

    def expected_rates(self) -> dict[str, float]:
        """Each task's expected share of a step's micro-batches (what the logs call its rate)."""
        fixed, free, probs, slots = self._layout()
        total = sum(fixed.values()) + slots
        rates = {t: n / total for t, n in fixed.items()}
        rates.update({t: p * slots / total for t, p in zip(free, probs)})
        return {t: rates.get(t, 0.0) for t in self.tasks}

    def state_dict(self) -> dict:
        return {"step": self.step, "rng": self.rng.bit_generator.state, "frozen": sorted(self.frozen),
                "scales": dict(self.scales), "credit": dict(self.credit)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]
        self.frozen = set(state.get("frozen", ())) & set(self.tasks)
        self.scales.update({t: v for t, v in state.get("scales", {}).items() if t in self.scales})
        self.credit.update({t: float(v) for t, v in state.get("credit", {}).items() if t in self.credit})
