"""Stopping a run early at a step boundary, with a version at that step.

Three things ask a run to stop before `train.steps`:

- **the driver**: Ctrl-C or SIGTERM to `mtl train` (or `mtl jobs stop`, which SIGTERMs the
  submitted driver). The driver puts a key in Ray's internal key-value store; rank 0 looks
  for it at most once a second. The run writes a version and ends; the same command resumes.
- **a SIGTERM to a worker process** (a pod being deleted, a spot node's shutdown, torchrun
  or Slurm passing theirs on). Ray's worker turns SIGTERM into an immediate exit; the
  runtime's hook (trainer.runtime) defers that exit by up to `train.stop_grace_s` so the rank
  can write a version first. The run then fails over like
  any lost worker: Ray Train restarts the group (within `train.max_failures`), which resumes
  from that version. A second SIGTERM, or the grace running out, exits at once; so does a
  rank that reaches no step boundary soon after the signal (its peers are gone: Ray tearing a
  broken group down must not wait on a collective that never ends).
- **Ray's preemption notice** for a node being drained (`ray.train.get_preemption_info`):
  a version is written at once and training goes on until the node actually goes.

Each rank notes what it saw; the per-step all-reduce sums the notes (trainer.reporting), so
every rank acts at the same step. At most the step in flight is lost.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time

from trainer import runtime as runtimes
from trainer.reporting import say

REASONS = ("driver", "sigterm", "preemption")
_POLL_EVERY_S = 1.0
_MIN_PROGRESS_WAIT_S = 10.0  # after SIGTERM, the next step boundary must come within this (or 3 steps)


def stop_key(run_id: str) -> bytes:
    return f"stop/{run_id}".encode()


def request_stop(run_id: str) -> None:
    """Driver side: ask the run's workers to write a version at their next step and end."""
    runtimes.kv_put(stop_key(run_id), b"1")


def clear_stop(run_id: str) -> None:
    runtimes.kv_del(stop_key(run_id))


class StopRequests:
    """What this rank has seen that asks the run to stop, as numbers for the step's all-reduce."""

    def __init__(self, run_id: str | None, rank: int, grace_s: float, runtime=None):
        self.run_id, self.rank, self.grace_s = run_id, rank, grace_s
        self.runtime = runtime
        self.sigterm_at: float | None = None
        self.boundaries = 0  # step boundaries reached (local() calls)
        self._slowest_step_s = 0.0
        self._last_boundary = time.monotonic()
        self._polled_at = 0.0
        self._driver = False
        self.training = True  # False once the train function is over: SIGTERM exits at once again
        self.preemption_seen = False  # a notice already answered with a version

    def install_sigterm_hook(self) -> bool:
        """Defer the process's exit on SIGTERM so this rank can write a version first (the
        runtime's hook; without one, SIGTERM exits at once and the run fails over from the last
        version)."""
        return self.runtime.hook_sigterm(self.defer_sigterm)

    def defer_sigterm(self) -> bool:
        """On SIGTERM: whether the exit waits (the first one while training), after which the
        watcher exits once the version is written or the grace is over."""
        if not self.training or self.sigterm_at is not None:
            return False
        self.sigterm_at = time.monotonic()
        say(f"[mtl] rank {self.rank} got SIGTERM: writing a version at this step, then exiting "
            f"(within train.stop_grace_s={self.grace_s:g}s)")
        threading.Thread(target=self._watch, args=(self.boundaries,), daemon=True, name="mtl-sigterm-watch").start()
        return True

    def _watch(self, boundaries_at_signal: int) -> None:
        """Exit once the grace is over, or soon if this rank reaches no further step boundary."""
        progress_by = self.sigterm_at + max(_MIN_PROGRESS_WAIT_S, 3 * self._slowest_step_s)
        while time.monotonic() < self.sigterm_at + self.grace_s:
            if self.boundaries == boundaries_at_signal and time.monotonic() > progress_by:
                say(f"[mtl] rank {self.rank}: no step finished since SIGTERM; exiting without a version")
                break
            time.sleep(0.2)
        self.exit_process()

    def exit_process(self) -> None:
        """After the version (or the grace): let the runtime's SIGTERM exit happen on the main thread."""
        _thread.interrupt_main(signal.SIGTERM)

    def _driver_asked(self) -> bool:
        if self.rank != 0 or self.run_id is None or self._driver:
            return self._driver
        now = time.monotonic()
        if now - self._polled_at >= _POLL_EVERY_S:
            self._polled_at = now
            self._driver = self.runtime.driver_asked(stop_key(self.run_id))
        return self._driver

    def local(self) -> list[float]:
        """[driver, sigterm, preemption] as this rank sees them now, at a step boundary."""
        now = time.monotonic()
        if self.boundaries:  # the first interval is setup, not a step
            self._slowest_step_s = max(self._slowest_step_s, now - self._last_boundary)
        self._last_boundary = now
        self.boundaries += 1
        return [float(self._driver_asked()), float(self.sigterm_at is not None), float(self.runtime.preempted())]


def agreed(summed: list[float]) -> dict[str, bool]:
    """The all-reduced notes as reasons that hold for the whole run."""
    return {reason: value > 0 for reason, value in zip(REASONS, summed)}
