"""A process that is not a training rank touches a GPU only when it owns one."""

from __future__ import annotations

import torch

from trainer.inference import devices


def test_a_ray_helper_without_a_reserved_gpu_stays_on_the_cpu(monkeypatch):
    import ray

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node: every process sees its GPUs
    monkeypatch.setattr(devices, "in_ray_worker", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])  # validation_gpus: 0, --gpus-per-replica 0
    assert devices.helper_device() == torch.device("cpu")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])  # it reserved one: Ray made it cuda:0 for it
    assert devices.helper_device() == torch.device("cuda")
    monkeypatch.setattr(devices, "in_ray_worker", lambda: False)  # `mtl eval` on a GPU machine
    assert devices.helper_device() == torch.device("cuda")


def test_outside_ray_nothing_is_started_to_ask():
    import ray

    assert not ray.is_initialized()
    assert devices.in_ray_worker() is False
    assert not ray.is_initialized()
