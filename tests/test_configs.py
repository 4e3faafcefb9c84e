"""Every shipped job and DeepSpeed config loads; DeepSpeed numbers are derived in one place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO
from launcher.jobfile import load_job, parse_overrides, resolve_ds_config
from launcher.validate import validate_job
from trainer.model.ds_config import build_ds_config, read_ds_config
from trainer.errors import SpecError, UserError

JOBS = sorted((REPO / "jobs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
DEMO_DATA = (REPO / "data" / "demo" / "sentiment" / "train.jsonl").exists()


def test_there_are_shipped_configs():
    assert len(JOBS) >= 3 and len(DS_CONFIGS) >= 6


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_job_passes_schema_and_deepspeed_checks(path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_job(str(path))
    report = validate_job(spec, check_files=False)
    assert report.ok, report.errors
    assert Path(spec.deepspeed).exists()


@pytest.mark.skipif(not DEMO_DATA and not os.environ.get("CI"), reason="demo data not prepared (make demo-data)")
@pytest.mark.parametrize("path", [p for p in JOBS if p.name.startswith("demo")], ids=lambda p: p.name)
def test_demo_jobs_pass_full_validation_when_data_is_there(path, monkeypatch):
    monkeypatch.chdir(REPO)
    report = validate_job(load_job(str(path)))
    assert report.ok, report.errors


@pytest.mark.parametrize("path", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
def test_every_shipped_ds_config_builds(path):
    base = read_ds_config(str(path))
    config = build_ds_config(base, micro_batch_size=8, micro_batches_per_step=4, world_size=2,
                             max_grad_norm=1.0, precision="bf16")
    assert config["train_batch_size"] == 64
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["bf16"] == {"enabled": True}
    assert "optimizer" not in config and "scheduler" not in config  # torch objects built by the loop
    assert config["zero_optimization"]["stage"] == int(path.stem[4])


@pytest.mark.parametrize("use_gpu", [False, True])
def test_shipped_configs_overlap_communication_and_pin_memory_only_on_gpus(use_gpu):
    """overlap_comm and pin_memory are "auto" in every shipped file that has them: on for GPU
    workers, off for CPU ones; no "auto" reaches DeepSpeed."""
    from trainer.model.ds_config import offloads_optimizer

    offloaded = set()
    for path in DS_CONFIGS:
        config = build_ds_config(read_ds_config(str(path)), micro_batch_size=8, micro_batches_per_step=4,
                                 world_size=2, max_grad_norm=1.0, precision="bf16", use_gpu=use_gpu)
        zero = config["zero_optimization"]
        if zero["stage"] > 0:
            assert zero["overlap_comm"] is use_gpu, path.name
        for part in ("offload_optimizer", "offload_param"):
            if part in zero:
                assert zero[part]["pin_memory"] is use_gpu, path.name
        if offloads_optimizer(config):
            offloaded.add(path.stem)
    assert offloaded == {"zero2_offload", "zero3_offload"}


def test_an_offloaded_optimizer_steps_with_deepspeeds_cpu_adam_only_on_gpu_workers(monkeypatch):
    import types

    import deepspeed.ops.adam

    from trainer.loop_setup import job_optimizer

    made = []
    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam",  # its C++ op is built on first use (~1 min)
                        lambda groups, **kw: made.append(kw) or types.SimpleNamespace(param_groups=groups))
    groups = [{"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.1}]
    assert isinstance(job_optimizer(groups, 1e-3, host_adam=False), torch.optim.AdamW) and not made
    job_optimizer(groups, 1e-3, host_adam=True)
    assert made == [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "adamw_mode": True}]


def test_ds_config_auto_is_filled_and_conflicts_raise():
    config = build_ds_config({"train_batch_size": "auto", "gradient_accumulation_steps": 3},
                             micro_batch_size=2, micro_batches_per_step=3, world_size=4, max_grad_norm=None,
                             precision="fp32")
    assert config["train_batch_size"] == 24 and config["gradient_clipping"] == 0.0
    assert "bf16" not in config and "fp16" not in config
    with pytest.raises(SpecError, match=r"zero_optimization.allgather_bucket_size is \"auto\""):
        build_ds_config({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto",
                                               "reduce_bucket_size": "auto"}},  # the model fills this one
                        micro_batch_size=2, micro_batches_per_step=3, world_size=4, max_grad_norm=None,
                        precision="fp32")
    with pytest.raises(SpecError, match=r"^deepspeed: reduce_bucket_size is"):  # only filled in zero_optimization
        build_ds_config({"reduce_bucket_size": "auto"},
                        micro_batch_size=2, micro_batches_per_step=3, world_size=4, max_grad_norm=None,
                        precision="fp32")
    with pytest.raises(SpecError, match="optimizer"):
        build_ds_config({"optimizer": {"type": "Adam"}}, micro_batch_size=2, micro_batches_per_step=3,
                        world_size=4, max_grad_norm=None, precision="fp32")


def test_ds_config_by_bare_name():
    assert resolve_ds_config("zero3_offload") == str(REPO / "ds_configs" / "zero3_offload.json")
    assert resolve_ds_config("my.json").endswith("/my.json")


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["train.steps=20", "tasks.a.weight=2.5", "scaling.use_gpu=true", "name=x"]) == {
        "train": {"steps": 20}, "tasks": {"a": {"weight": 2.5}}, "scaling": {"use_gpu": True}, "name": "x"}
    with pytest.raises(UserError, match="dotted.key=value"):
        parse_overrides(["train..steps=1"])
    with pytest.raises(UserError, match="conflicts"):
        parse_overrides(["train=1", "train.steps=2"])


def test_the_mixture_default_follows_the_model_kind(tmp_path):
    """Unset, mixture.strategy is uniform for an LM and temperature for a heads model (what the
    quality benchmark supports for each); a job's own choice stays, and a saved job keeps what ran."""
    from conftest import job_dict
    from launcher.jobfile import parse_job

    lm = parse_job(job_dict(tmp_path))
    heads = parse_job(job_dict(tmp_path, kind="heads", tasks=("sentiment", "qa")))
    assert (lm.mixture.strategy, heads.mixture.strategy) == ("uniform", "temperature")
    assert parse_job(lm.model_dump()).mixture.strategy == "uniform"
    chosen = job_dict(tmp_path)
    chosen["mixture"] = {"strategy": "temperature"}
    assert parse_job(chosen).mixture.strategy == "temperature"
    chosen["mixture"] = {"strategy": None, "rates": {"qa": 1.0}}
    with pytest.raises(UserError, match="only goes with strategy 'explicit'"):
        parse_job(chosen)


