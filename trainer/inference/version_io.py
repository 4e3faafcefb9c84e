"""Using a version on its own, in one process: rebuild the model from the version's files.

A version holds the model's config (`config/`), the tokenizer, `tasks.json` and the
DeepSpeed state. The model's whole weights are read without the optimizer state (see
`whole_weights`), so a version trained on N workers can be evaluated, used or exported
anywhere, in one process.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from trainer.control import UncertaintyWeighting
from trainer.errors import UserError
from trainer.model import HeadSpec, MultiTaskModel, build_model_from_config
from trainer.spec import task_name_problem
from trainer.versions import (
    COMMITTED,
    DS_TAG,
    MODEL_STATES,
    WHOLE_WEIGHTS,
    frozen_names,
    has_whole_weights,
    read_base,
    read_whole_weights,
    require_base,
    weights_only_loads,
)

# Weights a model ties to others (an LM head to its embeddings): a state dict holds them once.
TIED_WEIGHTS = ("lm_head.weight", "decoder.weight", "cls.predictions.decoder.weight")


@dataclass
class LoadedVersion:
    model: MultiTaskModel
    tokenizer: object
    manifest: dict  # tasks.json
    job: dict  # job.yaml
    folder: Path


def whole_weights(folder: Path, fetch_optimizer_shards=None) -> dict[str, torch.Tensor]:
    """The model's weights (fp32) from a version folder, without its optimizer state.

    ZeRO-3 versions hold them gathered (`weights/`, trainer.versions.whole_weights); ZeRO 0-2 keep them whole in
    DeepSpeed's model-states file. Both are the weights the run evaluated with, so `mtl eval`
    agrees with the in-training validation. Only a ZeRO-3 version from before `weights/`
    existed needs the optimizer shards (`fetch_optimizer_shards()` brings them when they are
    not in the folder), consolidated by DeepSpeed's zero_to_fp32.
    """
    if has_whole_weights(folder / WHOLE_WEIGHTS):
        return {k: v.float() for k, v in read_whole_weights(folder / WHOLE_WEIGHTS).items()}
    module = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=True)["module"]
    if not any(v.numel() == 0 for v in module.values()):
        return {k: v.float() for k, v in module.items()}
    # ZeRO-3 placeholders in the model-states file: the partitions are in the optimizer shards.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not any((folder / "deepspeed" / DS_TAG).glob("*optim_states.pt")):
        if fetch_optimizer_shards is None:
            raise UserError(f"{folder}: a ZeRO-3 version without weights/ needs its optimizer shards")
        fetch_optimizer_shards()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per step of its work
        return get_fp32_state_dict_from_zero_checkpoint(str(folder / "deepspeed"), tag=DS_TAG)


def as_trained(model: torch.nn.Module, precision: str | None) -> None:
    """A frozen base as the run held it: a bf16/fp16 run trained and validated over its base cast
    to that dtype (DeepSpeed casts the model), so `mtl eval` of its adapters reads the base rounded
    the same way and agrees with the in-training validation."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision or "")
    if dtype is None:
        return
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype).float()


def check_manifest(manifest, where: str) -> None:
    """A version's tasks.json is read from storage that others may write: every task name must be
    one a job could have given, before any of them becomes part of a path (export's heads/<task>)."""
    tasks = manifest.get("tasks") if isinstance(manifest, dict) else None
    if not isinstance(tasks, dict):
        raise UserError(f"{where}: no task map; not a version mtl wrote")
    for name in tasks:
        if problem := task_name_problem(name):
            raise UserError(f"{where}: {problem}; refusing a version whose tasks.json mtl did not write as it is")


