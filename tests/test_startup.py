"""What a run's start costs before its first step: imports on every worker, Ray's own start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO


def test_deepspeed_is_imported_without_mlflow_and_mlflow_still_imports():
    # DeepSpeed's autotuner imports mlflow when it is installed (it is, with mtl's tracking extra);
    # every worker paid for it at its start. mtl's own mlflow tracker must still get the real one.
    code = ("import sys, trainer, deepspeed\n"
            "from deepspeed.autotuning import autotuner\n"
            "assert 'mlflow' not in sys.modules, 'mlflow imported with deepspeed'\n"
            "assert autotuner.has_mlflow is False\n"
            "import mlflow\n"
            "assert mlflow.__file__\n"
            "print('ok')\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_embedded_ray_settings_and_a_clusters_own(monkeypatch):
    import ray

    from launcher import run

    seen = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(run, "tidy_worker_output", lambda: None)
    probed = []
    monkeypatch.setattr(run, "require_listening", probed.append)  # no connection to the made-up addresses
    run.init_ray(num_cpus=2, _system_config={"object_spilling_threshold": 0.9})
    assert probed == []  # an embedded Ray: nothing to probe
    assert seen["_system_config"] == {"prestart_worker_first_driver": False, "object_spilling_threshold": 0.9}
    assert seen["num_cpus"] == 2 and seen["address"] is None
    assert seen["runtime_env"]["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    # Its actors ask this Ray's state API, wherever the dashboard went (8265 or, when taken, a free port).
    assert seen["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{seen['dashboard_port']}"

    for address, env in (("ray://head:10001", None), (None, "10.0.0.1:6379")):  # a cluster's settings are its own
        seen.clear()
        if env:
            monkeypatch.setenv("RAY_ADDRESS", env)  # ray.init(address=None) joins it
        run.init_ray(address)
        assert "_system_config" not in seen and "dashboard_port" not in seen
        assert "RAY_API_SERVER_ADDRESS" not in seen["runtime_env"]["env_vars"]
        assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in seen["runtime_env"]["env_vars"]  # drains happen there
    assert probed == ["ray://head:10001", "10.0.0.1:6379"]


def test_a_second_embedded_ray_on_the_machine_gets_a_dashboard_port_of_its_own():
    import socket

    from launcher.run import dashboard_port

    first = dashboard_port("127.0.0.1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first))
        taken.listen()
        second = dashboard_port("127.0.0.1")
    assert second != first and 1024 < second < 65536


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["validate", "--help"], ["train", "--help"]])
def test_help_and_version_import_no_heavy_library(argv):
    """`mtl --help` answers at once: torch, Ray, transformers and DeepSpeed load only for a verb that runs."""
    code = ("import sys\nfrom launcher.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('loaded:', ','.join(m for m in ('torch', 'ray', 'transformers', 'deepspeed') if m in sys.modules))"
            % argv)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "loaded:"
