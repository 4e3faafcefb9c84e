"""The pods' preStop hook (launcher.prestop) on real processes: it signals the Ray Train workers
under the given process and no other process, and waits for them. The drill in
test_cluster_e2e.py runs it against a real Ray node's worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from launcher.prestop import stop_workers

WORKER = """
import signal, sys, time
def on_term(*_):
    time.sleep(0.5)  # writing its version
    open(sys.argv[1], "w").write("term")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
time.sleep(120)
"""


def test_only_the_train_workers_under_the_root_get_sigterm_and_are_waited_for(tmp_path):
    marker, bystander_marker = tmp_path / "worker", tmp_path / "bystander"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # A node's process tree: a Ray Train worker (its title as Ray sets it) and another Ray process.
    node = subprocess.Popen(["bash", "-c", f'(exec -a "ray::RayTrainWorker.run_train_fn" {sys.executable} {script} '
                                           f'{marker}) & ({sys.executable} {script} {bystander_marker}) & wait'],
                            start_new_session=True)
    elsewhere = subprocess.Popen(["bash", "-c", f'exec -a "ray::RayTrainWorker" {sys.executable} {script} '
                                                f'{tmp_path / "elsewhere"}'], start_new_session=True)
    try:
        time.sleep(1.0)  # both started
        started = time.monotonic()
        assert stop_workers(node.pid, grace_s=30) == (1, 0)
        assert marker.read_text() == "term" and time.monotonic() - started >= 0.5  # it waited for the exit
        assert not bystander_marker.exists() and elsewhere.poll() is None  # not a worker, or not under the root
    finally:
        for process in (node, elsewhere):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_no_workers_is_said_and_returns_at_once(tmp_path):
    idle = subprocess.Popen(["sleep", "60"])
    try:
        done = subprocess.run([sys.executable, "-m", "launcher.prestop", "--root-pid", str(idle.pid), "--grace", "30"],
                              capture_output=True, text=True, timeout=20)
    finally:
        idle.kill()
        idle.wait()
    assert done.returncode == 0 and "[mtl] preStop: 0 Ray Train worker(s) sent SIGTERM" in done.stderr
