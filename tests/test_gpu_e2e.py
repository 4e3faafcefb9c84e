"""On a CUDA machine: the GPU path end to end (NCCL collectives, bf16, resume, eval on the GPU).

Skipped without a CUDA device; run it where one is: `pytest tests/test_gpu_e2e.py`.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import job_dict

pytestmark = [pytest.mark.gpu, pytest.mark.e2e,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    from launcher.run import init_ray

    init_ray(num_cpus=4, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    yield
    ray.shutdown()


def test_gpu_training_resumes_and_evaluates(ray_gpu, data_dir, model_dir, tmp_path):
    from launcher.evaluate import evaluate_version
    from launcher.jobfile import parse_job, resolve
    from launcher.run import train

    workers = min(2, torch.cuda.device_count())
    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment", "qa"))
    job.update(name="gpu", storage={"path": str(tmp_path / "runs")},
               scaling={"num_workers": workers, "use_gpu": True, "gpus_per_worker": 1})
    job["tasks"]["qa"]["options"] = {"doc_stride": 16}
    job["train"].update({"steps": 2, "checkpoint_every": 1, "eval_every": 2, "precision": "bf16", "lr": 1e-3})
    train(resolve(parse_job(job)))  # the step statistics are all-reduced by NCCL: CUDA tensors only
    run = tmp_path / "runs" / "gpu"
    assert (run / "step-000002" / "COMMITTED").exists()

    job["train"]["steps"] = 3  # the same name resumes from step-000002
    train(resolve(parse_job(job)))
    state = json.loads((run / "step-000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == workers

    report = evaluate_version(resolve(parse_job(job)), split="test")
    assert report["version"] == "step-000003"
    assert 0.0 <= report["results"]["sentiment"]["metrics"]["accuracy"] <= 1.0


def test_gpu_offload_steps_the_optimizer_with_deepspeeds_cpu_adam(ray_gpu, data_dir, model_dir, tmp_path):
    """zero2_offload on GPU workers: pinned host buffers, overlapped reductions, DeepSpeed's CPU Adam
    (built on first use) — two steps commit a version and a resume continues it."""
    from launcher.jobfile import parse_job, resolve
    from launcher.run import train

    workers = min(2, torch.cuda.device_count())
    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment",))
    job.update(name="offload", storage={"path": str(tmp_path / "runs")}, deepspeed="zero2_offload",
               scaling={"num_workers": workers, "use_gpu": True, "gpus_per_worker": 1})
    job["train"].update({"steps": 2, "checkpoint_every": 1, "eval_every": 0, "precision": "bf16", "lr": 1e-3})
    train(resolve(parse_job(job)))
    job["train"]["steps"] = 3
    train(resolve(parse_job(job)))
    state = json.loads((tmp_path / "runs" / "offload" / "step-000003" / "trainer_state.json").read_text())
    assert state["step"] == 3
