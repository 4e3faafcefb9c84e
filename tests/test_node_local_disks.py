"""A loopback cluster whose nodes do not share a disk, as machines do not: each node runs in a mount
namespace of its own with a tmpfs at the same path (launcher.local_cluster's node_local). A run
whose storage or data lives there must stop with one line that says what to use instead, before
any version is split across the nodes' disks or the ranks train on different data."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, job_dict, sentiment_rows, write_jsonl

pytestmark = pytest.mark.e2e


def can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def own_disks(tmp_path_factory):
    """(cluster, the node-local path): the head sees one sentiment data set there, the other node another."""
    if not can_unshare():
        pytest.skip("needs root and unshare --mount for per-node disks")
    from launcher.local_cluster import LocalCluster

    seeds = tmp_path_factory.mktemp("seeds")
    for node, train_rows in (("head", 40), ("node1", 32)):
        rng = random.Random(train_rows)
        for split, n in (("train", train_rows), ("validation", 8), ("test", 8)):
            write_jsonl(seeds / node / "data" / "sentiment" / f"{split}.jsonl", sentiment_rows(n, rng))
    local = Path(tempfile.mkdtemp(prefix="mtl-own-disk-", dir="/tmp"))
    shutil.copytree(seeds / "head", local, dirs_exist_ok=True)  # what the driver, outside the nodes, reads
    cluster = LocalCluster(nodes=2, cpus_per_node=1, stop_grace_s=5,
                           node_local={str(local): [str(seeds / "head"), str(seeds / "node1")]}).start()
    yield cluster, local
    cluster.stop()
    cluster.cleanup()
    shutil.rmtree(local, ignore_errors=True)


def train_on(cluster, job: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    env = {**os.environ, **cluster.auth_env, "MTL_STORAGE_PROBE_WAIT_S": "3"}
    return subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(path), "--address", cluster.gcs_address],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=600)


def tiny_job(data: Path, model_dir, storage: Path, name: str) -> dict:
    job = job_dict(data, str(model_dir), "heads", tasks=("sentiment",))
    job.update(name=name, storage={"path": str(storage)})
    job["train"].update({"steps": 2, "checkpoint_every": 0, "eval_every": 0, "micro_batches_per_step": 2})
    job["scaling"] = {"num_workers": 2, "cpus_per_worker": 1, "placement": "strict_spread"}
    return job


def test_storage_on_each_nodes_own_disk_is_refused_before_a_step(own_disks, model_dir, tmp_path):
    cluster, local = own_disks
    data = tmp_path / "data"
    shutil.copytree(local / "data", data)  # on the disk every node shares
    done = train_on(cluster, tiny_job(data, model_dir, local / "runs", "own-disk-storage"), tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"storage.path {local / 'runs'} is not shared: rank 1 on" in done.stderr
    assert "a shared filesystem mounted at the same path on each node (NFS" in done.stderr and "s3://" in done.stderr
    assert "Traceback" not in done.stderr.split("error: storage.path")[-1]
    assert "[mtl] step 1/" not in done.stdout + done.stderr


def test_data_that_differs_between_nodes_is_refused_naming_the_task(own_disks, model_dir, tmp_path):
    cluster, local = own_disks
    done = train_on(cluster, tiny_job(local / "data", model_dir, tmp_path / "runs", "own-disk-data"), tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "tasks sentiment: rank 1 on" in done.stderr and "prepared other data than rank 0" in done.stderr
    assert "train 32 rows" in done.stderr and "train 40 rows" in done.stderr
    assert "put the data on a shared path or the hub" in done.stderr
    assert not list((tmp_path / "runs").glob("own-disk-data/step-*"))
