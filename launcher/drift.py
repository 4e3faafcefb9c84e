"""No silent drift on resume: what a job changes against the version it would resume from.

Running a name again resumes its optimizer, schedule, data streams and weighting state. If the
job now differs in anything that shapes training (model, tasks, data, lr, schedule, weighting,
mixture, batch shape, precision, the DeepSpeed config file), resuming would silently mix two
experiments, so `mtl train` refuses and lists the differences. The user then chooses:

  --new               a fresh experiment under the first free name `<name>-2`, `<name>-3`, ...
  --allow-changes     continue this one with the changes: the model, optimizer state, data
                      positions and step come from the version; everything else (lr, schedule,
                      weights, mixture, ...) follows the new job from the next step on.

What does not change training may differ freely: train.steps (raising it trains further; see
`schedule_note` for what that does to the LR), evaluation and checkpoint cadence, retention,
logging, failure handling, placement and storage details.
"""

from __future__ import annotations

import json
import math
import types
import typing

from trainer.model import DEVICE_KEYS, lr_factor

# Dotted prefixes that never change the trained model, so they may differ on resume.
FREE = ("train.steps", "train.eval_every", "train.checkpoint_every", "train.keep_last", "train.keep_best",
        "train.max_failures", "train.stop_grace_s", "train.log_every", "train.eval_batch_size", "train.validation",
        "train.validation_cpus", "train.validation_gpus", "scaling.use_gpu",
        "scaling.gpus_per_worker", "scaling.cpus_per_worker", "scaling.placement", "scaling.accelerator_type",
        "scaling.wait_for_nodes_s", "scaling.num_workers", "scaling.resize_check_s", "scaling.collective_timeout_s",
        "model.gradient_checkpointing", "model.attn_implementation", "model.init",
        "storage", "name", "init_from", "serve",
        *(f"deepspeed file.{key}" for key in DEVICE_KEYS))
# scaling.num_workers may change: the run says what a resume on another world size does (launcher.versions).
# Checkpointing and the attention kernels compute the same model; model.init, like init_from, matters
# only when a run starts (a resume loads the version's weights).
# init_from matters only when a run starts (its versions record the pinned one); later it resumes from its own.
# DeepSpeed's overlap_comm and pin_memory move the same numbers at another time, or through another buffer.

# Fields added with a default that trains differently from what versions written before them did:
# such a version's job holds no value, and it trained as this one says.
TRAINED_BEFORE = {"train.loss_normalization": "micro_batch", "mixture.draw": "random"}


def flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def is_free(path: str) -> bool:
    return any(path == f or path.startswith(f + ".") for f in FREE)


def training_differences(old_job: dict, new_job: dict, old_ds: dict | None = None,
                         new_ds: dict | None = None) -> list[str]:
    """'field: old -> new' for every training-relevant difference between two resolved jobs. With
    both DeepSpeed files' contents (a version records its own), those are compared instead of
    their paths: `mtl submit` ships the file under another path, a path may be gone by now."""
    old, new = flatten(old_job), flatten(new_job)
    if old_ds is not None and new_ds is not None:
        old.pop("deepspeed", None)
        new.pop("deepspeed", None)
        old.update(flatten(old_ds, "deepspeed file"))
        new.update(flatten(new_ds, "deepspeed file"))
    lines = []
    for path in sorted(set(old) | set(new)):
        if is_free(path) or _same(old.get(path), new.get(path)):
            continue
        if path not in old and path in TRAINED_BEFORE:
            if _same(TRAINED_BEFORE[path], new.get(path)):
                continue
            lines.append(f"{path}: {_show(TRAINED_BEFORE[path])} (before the field existed) -> {_show(new.get(path))}")
            continue
        if path not in old and new_field_default(path) == (True, new[path]):
            continue  # a field added after the version was written: it trained as the default does
        if path == "train.precision" and new.get(path) == "auto":
            continue  # a version records what `auto` resolved to
        lines.append(f"{path}: {_show(old.get(path, '(absent)'))} -> {_show(new.get(path, '(absent)'))}")
    return lines


def new_field_default(path: str) -> tuple[bool, object]:
    """(whether the spec gives the field at dotted `path` a default, that default as a job file
    holds it). A field mtl added later keeps the old behaviour by default, so a version written
    before it existed, which holds no value for it, has not drifted from a job that leaves it be."""
    from trainer.spec import JobSpec

    return _field_default(JobSpec, path.split("."))


def _field_default(model, parts: list[str]) -> tuple[bool, object]:
    from pydantic import BaseModel

    if not parts or not (isinstance(model, type) and issubclass(model, BaseModel)) or parts[0] not in model.model_fields:
        return False, None
    field = model.model_fields[parts[0]]
    if len(parts) == 1:
        if field.is_required():
            return False, None
        default = field.get_default(call_default_factory=True)
        return True, default.model_dump(mode="json") if isinstance(default, BaseModel) else default
    inner = field.annotation
    options = [a for a in typing.get_args(inner) if a is not type(None)]
    if typing.get_origin(inner) in (typing.Union, types.UnionType) and len(options) == 1:
        inner = options[0]  # X | None
    if typing.get_origin(inner) is dict:  # tasks.<name>.<field>: the key names no field
        return _field_default(typing.get_args(inner)[1], parts[2:])
    return _field_default(inner, parts[1:])


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def schedule_note(old_train: dict, new_train: dict, step: int) -> str | None:
    """What raising (or lowering) train.steps does to the learning rate at the step a run resumes from."""
    if old_train.get("steps") == new_train.get("steps"):
        return None
    lr = new_train["lr"]
    before = lr * lr_factor(old_train["lr_schedule"], old_train["warmup_steps"], old_train["steps"])(step)
    after = lr * lr_factor(new_train["lr_schedule"], new_train["warmup_steps"], new_train["steps"])(step)
    if math.isclose(before, after, rel_tol=1e-9, abs_tol=1e-15):
        return None
    return (f"train.steps {old_train['steps']} -> {new_train['steps']}: the {new_train['lr_schedule']} schedule "
            f"now ends at step {new_train['steps']}, so the learning rate at step {step} goes from "
            f"{before:.2e} to {after:.2e} (the schedule is a function of step / train.steps)")
