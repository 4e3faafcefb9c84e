"""The memory plan (trainer.model.memory_plan): DeepSpeed's own accounting where it applies, and
`mtl validate` / `mtl train` refusing a job whose workers cannot fit the machine they run on."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import job_dict
from launcher.cli import main
from trainer.model.memory_plan import GIB, ModelSize, plan_memory

SEVEN_B = ModelSize(params=6_738_000_000, trainable=6_738_000_000, largest_layer=131_072_000, hidden=4096, layers=32,
                    heads=32, vocab=32000)


@pytest.mark.parametrize("stage", [2, 3])
def test_model_states_agree_with_deepspeeds_estimator_where_it_applies(stage):
    """DeepSpeed's estimators model 16-bit training of every parameter, on GPUs without offload."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    plan = plan_memory(SEVEN_B, stage=stage, world=16, precision="bf16", on_gpu=True)
    states = ("parameters", "gradients", "gradients (fp32 partition)", "optimizer (fp32 master, AdamW moments)")
    ours = sum(plan.device[k] for k in states)  # the model states: what the estimator counts beyond workspace
    if stage == 2:
        _, theirs = estimate_zero2_model_states_mem_needs(SEVEN_B.params, num_gpus_per_node=8, num_nodes=2,
                                                          cpu_offload=False)
    else:
        _, theirs, largest = estimate_zero3_model_states_mem_needs(
            SEVEN_B.params, SEVEN_B.largest_layer, num_gpus_per_node=8, num_nodes=2, cpu_offload=False)
        theirs -= largest  # its allowance for the gathered layer: ours is "gathered layers"
    assert abs(ours - theirs) / theirs < 0.15, (ours / GIB, theirs / GIB)


def test_each_stage_holds_less_and_offload_moves_the_optimizer_to_the_host():
    per_rank = [plan_memory(SEVEN_B, stage=s, world=8, precision="bf16", on_gpu=True).device_bytes for s in (0, 1, 2, 3)]
    assert per_rank == sorted(per_rank, reverse=True) and per_rank[3] < per_rank[0] / 5
    offloaded = plan_memory(SEVEN_B, stage=3, world=8, precision="bf16", on_gpu=True, offload_optimizer=True)
    assert "optimizer (fp32 master, AdamW moments)" in offloaded.host and offloaded.device_bytes < per_rank[3] / 2
    lora = plan_memory(ModelSize(**{**SEVEN_B.__dict__, "trainable": 20_000_000}), stage=0, world=8, precision="bf16",
                       on_gpu=True)
    assert lora.device_bytes < per_rank[0] / 5  # a frozen base holds no gradients or moments


def test_the_plan_counts_the_parameters_of_the_model_a_heads_job_builds(model_dir):
    """256 tasks' heads once counted as 38M phantom parameters (a dense layer no head has)."""
    from transformers import AutoConfig

    from trainer.model.memory_plan import model_size
    from trainer.model.models import HeadSpec, build_model

    heads = [HeadSpec("a", "classification", 2), HeadSpec("b", "classification", 5), HeadSpec("q", "extractive_qa", 0)]
    built = build_model(kind="heads", encoding="heads", name_or_path=str(model_dir), heads=heads)
    size = model_size(AutoConfig.from_pretrained(model_dir), "heads", "heads", head_labels=[2, 5, 0])
    assert size.params == size.trainable == sum(p.numel() for p in built.parameters())


def test_gradient_surgery_holds_two_fp32_copies_of_each_tasks_gradient_in_a_step():
    lora = ModelSize(**{**SEVEN_B.__dict__, "trainable": 20_000_000})
    plain = plan_memory(lora, stage=1, world=8, precision="bf16", on_gpu=True)
    surgery = plan_memory(lora, stage=1, world=8, precision="bf16", on_gpu=True, surgery_tasks=3)
    assert surgery.device["gradient surgery"] == 2 * 3 * 20_000_000 * 4
    assert surgery.device_bytes - plain.device_bytes == 2 * 3 * 20_000_000 * 4


def test_surgery_is_refused_where_gradients_are_partitioned_or_fp16_scaled(capsys, data_dir, model_dir, write_job):
    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment",))
    job["loss_weighting"] = {"surgery": "pcgrad"}
    job["deepspeed"] = "zero2"
    assert main(["validate", write_job(job)]) == 2
    assert ("loss_weighting.surgery: pcgrad holds each task's whole gradient of a step on every rank, which ZeRO-2 "
            "partitions") in capsys.readouterr().err
    job["deepspeed"] = "zero1"
    assert main(["validate", write_job(job)]) == 0, capsys.readouterr().out


@pytest.fixture
def large_model(tmp_path, causal_dir):
    """A ~0.7B Llama-shaped config (no weights: model.init random) with the tests' tokenizer."""
    from transformers import LlamaConfig

    folder = tmp_path / "large"
    shutil.copytree(causal_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    LlamaConfig(vocab_size=len(tokenizer["model"]["vocab"]), hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=14, num_attention_heads=16, max_position_embeddings=512).save_pretrained(folder)
    return folder


def test_a_job_that_cannot_fit_this_machine_is_refused_with_the_stage_that_would(
        capsys, monkeypatch, data_dir, large_model, write_job):
    import trainer.memory

    monkeypatch.setattr(trainer.memory, "total_bytes", lambda: 24 * GIB)  # the machine the plan is for
    job = job_dict(data_dir, str(large_model), tasks=("sentiment",))
    job["model"]["init"] = "random"
    job["train"].update(micro_batch_size=1, micro_batches_per_step=1)
    path = write_job(job)

    assert main(["validate", path, "deepspeed=zero0"]) == 2
    out = capsys.readouterr()
    assert "memory plan: 2 ranks x 1" in out.err and "deepspeed: zero3 (" in out.err and "--force" in out.err

    assert main(["validate", path, "deepspeed=zero0", "--force"]) == 0
    assert "warning: memory plan: 2 ranks" in capsys.readouterr().out

    assert main(["validate", path, "deepspeed=zero3"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per rank (ZeRO-3, fp32, 2 workers; 0.7" in out and "gathered layers" in out
