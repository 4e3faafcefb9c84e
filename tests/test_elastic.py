"""Elastic runs: `scaling.num_workers: [min, max]`.

The drill is the real thing: a 3-node loopback cluster, one node's raylet SIGKILLed mid-run; the
same driver goes on with 2 workers from the last version, and its losses from there match a run
that had 2 workers from that version on. Its small form in `make test` starts an elastic run on
a machine that holds fewer workers than its max.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO, job_dict
from trainer.spec import JobSpec


def elastic_job(data_dir, model_dir, storage: Path, **train) -> dict:
    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment",))
    job.update(name="elastic", storage={"path": str(storage)})
    job["train"].update({"steps": 4, "checkpoint_every": 0, "eval_every": 0, "micro_batches_per_step": 2,
                         "max_failures": 2, **train})
    job["scaling"] = {"num_workers": [2, 3], "cpus_per_worker": 1}
    return job


def step_losses(output: str, after: int) -> dict[int, str]:
    """{step: its per-task losses as the step line prints them} for steps after `after`."""
    lines = re.findall(r"\[mtl\] step (\d+)/\d+ \| loss ([^|]+)\|", output)
    return {int(step): losses.strip() for step, losses in lines if int(step) > after}


# -- the job spec ------------------------------------------------------------------------------

def test_a_range_of_workers_keeps_the_global_batch_on_every_size(tmp_path):
    job = elastic_job(tmp_path, "/m", tmp_path / "runs")
    job["tasks"]["sentiment"]["accumulation"] = 2
    job["train"].pop("micro_batches_per_step")
    spec = JobSpec.model_validate(job)
    assert spec.scaling.elastic and (spec.scaling.min_workers, spec.scaling.max_workers) == (2, 3)
    # counted at 3 workers: 6 micro-batches per step on 3 or on 2 workers
    assert spec.step_shape(3) == (2, {"sentiment": 2})
    assert spec.step_shape(2) == (3, {"sentiment": 3})
    with pytest.raises(ValueError, match="outside scaling.num_workers"):
        spec.step_shape(4)
    again = JobSpec.model_validate(spec.model_dump(mode="json"))  # the resolved job.yaml reads back the same
    assert again.scaling.num_workers == (2, 3)


def test_a_global_batch_that_some_size_cannot_share_is_refused_with_one_that_can(tmp_path):
    job = elastic_job(tmp_path, "/m", tmp_path / "runs", micro_batches_per_step=1)
    with pytest.raises(ValueError, match=r"train.micro_batches_per_step: 1 per worker at 3 workers is 3 "
                                         r"micro-batches per step, which 2 workers cannot share evenly.*"
                                         r"train.micro_batches_per_step: 2\)"):
        JobSpec.model_validate(job)


def test_an_elastic_run_needs_restarts(tmp_path):
    job = elastic_job(tmp_path, "/m", tmp_path / "runs", max_failures=0)
    with pytest.raises(ValueError, match="train.max_failures: 0 forbids"):
        JobSpec.model_validate(job)


@pytest.mark.parametrize("workers, message", [([3, 2], "1 <= min <= max"), ([0, 2], "1 <= min <= max"),
                                              ([1, 2, 3], "or \\[min, max\\]"), (0, "at least 1")])
def test_a_wrong_range_is_named(tmp_path, workers, message):
    job = elastic_job(tmp_path, "/m", tmp_path / "runs")
    job["scaling"]["num_workers"] = workers
    with pytest.raises(ValueError, match=f"scaling.num_workers.*{message}"):
        JobSpec.model_validate(job)


def test_ray_gets_the_range_and_the_resize_interval(tmp_path):
    from launcher.run import scaling_config

    spec = JobSpec.model_validate(elastic_job(tmp_path, "/m", tmp_path / "runs"))
    config = scaling_config(spec.scaling.model_copy(update={"resize_check_s": 15.0}))
    assert config.elasticity_enabled and (config.min_workers, config.max_workers) == (2, 3)
    assert config.elastic_resize_monitor_interval_s == 15.0


# -- the small form: more workers asked for than the machine holds ------------------------------

@pytest.mark.e2e
def test_an_elastic_run_starts_with_the_workers_the_machine_holds(data_dir, model_dir, tmp_path, write_job):
    # This machine's embedded Ray holds 2 one-CPU workers of the 3 asked for.
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "train",
                           write_job(elastic_job(data_dir, model_dir, tmp_path / "runs"))],
                          cwd=REPO, text=True, capture_output=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "elastic run on 2 workers (scaling.num_workers [2, 3]): 3 micro-batches each per step, 6 in all" in output
    state = json.loads((tmp_path / "runs" / "elastic" / "step-000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


# -- the drill: a node lost mid-run --------------------------------------------------------------

def kill_raylet(cluster, node_name: str) -> int:
    node = next(n for n in cluster.started if n.name == node_name)
    raylet = next(p for p in psutil.Process(node.process.pid).children(recursive=True) if p.name() == "raylet")
    raylet.send_signal(signal.SIGKILL)
    return raylet.pid


STEPS = 200


@pytest.mark.e2e
@pytest.mark.drill
def test_a_lost_node_shrinks_the_run_which_goes_on_as_a_smaller_one_would(data_dir, model_dir, tmp_path, monkeypatch):
    from launcher.local_cluster import LocalCluster

    # The GCS notices a dead node within ~3 s (not ~15 s), and Ray Train's controller gives up on the
    # lost node's worker sooner than its 60 s default, so the drill does not wait on them.
    monkeypatch.setenv("RAY_health_check_period_ms", "1000")
    monkeypatch.setenv("RAY_health_check_failure_threshold", "3")
    runs = tmp_path / "runs"
    job = elastic_job(data_dir, model_dir, runs, steps=STEPS, checkpoint_every=10)
    path = tmp_path / "elastic.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    cluster = LocalCluster(nodes=3, cpus_per_node=1, stop_grace_s=5).start()
    log_path = tmp_path / "driver.log"
    try:
        env = {**os.environ, **cluster.auth_env, "PYTHONUNBUFFERED": "1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
        with open(log_path, "w") as log:
            driver = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", str(path),
                                       "--address", cluster.gcs_address], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while "saved version step-000010" not in log_path.read_text():  # steps take ~0.1 s: kill at once
            assert driver.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.02)
        kill_raylet(cluster, "node2")
        driver.wait(timeout=600)
        output = log_path.read_text()
        assert driver.returncode == 0, output[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.stop()
        cluster.cleanup()
    assert "elastic run on 3 workers" in output and "elastic run on 2 workers" in output
    resumed = int(re.findall(r"resumed from step-(\d+)", output)[-1])
    assert 10 <= resumed < STEPS and f"run 'elastic' finished at step-{STEPS:06d}" in output
    state = json.loads((runs / "elastic" / f"step-{STEPS:06d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2

    # The same job from that version on, with 2 workers from the start (this machine's embedded Ray).
    reference = tmp_path / "reference"
    shutil.copytree(runs / "elastic", reference / "elastic", ignore=shutil.ignore_patterns(".lease"))
    for version in (reference / "elastic").glob("step-*"):
        if int(version.name.removeprefix("step-")) > resumed:
            shutil.rmtree(version)
    again = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(path), f"storage.path={reference}"],
                           cwd=REPO, text=True, capture_output=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    expected = step_losses(again.stdout + again.stderr, resumed)
    assert len(expected) == STEPS - resumed
    assert step_losses(output.split(f"resumed from step-{resumed:06d}")[-1], resumed) == expected
