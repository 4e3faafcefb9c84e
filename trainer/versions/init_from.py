"""Starting a new run from another run's version: its weights, this job's tasks.

`init_from: {experiment, version}` loads the version's model weights into the model this job
builds, before DeepSpeed's engine is made (under ZeRO-3 the model is already partitioned then:
rank 0 alone reads the version and the model is loaded one module at a time, each gathered and
partitioned again from rank 0's values, as transformers loads a pretrained model into ZeRO-3; no
rank ever holds the whole model):

- a task the version knows keeps its head (text2text models: the LM that learned its prompt);
- a task it does not know gets a new head, initialised as in any new run;
- a task of the version that this job leaves out is dropped with its head;
- learned loss weights (uncertainty) carry over when the tasks are the same, else start afresh.

The optimizer, learning-rate schedule, step count and data order start fresh: it is a new run.
With `resume_optimizer: true` the optimizer's state (Adam's moments and step counts) carries over
too, which needs the very same parameters and partitions: the same tasks in the same order, the
same model and the same number of workers.
A task that keeps its name must keep its type and, for a heads model, its labels in order, or
the old head would answer with the wrong label ids; both are refused with what differs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from trainer.collectives import distributed, from_rank0
from trainer.errors import UserError
from trainer.model import is_partitioned


def init_location(spec):
    """(storage, experiment name) of `init_from.experiment`: a name on the job's storage, or a folder / URI."""
    from trainer.versions.storage import open_experiment, open_storage

    where = spec.init_from.experiment
    if "://" in where or "/" in where or os.path.isdir(where):
        return open_experiment(where)
    return open_storage(spec.storage), where


def describe(spec) -> str:
    return f"{spec.init_from.experiment}/{spec.init_from.version}"


def manifest_problems(spec, manifest: dict) -> list[str]:
    """What in the job contradicts the version's tasks.json (the version already resolved)."""
    problems = []
    if manifest["kind"] != spec.model.kind:
        problems.append(f"init_from: {describe(spec)} is a {manifest['kind']} model; this job's model.kind is "
                        f"'{spec.model.kind}'")
    for task, info in manifest["tasks"].items():
        if task in spec.tasks and spec.tasks[task].type != info["type"]:
            problems.append(f"tasks.{task}: {spec.tasks[task].type} here, {info['type']} in {describe(spec)}; "
                            f"a new task needs a new name")
    return problems


def label_problems(spec, manifest: dict, labels: dict[str, tuple[str, ...]]) -> list[str]:
    """Heads models: a kept classification task must have the labels its head was trained on, in order."""
    if manifest.get("encoding") != "heads":
        return []  # text2text models read and write the label words themselves
    return [f"tasks.{task}: labels {list(labels[task])} here, {info['labels']} in {describe(spec)}; the head "
            f"answers with label ids, so keep the labels (tasks.{task}.labels) or name the task anew"
            for task, info in manifest["tasks"].items()
            if task in labels and info.get("labels") and list(labels[task]) != list(info["labels"])]


