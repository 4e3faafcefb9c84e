"""One run per experiment, on a folder and on a real S3-compatible server: a second driver is
refused naming the holder; a holder that was SIGKILLed loses the lease after its TTL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, job_dict
from launcher.lease import Lease, LeaseHeld

TTL = 4.0
HOLDER = """
import json, sys, time
from trainer.spec import StorageSpec
from trainer.versions.storage import open_storage
from launcher.lease import Lease
lease = Lease(open_storage(StorageSpec(**json.loads(sys.argv[1]))), sys.argv[2], "holder0run", float(sys.argv[3]))
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold(location: dict, experiment: str, env: dict | None = None) -> subprocess.Popen:
    """A real driver-like process that takes the lease and keeps it alive until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(location), experiment, str(TTL)], cwd=REPO,
                              env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def locations(tmp_path, s3_server) -> dict:
    return {"folder": {"path": str(tmp_path / "runs")},
            "s3": {"path": "s3://mtl-test/lease-runs", "endpoint_url": s3_server.endpoint, "region": "us-east-1"}}


@pytest.fixture
def s3_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "mtl-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "mtl-test-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize("store", ["folder", "s3"])
def test_a_second_run_is_refused_and_a_killed_holder_is_taken_over(store, tmp_path, s3_server, s3_keys):
    from trainer.spec import StorageSpec
    from trainer.versions.storage import open_storage

    location = locations(tmp_path, s3_server)[store]
    storage = open_storage(StorageSpec(**location))
    experiment = f"leased-{store}-{time.monotonic_ns()}"
    holder = hold(location, experiment)
    try:
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match=rf"is being trained by another run: run holder0run on .* \(pid {holder.pid},"):
            Lease(storage, experiment, "second", TTL, settle_s=0.5).acquire()
        assert time.monotonic() - started < TTL  # refused at once, not after waiting out the holder
        assert set(storage.list_file_times(f"{experiment}/.lease")) == {"holder0run.json", "holder0run.beat"}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    said = []
    time.sleep(TTL)  # its last heartbeat is now older than the TTL
    with Lease(storage, experiment, "third", TTL, settle_s=0.5, say=said.append):
        assert len(said) == 1 and said[0].startswith(f"took over '{experiment}' from run holder0run on ")
        assert "its heartbeat stopped (storage.lease_ttl_s 4s)" in said[0]
        assert set(storage.list_file_times(f"{experiment}/.lease")) == {"third.json", "third.beat"}
    assert storage.list_file_times(f"{experiment}/.lease") == {}  # released at the end


def test_mtl_train_on_a_held_experiment_exits_2_naming_the_holder_before_starting_ray(data_dir, model_dir, tmp_path):
    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment",))
    job.update(name="twice", storage={"path": str(tmp_path / "runs"), "lease_ttl_s": TTL})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    holder = hold({"path": str(tmp_path / "runs")}, "twice")
    try:
        done = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(path)], cwd=REPO, text=True,
                              capture_output=True, timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "mtl train: error: experiment 'twice' is being trained by another run: run holder0run" in done.stderr
    assert f"(pid {holder.pid}," in done.stderr and "--new" in done.stderr
    assert "Ray" not in done.stderr  # refused before a Ray was started
    assert not (tmp_path / "runs" / "twice" / "job.yaml").exists()
