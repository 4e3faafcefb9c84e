"""Two independent `mtl train` runs on one machine, each with its own embedded Ray, overlap and
both finish: the second Ray must not disturb the first (its dashboard, its state API, its
placement groups), and the first stops cleanly on SIGTERM afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, job_dict

pytestmark = pytest.mark.e2e


def job_file(data_dir, model_dir, tmp_path, name: str, steps: int) -> str:
    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment",))
    job.update(name=name, storage={"path": str(tmp_path / "runs")})
    job["train"].update({"steps": steps, "checkpoint_every": 0, "eval_every": 0, "micro_batches_per_step": 2})
    job["scaling"] = {"num_workers": 2, "cpus_per_worker": 1}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return str(path)


def test_two_embedded_runs_overlap_and_both_finish(data_dir, model_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w+")
    first = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train",
                              job_file(data_dir, model_dir, tmp_path, "first", 100_000)],
                             cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while "[mtl] step 1/" not in (tmp_path / "first.log").read_text() and time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(1)
        second = subprocess.run([sys.executable, "-m", "launcher.cli", "train",
                                 job_file(data_dir, model_dir, tmp_path, "second", 4)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
        assert "finished at step-000004" in second.stderr
        assert first.poll() is None, "the first run ended while the second ran:\n" + \
            (tmp_path / "first.log").read_text()[-3000:]
    finally:
        first.send_signal(signal.SIGTERM)  # it writes a version and stops (the exit status says SIGTERM)
        first.wait(timeout=180)
    output = (tmp_path / "first.log").read_text()
    assert first.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "placement group was removed" not in output and "stopped by SIGTERM at step-" in output