def load_init_weights(model: torch.nn.Module, spec, labels: dict[str, tuple[str, ...]]) -> dict:
    """Load init_from's version into `model` (this job's, before DeepSpeed); returns what was
    kept, added and dropped, by task."""
    from trainer.inference import TIED_WEIGHTS, download_model_files, whole_weights
    from trainer.scratch import scratch
    from trainer.versions.base_model import read_base, require_base
    from trainer.versions.whole_weights import frozen_names

    storage, name = init_location(spec)
    where = f"{name}/{spec.init_from.version}"
    partitioned = any(is_partitioned(p) for p in model.parameters())
    reads = not partitioned or not distributed() or torch.distributed.get_rank() == 0
    manifest = read_manifest(storage, where)
    if manifest is None:
        raise UserError(f"init_from: {storage.describe(where)} is not a committed version")
    problems = manifest_problems(spec, manifest) + label_problems(spec, manifest, labels)
    if problems:
        raise UserError("init_from: the version does not fit this job:\n" + "\n".join(f"  - {p}" for p in problems))
    old, new = list(manifest["tasks"]), list(spec.tasks)
    dropped = [t for t in old if t not in new]
    weights, base = {}, None
    if reads:  # under ZeRO-3 rank 0 alone: the others get each module's values from it
        with scratch("init-from") as local:
            fetch_shards = download_model_files(storage, where, local)
            base = read_base(Path(local))
            if base is not None:  # LoRA adapters and heads only: they go over this job's base, which must be theirs
                require_base(base, storage.describe(where), spec.model.name_or_path)
            weights = whole_weights(Path(local), fetch_optimizer_shards=fetch_shards)
        weights = {k: v for k, v in weights.items() if not any(k.startswith(f"heads.{t}.") for t in dropped)}
        if old != new:  # one learned log-variance per task, in task order
            weights = {k: v for k, v in weights.items() if not k.startswith("loss_weighting.")}
    verdict = (*fit_by_name(model, weights), base is not None) if reads else None
    if partitioned:  # what rank 0 found, for every rank: they all load, or all refuse
        verdict = from_rank0(verdict)
    problem, missing, unexpected, adapters_only = verdict
    if problem:  # shapes differ: another base model or LoRA rank
        raise UserError(f"init_from: the weights of {describe(spec)} do not fit this job's model: {problem}")
    if partitioned:
        load_module_by_module(model, weights if reads else None)
    else:
        model.load_state_dict(weights, strict=False)
    frozen = frozen_names(model) if adapters_only else set()  # a LoRA version's base is this job's own
    added = [t for t in new if t not in old]
    missing = [k for k in missing if not k.startswith("loss_weighting.") and not k.endswith(TIED_WEIGHTS)
               and k not in frozen and not any(k.startswith(f"heads.{t}.") for t in added)]
    if missing or unexpected:
        raise UserError(f"init_from: the weights of {describe(spec)} do not fit this job's model (a different "
                        f"base model or LoRA setting?): missing {missing[:3]}, unexpected {unexpected[:3]}")
    return {"experiment": spec.init_from.experiment, "version": spec.init_from.version,
            "kept": [t for t in new if t in old], "added": added, "dropped": dropped}


def fit_by_name(model: torch.nn.Module, weights: dict) -> tuple[str | None, list[str], list[str]]:
    """(a shape problem or None, missing names, unexpected names) of loading `weights` into `model`,
    found from names and whole shapes (a ZeRO-3 partition's `ds_shape`) without gathering anything."""
    shapes = {name: tuple(getattr(t, "ds_shape", t.shape)) for name, t in model.state_dict(keep_vars=True).items()}
    for name, value in weights.items():
        if name in shapes and tuple(value.shape) != shapes[name]:
            return f"{name} is {tuple(value.shape)} there and {shapes[name]} here", [], []
    return None, [k for k in shapes if k not in weights], [k for k in weights if k not in shapes]


def load_module_by_module(model: torch.nn.Module, weights: dict | None) -> None:
    """Every rank calls this together; rank 0 holds `weights`. Each module's own parameters are
    gathered whole, take rank 0's values, and are partitioned again from them (DeepSpeed's
    GatheredParameters with modifier_rank=0): one module whole at a time, never the model."""
    import deepspeed

    for prefix, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
            for name, p in params.items():
                key = f"{prefix}.{name}" if prefix else name
                if weights is not None and key in weights:
                    p.data.copy_(weights[key])
    own = dict(model.named_buffers())
    buffers = from_rank0({k: v for k, v in weights.items() if k in own} if weights is not None else None)
    with torch.no_grad():
        for name, value in buffers.items():
            own[name].copy_(value)


def pinned(spec):
    """The job with init_from.version resolved to a committed version's name (latest, best, a tag
    -> step-N), so every rank, and every restart, loads the same one."""
    from trainer.versions.version_registry import pick_version

    storage, name = init_location(spec)
    spec = spec.model_copy(deep=True)
    spec.init_from.version = pick_version(storage, name, spec.init_from.version)
    return spec


