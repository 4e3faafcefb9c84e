"""The driver, as users stop it: Ctrl-C (SIGINT) on `mtl train` writes a version at the current
step, leaves no Ray process behind and exits 130; a SIGKILLed driver loses only what came after
the last version; the same command resumes either way."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, job_dict

pytestmark = pytest.mark.e2e


class Driver:
    """`mtl train JOB` in its own process, its output collected line by line."""

    def __init__(self, job: str, log: Path, *overrides: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.out = open(log, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", job, *overrides],
                                        cwd=REPO, env=env, stdout=self.out, stderr=subprocess.STDOUT)
        self.started: set[psutil.Process] = set()

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._note_descendants()
            found = re.search(pattern, self.text())
            if found:
                return found
            assert self.process.poll() is None, f"mtl train exited ({self.process.returncode}):\n{self.text()}"
            time.sleep(0.1)
        raise AssertionError(f"no '{pattern}' within {timeout}s:\n{self.text()}")

    def _note_descendants(self) -> None:
        try:
            self.started.update(psutil.Process(self.process.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def finish(self, timeout: float = 240) -> int:
        code = self.process.wait(timeout=timeout)
        self.out.close()
        return code

    def leftovers(self, wait_s: float = 20) -> list[str]:
        """What this driver started that is still running `wait_s` after it exited (Ray's own
        processes take a few seconds to go once their GCS is gone)."""
        _, alive = psutil.wait_procs([p for p in self.started if p.is_running()], timeout=wait_s)
        out = []
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{p.pid}: {' '.join(p.cmdline())[:300]}")
            except psutil.NoSuchProcess:
                pass
        return out

    def reap(self) -> None:
        """Stop, by PID, whatever this driver started and left behind."""
        for p in self.started:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(self.started), timeout=30)


def committed(run: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in run.glob("step-*/COMMITTED"))


def drill_job(data_dir, model_dir, tmp_path, write_job) -> tuple[str, Path]:
    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment",))
    job.update(name="drill", storage={"path": str(tmp_path / "runs")})
    job["train"].update({"steps": 400, "checkpoint_every": 0, "eval_every": 0, "lr_schedule": "constant"})
    return write_job(job), tmp_path / "runs" / "drill"


def test_ctrl_c_writes_a_version_where_the_run_is_and_leaves_nothing_behind(data_dir, model_dir, tmp_path,
                                                                             write_job):
    path, run = drill_job(data_dir, model_dir, tmp_path, write_job)
    first = Driver(path, tmp_path / "first.log")
    try:
        first.wait_for(r"step 5/400")
        first.process.send_signal(signal.SIGINT)
        assert first.finish(timeout=120) == 130, first.text()
        stopped = int(re.search(r"stopped by SIGINT at step-(\d+); run the same command to resume", first.text())[1])
        assert stopped >= 5 and committed(run) == [stopped]
        console = first.text()  # a file, not a terminal: what a log or CI keeps
        assert "\x1b[" not in console, "colour codes in non-terminal output"
        for noise in ("PreemptionWatcher", "built successfully", "Setting accelerator to CPU"):
            assert noise not in console, f"{noise!r} reached the console:\n{console}"
        assert re.search(r"step 5/400 \| loss sentiment [\d.]+ \| grad norm [\d.]+ \| .* \| eta \d+", console), console
        left = first.leftovers()
        assert not left, f"an interrupt left Ray processes behind: {left}"
    finally:
        first.reap()


@pytest.mark.drill
def test_a_killed_driver_loses_only_what_came_after_the_last_version(data_dir, model_dir, tmp_path, write_job):
    path, run = drill_job(data_dir, model_dir, tmp_path, write_job)
    killed = Driver(path, tmp_path / "killed.log", "train.checkpoint_every=2")
    try:
        killed.wait_for(r"saved version step-000004")
        killed.process.kill()  # SIGKILL: nothing runs its cleanup; what survives is what storage holds
        killed.finish(timeout=60)
    finally:
        killed.reap()
    latest = committed(run)[-1]
    assert latest >= 4

    again = Driver(path, tmp_path / "again.log", "train.checkpoint_every=2", f"train.steps={latest + 3}")
    try:
        again.wait_for(rf"resumed from step-{latest:06d}")
        assert again.finish() == 0, again.text()
        assert f"run 'drill' finished at step-{latest + 3:06d}" in again.text()
    finally:
        again.reap()