def _settings(folder: Path) -> tuple[dict, dict, object]:
    """A committed version's tasks.json, job and tokenizer: how its model reads and writes text."""
    from transformers import AutoTokenizer

    if not (folder / COMMITTED).exists():
        raise UserError(f"{folder} is not a committed version (no COMMITTED marker)")
    manifest = json.loads((folder / "tasks.json").read_text())
    check_manifest(manifest, str(folder / "tasks.json"))
    job = yaml.safe_load((folder / "job.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True  # we truncate
    if manifest["encoding"] == "causal" and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return manifest, job, tokenizer


def _heads(manifest: dict) -> list[HeadSpec]:
    return [HeadSpec(t, m["type"], len(m["labels"])) for t, m in manifest["tasks"].items()]


def load_version(folder: str | Path, fetch_optimizer_shards=None) -> LoadedVersion:
    from transformers import AutoConfig

    weights_only_loads()  # DeepSpeed's consolidation loads the shards itself
    folder = Path(folder)
    manifest, job, tokenizer = _settings(folder)
    config = AutoConfig.from_pretrained(folder / "config")
    static = {t: spec.get("weight", 1.0) for t, spec in job["tasks"].items()}
    weighting = UncertaintyWeighting(static) if job.get("loss_weighting", {}).get("strategy") == "uncertainty" else None
    base = read_base(folder)
    if base is None:
        model = build_model_from_config(kind=manifest["kind"], encoding=manifest["encoding"], config=config,
                                        heads=_heads(manifest), loss_weighting=weighting, lora=job["model"].get("lora"))
        frozen = set()
    else:  # the trained parameters only: the rest is the base model it names (trainer.versions.base_model)
        from trainer.model import build_model

        model = build_model(kind=manifest["kind"], encoding=manifest["encoding"],
                            name_or_path=require_base(base, str(folder)), heads=_heads(manifest),
                            loss_weighting=weighting, lora=job["model"].get("lora"))
        frozen = frozen_names(model)
        as_trained(model, job.get("train", {}).get("precision"))
    missing, unexpected = model.load_state_dict(whole_weights(folder, fetch_optimizer_shards), strict=False)
    # Tied weights (e.g. an LM head tied to its embeddings) are stored once; anything else is a mismatch.
    tied = {k for k in missing if k.endswith(TIED_WEIGHTS)} | (set(missing) & frozen)
    if set(missing) - tied or unexpected:
        raise UserError(f"{folder}: the saved weights do not match the model "
                        f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied and hasattr(model.lm or model.backbone, "tie_weights"):
        (model.lm or model.backbone).tie_weights()
    model.eval()
    return LoadedVersion(model, tokenizer, manifest, job, folder)


def load_untrained(folder: str | Path) -> LoadedVersion:
    """The model a run started from, with a version's settings (tasks, labels, tokenizer): the
    job's pretrained weights, and heads initialised as the run initialised them (train.seed).
    What fine-tuning added is the difference between this model's scores and the version's."""
    from trainer.model import build_model

    folder = Path(folder)
    manifest, job, tokenizer = _settings(folder)
    if job.get("init_from"):
        start = f"{job['init_from']['experiment']}/{job['init_from']['version']}"
        raise UserError(f"this run started from {start}, not from model.name_or_path: evaluate that version "
                        f"for the model it started from (its validation scores then are in forgetting.json)")
    torch.manual_seed(job.get("train", {}).get("seed", 0))  # as trainer.loop seeds it before building
    where = job["model"]["name_or_path"]
    try:
        model = build_model(kind=manifest["kind"], encoding=manifest["encoding"], name_or_path=where,
                            heads=_heads(manifest), lora=job["model"].get("lora"),
                            init=job["model"].get("init", "pretrained"),
                            attn_implementation=job["model"].get("attn_implementation"))
    except OSError as e:  # a folder that is not here, or a hub name without the hub
        raise UserError(f"the untrained model: model.name_or_path '{where}' of the run's job cannot be "
                        f"loaded here ({str(e).splitlines()[0]})") from e
    model.eval()
    return LoadedVersion(model, tokenizer, manifest, job, folder)


def load_from_storage(storage, experiment: str, version: str, local: Path, untrained: bool = False) -> LoadedVersion:
    """A committed version's model, downloaded into `local`: the model's files only, never the
    optimizer shards (most of a version's bytes), unless an old ZeRO-3 version needs them.
    `untrained`: the model the run started from, with this version's settings (load_untrained)."""
    from trainer.versions import settings_needs

    where = f"{experiment}/{version}"
    if untrained:  # the version's settings only; the weights are the job's pretrained ones
        storage.download_files(where, str(local), keep=settings_needs)
        return load_untrained(local)
    return load_version(local, fetch_optimizer_shards=download_model_files(storage, where, local))


def download_model_files(storage, where: str, local: Path):
    """The files of version `where` (experiment/version on `storage`) that its model needs, into
    `local`; returns what fetches the optimizer shards, which only an old ZeRO-3 version needs
    (see whole_weights)."""
    from trainer.versions import model_needs

    storage.download_files(where, str(local), keep=model_needs)
    return lambda: storage.download_files(where, str(local), keep=lambda f: f.endswith("optim_states.pt"))
