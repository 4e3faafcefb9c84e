"""Per-task early stopping: a task whose primary validation metric stopped improving stops.

After each validation, a task's primary metric either beats its best by more than `min_delta`
(the counter resets) or it does not (the counter grows). At `patience` evaluations without a
gain the task stops (trainer.loop_validation.stop_lagging_tasks): frozen, the planner gives it no more
micro-batches, or down-weighted, its sampling rate is multiplied by a factor; either way the
other tasks get what it gives up, and its best version stays protected by retention
(train.keep_best). When every task has stopped, the run writes a version and ends. Every rank sees the same metrics (evaluation
gathers them), so every rank freezes the same tasks at the same step. The state is saved with
each version and resumes exactly.
"""

from __future__ import annotations


class EarlyStopping:
    def __init__(self, tasks: list[str], patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.state = {t: {"best": None, "best_step": None, "evals_without_gain": 0, "stopped_at": None}
                      for t in tasks}

    def update(self, step: int, scores: dict[str, float]) -> list[str]:
        """Records one validation's primary scores; returns the tasks that stop at this step."""
        stopped = []
        for task, value in scores.items():
            s = self.state[task]
            if s["stopped_at"] is not None:
                continue
            if s["best"] is None or value > s["best"] + self.min_delta:
                s.update(best=value, best_step=step, evals_without_gain=0)
                continue
            s["evals_without_gain"] += 1
            if s["evals_without_gain"] >= self.patience:
                s["stopped_at"] = step
                stopped.append(task)
        return stopped

    def stopped(self) -> list[str]:
        return [t for t, s in self.state.items() if s["stopped_at"] is not None]

    def state_dict(self) -> dict:
        return {t: dict(s) for t, s in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        for task, s in state.items():
            if task in self.state:  # a task added to the job since starts afresh
                self.state[task] = dict(s)
