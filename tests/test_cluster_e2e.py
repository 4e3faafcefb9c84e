"""A real multi-node Ray cluster on loopback (head + worker node, token auth on, dashboard on),
driven the way a user drives one: `mtl submit`, `mtl jobs ...` as separate processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml

from conftest import REPO, job_dict

pytestmark = pytest.mark.e2e

SECRET = "hf_not-a-real-token-4c1d"
AWS_SECRET = "aws-secret-not-real-77aa"
WANDB_SECRET = "wandb-key-not-real-93f0"
SECRETS = (SECRET, AWS_SECRET, WANDB_SECRET)


@pytest.fixture(scope="module")
def cluster():
    from launcher.local_cluster import LocalCluster

    # Ray Train's record of each run (what its dashboard page shows) on, as clusters often have it.
    with mock.patch.dict(os.environ, {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}):
        cluster = LocalCluster(nodes=2, cpus_per_node=1, stop_grace_s=5).start()  # SIGKILL sooner at teardown
    started = cluster.pids()
    yield cluster
    cluster.stop()
    import psutil

    assert not [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE], \
        "a process of the cluster outlived its teardown"
    cluster.cleanup()


def mtl(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, env=full, text=True,
                          capture_output=True, timeout=timeout)


def tiny_heads_job(data_dir, model_dir, tmp_path, name: str, **scaling) -> str:
    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment", "qa"))
    job["name"] = name
    job["storage"] = {"path": str(tmp_path / "runs")}
    job["tasks"]["qa"]["options"] = {"doc_stride": 16}
    job["train"].update({"steps": 2, "checkpoint_every": 0, "eval_every": 0, "lr": 1e-3,
                         "micro_batches_per_step": 2})
    job["scaling"] = {"num_workers": 2, "cpus_per_worker": 1, "placement": "strict_spread", **scaling}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return str(path)


def test_submit_runs_on_two_nodes_and_jobs_commands_follow_it(cluster, data_dir, model_dir, tmp_path, monkeypatch):
    job = tiny_heads_job(data_dir, model_dir, tmp_path, "submitted")
    # Secrets in the shell, forwarded on request; no metadata service to ask on loopback (public setting).
    env = {**cluster.auth_env, "HF_TOKEN": SECRET, "AWS_ACCESS_KEY_ID": "AKIANOTREAL", "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "WANDB_API_KEY": WANDB_SECRET, "WANDB_MODE": "offline", "AWS_EC2_METADATA_DISABLED": "true"}
    submitted = mtl("submit", job, "--address", cluster.dashboard_url, "--wait", "--forward-credentials", env=env)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = re.search(r"submitted job (\S+)", submitted.stdout).group(1)
    assert f"mtl jobs logs {job_id} --follow" in submitted.stdout

    # The step lines reach `mtl jobs logs`, and the two ranks ran on two different nodes.
    logs = mtl("jobs", "logs", job_id, "--address", cluster.dashboard_url, env=env)
    assert logs.returncode == 0, logs.stderr
    assert "[mtl] step 2/2" in logs.stdout
    from launcher.submit import rank_placement

    placement = rank_placement(logs.stdout)
    assert set(placement) == {0, 1}
    node_ids = {n["node_id"] for n in cluster.alive_nodes()}
    assert {node for node, _ in placement.values()} == node_ids and len(node_ids) == 2

    status = mtl("jobs", "status", job_id, "--address", cluster.dashboard_url, env=env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "submitted" in status.stdout
    listed = mtl("jobs", "list", "--address", cluster.dashboard_url, env=env)
    assert job_id in listed.stdout

    # The version landed on storage; every rank, on both nodes, had the secrets from its driver...
    assert (tmp_path / "runs" / "submitted" / "step-000002" / "COMMITTED").exists()
    for rank in (0, 1):
        assert (f"[mtl] rank {rank}: secrets from the driver: HF_TOKEN, WANDB_API_KEY, AWS_ACCESS_KEY_ID, "
                f"AWS_SECRET_ACCESS_KEY") in logs.stdout
    # ... and they are nowhere a person or Ray shows them: not in the job's runtime_env, metadata or
    # logs, nor in any actor's or task's runtime_env, nor in Ray Train's record of the run.
    from launcher.ray_auth import get_json
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token_path.read_text()}"})
    info = client.get_job_info(job_id)
    for key, value in cluster.auth_env.items():
        monkeypatch.setenv(key, value)
    state = [json.dumps(get_json(f"{cluster.dashboard_url}/api/v0/{kind}?limit=10000&detail=true"))
             for kind in ("actors", "tasks", "jobs")]
    state.append(json.dumps(get_json(f"{cluster.dashboard_url}/api/train/v2/runs/v1")))
    assert '"serialized_runtime_env"' in state[0] and "train_loop_config" in state[3]  # what is searched is there
    shown = [submitted.stdout, submitted.stderr, logs.stdout, status.stdout, listed.stdout,
             json.dumps(info.runtime_env), json.dumps(info.metadata), info.entrypoint,
             (tmp_path / "runs" / "submitted" / "job.yaml").read_text(), *state]
    for text in shown:
        assert not [secret for secret in SECRETS if secret in text]
    # The package's secrets file was read and removed on every node that unpacked the package.
    assert not list(cluster.root.rglob(".mtl/env.json"))
    assert list(cluster.root.rglob(".mtl/job.yaml"))  # the packages themselves are still cached

    # The version is evaluated as a Ray task on one of the cluster's nodes, as `mtl eval` here would.
    scored = mtl("eval", str(tmp_path / "runs" / "submitted"), "--address", cluster.gcs_address, "--split",
                 "validation", "--no-baselines", env=cluster.auth_env)
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
    node = re.search(r"evaluated as a Ray task on node (\S+)", scored.stderr).group(1)
    assert node in node_ids and "validation split" in scored.stdout
    evals = json.loads((tmp_path / "runs" / "submitted" / "evals" / "step-000002" / "validation.json").read_text())
    assert set(evals) == {"sentiment", "qa"} and evals["sentiment"]["rows"] == 10


def test_a_request_the_cluster_can_never_hold_fails_within_the_bound(cluster, data_dir, model_dir, tmp_path):
    job = tiny_heads_job(data_dir, model_dir, tmp_path, "too-big", num_workers=3, wait_for_nodes_s=5)
    started = time.monotonic()
    result = mtl("submit", job, "--address", cluster.dashboard_url, "--wait", env=cluster.auth_env, timeout=240)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "asks for 3 workers" in result.stdout and "can hold at most 2" in result.stdout
    assert elapsed < 120


def test_the_jobs_api_refuses_a_client_without_the_token(cluster):
    result = mtl("jobs", "list", "--address", cluster.dashboard_url,
                 env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong-token", "RAY_AUTH_TOKEN_PATH": ""},
                 timeout=60)
    assert result.returncode == 2
    assert f"cannot reach the Ray Jobs API at {cluster.dashboard_url}" in result.stderr or \
        "token" in result.stderr.lower()


def test_multinode_checks_the_job_before_starting_any_node(tmp_path, data_dir, model_dir):
    job = tiny_heads_job(data_dir, model_dir, tmp_path, "bad")
    started = time.monotonic()
    result = mtl("multinode", job, "tasks.sentiment.wieght=2", timeout=120)
    assert result.returncode == 2 and "tasks.sentiment.wieght: unknown key (did you mean 'weight'?)" in result.stderr
    assert "starting a local Ray cluster" not in result.stderr and time.monotonic() - started < 60


def test_a_submitted_job_can_be_stopped(cluster, data_dir, model_dir, tmp_path):
    job = tiny_heads_job(data_dir, model_dir, tmp_path, "long", num_workers=1)
    submitted = mtl("submit", job, "train.steps=100000", "--address", cluster.dashboard_url, "--no-wait",
                    env=cluster.auth_env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\S+)", submitted.stdout).group(1)
    stopped = mtl("jobs", "stop", job_id, "--address", cluster.dashboard_url, env=cluster.auth_env)
    assert stopped.returncode == 0 and f"job {job_id}: stop requested" in stopped.stdout
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        status = mtl("jobs", "status", job_id, "--address", cluster.dashboard_url, env=cluster.auth_env)
        if "STOPPED" in status.stdout:
            break
        time.sleep(1)
    assert "STOPPED" in status.stdout and status.returncode == 1
    unknown = mtl("jobs", "status", "mtl-no-such-job", "--address", cluster.dashboard_url, env=cluster.auth_env)
    assert unknown.returncode == 2 and "no job 'mtl-no-such-job'" in unknown.stderr


@pytest.mark.drill
def test_a_pods_prestop_hook_has_its_worker_write_a_version(cluster, data_dir, model_dir, tmp_path):
    """What the KubeRay manifests' preStop runs when a pod is deleted: the Ray Train worker under that
    node's processes gets SIGTERM, writes a version at its step and exits before the pod goes."""
    job = tiny_heads_job(data_dir, model_dir, tmp_path, "pod")
    submitted = mtl("submit", job, "train.steps=100000", "--address", cluster.dashboard_url, "--no-wait",
                    env=cluster.auth_env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\S+)", submitted.stdout).group(1)
    try:
        deadline = time.monotonic() + 240
        logs = ""
        while "[mtl] step 3/" not in logs:
            assert time.monotonic() < deadline, logs[-3000:]
            time.sleep(1)
            logs = mtl("jobs", "logs", job_id, "--address", cluster.dashboard_url, env=cluster.auth_env).stdout
        node1 = next(n for n in cluster.started if n.name == "node1")
        hook = subprocess.run([sys.executable, "-m", "launcher.prestop", "--root-pid", str(node1.process.pid),
                               "--grace", "120"], cwd=REPO, capture_output=True, text=True, timeout=180)
        assert hook.returncode == 0 and "1 Ray Train worker(s) sent SIGTERM; 1 exited within" in hook.stderr, \
            hook.stderr
        deadline = time.monotonic() + 60
        while "got SIGTERM: writing a version at this step" not in logs:
            assert time.monotonic() < deadline, logs[-3000:]
            time.sleep(1)
            logs = mtl("jobs", "logs", job_id, "--address", cluster.dashboard_url, env=cluster.auth_env).stdout
        step = int(re.findall(r"saved version step-(\d+)", logs)[-1])
        assert (tmp_path / "runs" / "pod" / f"step-{step:06d}" / "COMMITTED").exists(), logs[-3000:]
    finally:
        mtl("jobs", "stop", job_id, "--address", cluster.dashboard_url, env=cluster.auth_env)