def read_manifest(storage, where: str) -> dict | None:
    """The version's tasks.json (None when it has none), its task names checked before any is used."""
    from trainer.inference import check_manifest

    manifest = storage.read_json(f"{where}/tasks.json")
    if manifest is not None:
        check_manifest(manifest, f"{storage.describe(where)}/tasks.json")
    return manifest


def check(spec) -> list[str]:
    """Before any resource starts: the version exists and its tasks fit the job's."""
    try:
        spec = pinned(spec)
        storage, name = init_location(spec)
        where = f"{name}/{spec.init_from.version}"
        manifest = read_manifest(storage, where)
        state = storage.read_json(f"{where}/trainer_state.json") if spec.init_from.resume_optimizer else None
        job = (yaml.safe_load(storage.read_text(f"{where}/job.yaml") or "{}") or {}) if state else {}
    except UserError as exc:
        return [f"init_from: {exc}"]
    return manifest_problems(spec, manifest) + (optimizer_problems(spec, manifest, state, job) if state else [])


def optimizer_problems(spec, manifest: dict, state: dict, job: dict) -> list[str]:
    """resume_optimizer: the optimizer's state is partitioned over the same parameters, groups and ranks."""
    from trainer.model import job_heads_apart

    problems = []
    if job_heads_apart(job) != job_heads_apart(spec.model_dump(mode="json")):
        problems.append("init_from.resume_optimizer: the version's heads had optimizer groups of their own "
                        "(tasks.<t>.lr_scale or train.head_warmup_steps) and this job's do not, or the other way "
                        "round: its optimizer state has another layout")
    if list(manifest["tasks"]) != list(spec.tasks):
        problems.append(f"init_from.resume_optimizer: the tasks must be the version's, in order "
                        f"({', '.join(manifest['tasks'])}); here {', '.join(spec.tasks)}")
    if spec.scaling.elastic:
        problems.append(f"init_from.resume_optimizer: the optimizer's partitions need a fixed number of workers; "
                        f"scaling.num_workers is a range {list(spec.scaling.num_workers)}")
    elif state["world_size"] != spec.scaling.num_workers:
        problems.append(f"init_from.resume_optimizer: the version was trained on {state['world_size']} workers; "
                        f"scaling.num_workers is {spec.scaling.num_workers}")
    return problems


def load_init_optimizer(engine, spec, rank: int) -> None:
    """resume_optimizer: this rank's optimizer partition from the version, with a fresh step
    count and schedule (DeepSpeed's checkpoint would set them to the version's)."""
    from trainer.scratch import scratch
    from trainer.versions.checkpoint import DS_TAG, download_part

    storage, name = init_location(spec)
    with scratch("init-from-optimizer") as local:
        download_part(storage, f"{name}/{spec.init_from.version}", local, rank)
        try:
            path, _ = engine.load_checkpoint(str(local / "deepspeed"), tag=DS_TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        except (RuntimeError, KeyError, ValueError) as exc:  # another ZeRO stage or model: DeepSpeed's own words
            raise UserError(f"init_from.resume_optimizer: the optimizer state of {describe(spec)} does not fit "
                            f"this job (same model, ZeRO stage, ZeRO-3 sub_group_size and workers needed): {str(exc).splitlines()[0]}") from None
    if path is None:
        raise UserError(f"init_from.resume_optimizer: {describe(spec)} holds no DeepSpeed state")
    engine.global_steps = engine.global_samples = engine.skipped_steps = 0


def forgetting_table(init: dict, after: dict, step: int) -> str:
    """Each task's primary validation metric before (the version started from) and after this run."""
    lines = [f"{'task':<16}{'metric':<16}{'before':>9}{'after':>9}{'change':>9}",
             f"(validation; before: {init['experiment']}/{init['version']} with this job's tasks; after: step {step})"]
    for task, metric in init["primary"].items():
        was, now = init["before"].get(task, {}).get(metric), after.get(task, {}).get(metric)
        if was is None or now is None:
            continue
        mark = "  (new task)" if task in init["added"] else ""
        lines.insert(-1, f"{task:<16}{metric:<16}{was:>9.4f}{now:>9.4f}{now - was:>+9.4f}{mark}")
    return "\n".join(lines)
