"""The worker loop without Ray: `python -m launcher.torchrun` under torchrun, on a machine where
Ray cannot even be imported, and trainer/ touching Ray only through trainer/runtime.py."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, job_dict


def test_trainer_touches_ray_only_through_its_runtime():
    importers = []
    for path in sorted((REPO / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.append(path.relative_to(REPO).as_posix())
    assert set(importers) == {"trainer/runtime.py"}, sorted(set(importers))


def no_ray(tmp_path: Path) -> dict[str, str]:
    """An environment where `import ray` fails, as on a machine without it."""
    stub = tmp_path / "no-ray" / "ray"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("Ray is not installed on this machine")\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub.parent), str(REPO)]), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def torchrun(job: str, env: dict, *overrides: str, procs: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                           "-m", "launcher.torchrun", job, *overrides], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=600)


@pytest.mark.e2e
def test_a_job_trains_and_resumes_under_torchrun_without_ray(data_dir, model_dir, tmp_path, write_job):
    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment", "qa"))
    job.update(name="plain", storage={"path": str(tmp_path / "runs")})
    job["tasks"]["qa"]["options"] = {"doc_stride": 16}
    job["train"].update({"steps": 2, "checkpoint_every": 0, "eval_every": 2, "micro_batches_per_step": 2})
    job["scaling"] = {"num_workers": 2}
    path = write_job(job)
    env = no_ray(tmp_path)

    done = torchrun(path, env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "[mtl] rank 1 of 2 on node" in output and "eval validation step 2 sentiment" in output
    assert "run 'plain' finished at step-000002" in output
    run = tmp_path / "runs" / "plain"
    assert (run / "step-000002" / "COMMITTED").exists() and (run / "job.yaml").exists()
    assert not list((run / ".lease").glob("*.json")), "the lease outlived the run"

    again = torchrun(path, env, "train.steps=3")
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert "resumed from step-000002" in output
    assert json.loads((run / "step-000003" / "trainer_state.json").read_text())["world_size"] == 2

    # SIGTERM to torchrun (which passes it on, as Slurm's does to it): a version at the current step
    log = tmp_path / "sigterm.log"
    with open(log, "w") as out:
        running = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                    "-m", "launcher.torchrun", path, "train.steps=100000"], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while "[mtl] step 6/" not in log.read_text():
        assert running.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    running.send_signal(signal.SIGTERM)
    running.wait(timeout=300)
    output = log.read_text()
    assert "rank 0 got SIGTERM: writing a version at this step" in output, output[-3000:]
    stopped_at = max(int(v.name[5:]) for v in run.glob("step-*") if (v / "COMMITTED").exists())
    assert stopped_at >= 6 and not list((run / ".lease").glob("*.json"))

    # torchrun's world size is the job's: a mismatch is named before anything starts
    wrong = torchrun(path, env, f"train.steps={stopped_at + 1}", procs=1)
    assert wrong.returncode != 0
    assert ("torchrun started 1 processes but scaling.num_workers is 2" in wrong.stderr
            and not (run / f"step-{stopped_at + 1:06d}").exists())


@pytest.mark.e2e
@pytest.mark.drill
def test_the_gpu_check_wiring_runs_on_the_cpu():
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--dry"], cwd=REPO, text=True,
                          capture_output=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "check" not in line]
    assert len(rows) == 5 and all("| yes  |" in row for row in rows), done.stdout