@pytest.mark.drill
def test_a_preemption_notice_writes_a_version_and_training_goes_on(cluster, data_dir, model_dir, tmp_path):
    """A node of the run is drained for preemption (what a cloud's spot reclaim does through Ray):
    the loop writes a version at the step it is at and keeps training. Last in this module: the
    drained node takes no new work afterwards."""
    from launcher.submit import rank_placement

    job = tiny_heads_job(data_dir, model_dir, tmp_path, "spot")
    submitted = mtl("submit", job, "train.steps=100000", "--address", cluster.dashboard_url, "--no-wait",
                    env=cluster.auth_env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted job (\S+)", submitted.stdout).group(1)

    def logs_with(pattern: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = mtl("jobs", "logs", job_id, "--address", cluster.dashboard_url, env=cluster.auth_env).stdout
            if re.search(pattern, logs):
                return logs
            time.sleep(2)
        raise AssertionError(f"no '{pattern}' in the job's logs:\n{logs[-3000:]}")

    try:
        node = rank_placement(logs_with(r"\[mtl\] step 3/"))[1][0]
        drained = subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address",
                                  cluster.gcs_address, "--node-id", node, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                                  "--reason-message", "spot reclaim drill", "--deadline-remaining-seconds", "3600"],
                                 env={**os.environ, **cluster.auth_env}, capture_output=True, text=True, timeout=60)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        logs = logs_with(r"being preempted: writing a version at step (\d+)")
        step = int(re.search(r"being preempted: writing a version at step (\d+)", logs)[1])
        later = logs_with(rf"\[mtl\] step {step + 3}/")  # training went on
        # Committed before the next step, not at a later one the drained node may not see.
        committed = later.index(f"version step-{step:06d} committed before training goes on (preemption)")
        assert later.index(f"saved version step-{step:06d}") < committed < later.index(f"[mtl] step {step + 1}/")
        assert (tmp_path / "runs" / "spot" / f"step-{step:06d}" / "COMMITTED").exists()
    finally:
        mtl("jobs", "stop", job_id, "--address", cluster.dashboard_url, env=cluster.auth_env)
