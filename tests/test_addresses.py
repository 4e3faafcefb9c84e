"""Cluster addresses as Ray's own tools read them: a dashboard for the Jobs API, a GCS for a
driver; RAY_API_SERVER_ADDRESS and RAY_ADDRESS as defaults; the wrong kind named without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, job_dict
from launcher.addresses import driver_address, jobs_address
from launcher.cli import build_parser
from trainer.errors import UserError


@pytest.fixture(autouse=True)
def no_cluster_in_the_environment(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def test_a_driver_joins_the_flag_else_ray_address_else_an_embedded_ray(monkeypatch):
    assert driver_address(None, "train") is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert driver_address(None, "train") == "10.0.0.1:6379"
    assert driver_address("auto", "train") == "auto"
    assert driver_address("ray://head:10001", "serve") == "ray://head:10001"


def test_a_dashboard_given_to_a_driver_says_to_submit(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    with pytest.raises(UserError) as err:
        driver_address(None, "train")
    message = str(err.value)
    assert message.startswith("RAY_ADDRESS=http://head:8265 is a cluster's dashboard")
    assert "mtl submit JOB --address http://head:8265" in message and "unset RAY_ADDRESS" in message


def test_jobs_read_ray_api_server_address_before_ray_address(monkeypatch):
    with pytest.raises(UserError, match="no cluster address"):
        jobs_address(None)
    assert jobs_address(None, required=False) is None  # multinode: then a local cluster is started
    monkeypatch.setenv("RAY_ADDRESS", "http://other:8265")
    assert jobs_address(None) == "http://other:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert jobs_address(None) == "http://head:8265"
    assert jobs_address("head") == "http://head:8265"
    with pytest.raises(UserError, match="auto is a driver's address; the Jobs API is the head node's dashboard"):
        jobs_address("auto")


def test_submit_waits_and_follows_by_default():
    parser = build_parser()
    assert parser.parse_args(["submit", "job.yaml"]).wait is True
    assert parser.parse_args(["submit", "job.yaml", "--no-wait"]).wait is False


def test_train_with_a_dashboard_in_ray_address_is_one_line_not_a_traceback(data_dir, write_job):
    job = write_job(job_dict(data_dir))
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "train", job], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:1"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "mtl train: error: RAY_ADDRESS=http://127.0.0.1:1 is a cluster's dashboard (the Jobs API); `mtl train` joins "
        "a cluster as a driver, through its GCS address (HEAD:6379, or auto on one of its nodes). To run there from "
        "this machine, use `mtl submit JOB --address http://127.0.0.1:1`, or unset RAY_ADDRESS for an embedded "
        "local Ray"]


def test_a_gcs_address_with_nothing_listening_is_refused_at_once():
    import socket

    from launcher.addresses import require_listening

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        require_listening(f"127.0.0.1:{listening.getsockname()[1]}")  # something answers: no error
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
    with pytest.raises(UserError, match=f"cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers there"):
        require_listening(f"127.0.0.1:{port}")
    with pytest.raises(UserError, match="expected HEAD:PORT"):
        require_listening("head-without-port")
    require_listening("auto")  # Ray finds the cluster of this node itself


def test_the_auth_token_never_crosses_a_network_in_plain_http(monkeypatch):
    from launcher import ray_auth

    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-not-real")
    assert ray_auth.auth_headers("http://127.0.0.1:8265") == {"Authorization": "Bearer tok-not-real"}
    assert ray_auth.auth_headers("https://head.example:8443") == {"Authorization": "Bearer tok-not-real"}
    with pytest.raises(UserError, match="refusing to send the cluster's auth token over plain http to 10.0.0.5") as err:
        ray_auth.auth_headers("http://10.0.0.5:8265")
    assert "ssh -L 8265:localhost:8265" in str(err.value) and "--insecure" in str(err.value)
    monkeypatch.setattr(ray_auth, "allow_plain_http", True)
    assert ray_auth.auth_headers("http://10.0.0.5:8265") == {"Authorization": "Bearer tok-not-real"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setattr(ray_auth, "allow_plain_http", False)
    assert ray_auth.auth_headers("http://10.0.0.5:8265") == {}  # no token: nothing to leak


def test_jobs_refuse_plain_http_to_another_host_before_connecting():
    # A documentation address (TEST-NET-1): refused before anything is sent.
    env = {**os.environ, "RAY_AUTH_TOKEN": "tok-not-real"}
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "jobs", "list", "--address", "http://192.0.2.1:8265"],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=60)
    assert done.returncode == 2 and "refusing to send the cluster's auth token over plain http" in done.stderr
    assert "Traceback" not in done.stderr
