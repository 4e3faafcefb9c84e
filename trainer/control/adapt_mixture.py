"""Validation-driven rebalancing of the mixture (`mixture.adapt`).

After each validation, every sampled task that is still training (not stopped early) is judged
on its primary metric:

- by trend: it *lags* while it still gains (more than `min_delta` since the last validation:
  more data still pays off), and is *saturated* once it gains no more;
- by reference: it *lags* while it is below its `reference` score (a single-task run's, say)
  by more than `min_delta`, and is *saturated* once it reached it.

A lagging task's rate is multiplied by `factor`, a saturated task's divided by it, always
within [min_scale, max_scale] times its starting rate (StepPlanner.scale); the others share what
one gives up. Every rank computes the same change from the same gathered metrics. The previous
scores and the history of changes are saved with each version, and the planner's scales with
its state, so a resumed run adapts exactly as the uninterrupted one would.
"""

from __future__ import annotations


class MixtureAdapter:
    def __init__(self, *, by: str, reference: dict[str, float] | None, factor: float, min_scale: float,
                 max_scale: float, min_delta: float):
        self.by, self.reference, self.factor = by, reference or {}, factor
        self.min_scale, self.max_scale, self.min_delta = min_scale, max_scale, min_delta
        self.previous: dict[str, float] = {}  # trend: each task's score at the last validation
        self.history: list[dict] = []  # every change: step, task, scale before and after, why

    def update(self, step: int, scores: dict[str, float], scales: dict[str, float],
               skip: set[str] = frozenset()) -> dict[str, tuple[float, str]]:
        """Task -> (its new scale, why) for the tasks whose rate moves at this validation."""
        changes = {}
        for task, value in scores.items():
            if task not in scales or task in skip:
                continue  # a fixed accumulation, or a task early stopping has taken over
            if self.by == "reference":
                target = self.reference[task]
                lagging = target - value > self.min_delta
                why = f"{value:.4f} {'below' if lagging else 'reached'} its reference {target:.4f}"
            elif task in self.previous:
                gain = value - self.previous[task]
                lagging = gain > self.min_delta
                why = f"{'still gains' if lagging else 'gains no more'}: {gain:+.4f} since the last validation"
            else:
                continue  # trend: the first validation only sets where the task starts from
            scaled = scales[task] * (self.factor if lagging else 1.0 / self.factor)
            scaled = min(self.max_scale, max(self.min_scale, scaled))
            if scaled != scales[task]:
                changes[task] = (scaled, why)
                self.history.append({"step": step, "task": task, "from": scales[task], "to": scaled, "why": why})
        self.previous.update(scores)
        return changes

    def state_dict(self) -> dict:
        return {"previous": dict(self.previous), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.previous = dict(state.get("previous", {}))
        self.history = [dict(h) for h in state.get("history", [])]
