"""A pod's preStop hook: SIGTERM this pod's Ray Train workers and wait for them to write a version.

When Kubernetes deletes a pod (a scale-down, a drained node, `kubectl delete`), the kubelet sends
SIGTERM to the container's first process only: KubeRay's shell around `ray start --block`,
which passes nothing on to the workers, and SIGKILL follows after the grace period. A worker
that never sees SIGTERM cannot write its version (trainer.control.stopping), so the manifests in
cluster_configs/kuberay run this first:

    lifecycle: {preStop: {exec: {command: [python, -m, launcher.prestop, --grace, "120"]}}}

It signals every Ray Train worker among the descendants of `--root-pid` (the container's first
process by default: this pod's own processes, no other pod's) and returns once they have exited,
or after `--grace` seconds; the pod's terminationGracePeriodSeconds must cover that.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

WORKER_TITLE = "ray::RayTrainWorker"  # the process title Ray gives a Ray Train worker


def train_workers(root_pid: int) -> list:
    """The Ray Train worker processes among `root_pid`'s descendants."""
    import psutil

    try:
        candidates = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for process in candidates:
        try:
            if " ".join(process.cmdline()).startswith(WORKER_TITLE):
                workers.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return workers


def stop_workers(root_pid: int, grace_s: float) -> tuple[int, int]:
    """SIGTERM the workers under `root_pid`; (how many were signalled, how many are still running
    after `grace_s`)."""
    import psutil

    workers = train_workers(root_pid)
    for worker in workers:
        try:
            worker.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(workers, timeout=grace_s) if workers else ([], [])
    return len(workers), len(alive)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.prestop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grace", type=float, default=120.0,
                        help="seconds to wait for the workers to exit (train.stop_grace_s; default 120)")
    parser.add_argument("--root-pid", type=int, default=1,
                        help="signal the workers among this process's descendants (default 1: the container's)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    signalled, alive = stop_workers(args.root_pid, args.grace)
    print(f"[mtl] preStop: {signalled} Ray Train worker(s) sent SIGTERM; "
          f"{signalled - alive} exited within {time.monotonic() - started:.1f}s"
          + (f", {alive} still running after --grace {args.grace:g}s" if alive else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