def test_all_fixed_accumulation_sets_step_size(tmp_path):
    from conftest import job_dict
    from launcher.jobfile import parse_job

    job = job_dict(tmp_path)
    for t, n in zip(job["tasks"], (2, 1, 1)):
        job["tasks"][t]["accumulation"] = n
    del job["train"]["micro_batches_per_step"]
    assert parse_job(job).train.micro_batches_per_step == 4
    job["train"]["micro_batches_per_step"] = 3
    with pytest.raises(UserError, match="together 4"):
        parse_job(job)


def test_ds_configs_are_plain_json():
    for path in DS_CONFIGS:
        data = json.loads(path.read_text())
        assert "train_batch_size" not in data and "optimizer" not in data  # derived, never hand-set


def test_the_docs_embed_the_current_schema_reference():
    from launcher.reference import BEGIN, END, markdown

    readme = (REPO / "docs" / "reference.md").read_text()
    embedded = readme.split(BEGIN + "\n", 1)[1].split(END, 1)[0]
    assert embedded == markdown(), "docs/reference.md is stale: regenerate it with python -m launcher.reference"


def test_setup_installs_the_locked_versions_of_every_dependency():
    """A fresh machine gets what the project was tested with: requirements.lock pins every
    dependency pyproject.toml names (and theirs), torch without a local build tag."""
    import re
    import tomllib

    from conftest import REPO

    locked = dict(line.split("==", 1) for line in (REPO / "requirements.lock").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    locked = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in locked.items()}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    needed = [*project["dependencies"], *extras["dev"]]
    for requirement in needed:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0]).lower()
        if name == project["name"]:  # the project's own extras (dev pulls in [tracking]): what they name
            needed += [r for extra in re.search(r"\[(.*)\]", requirement).group(1).split(",")
                       for r in extras[extra.strip()]]
            continue
        assert name in locked, f"{name} is not in requirements.lock (run `make lock`)"
    assert locked["torch"] == "2.13.0"
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -c $(LOCK) -e '.[dev]'" in makefile and "LOCK := requirements.lock" in makefile
