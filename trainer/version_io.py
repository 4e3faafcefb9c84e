"""Using a version on its own, in one process: rebuild the model from the version's files.

A version holds the model's config (`config/`), the tokenizer, `tasks.json` and the
DeepSpeed state. The weights are consolidated to fp32 with DeepSpeed's own ZeRO reader
(stages 1-3; stage 0 keeps whole weights in its model file), so a version trained on N
workers can be evaluated or exported anywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from trainer.checkpoint import COMMITTED, DS_TAG
from trainer.safe_load import weights_only_loads
from trainer.errors import UserError
from trainer.models import HeadSpec, MultiTaskModel, build_model_from_config
from trainer.weighting import UncertaintyWeighting


@dataclass
class LoadedVersion:
    model: MultiTaskModel
    tokenizer: object
    manifest: dict  # tasks.json
    job: dict  # job.yaml
    folder: Path


def consolidated_state_dict(ds_folder: Path) -> dict[str, torch.Tensor]:
    state_dir = ds_folder / DS_TAG
    if any(state_dir.glob("*optim_states.pt")) and _zero_stage(state_dir) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per step of its work
            return get_fp32_state_dict_from_zero_checkpoint(str(ds_folder), tag=DS_TAG)
    module = torch.load(state_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    return {k: v.float() for k, v in module.items()}


def _zero_stage(state_dir: Path) -> int:
    first = sorted(state_dir.glob("*optim_states.pt"))[0]
    state = torch.load(first, map_location="cpu", weights_only=True)
    return int(state["optimizer_state_dict"].get("zero_stage", 0))


def load_version(folder: str | Path) -> LoadedVersion:
    from transformers import AutoConfig, AutoTokenizer

    weights_only_loads()  # DeepSpeed's consolidation loads the shards itself
    folder = Path(folder)
    if not (folder / COMMITTED).exists():
        raise UserError(f"{folder} is not a committed version (no COMMITTED marker)")
    manifest = json.loads((folder / "tasks.json").read_text())
    job = yaml.safe_load((folder / "job.yaml").read_text())
    config = AutoConfig.from_pretrained(folder / "config")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True  # we truncate
    if manifest["encoding"] == "causal" and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    static = {t: spec.get("weight", 1.0) for t, spec in job["tasks"].items()}
    weighting = UncertaintyWeighting(static) if job.get("loss_weighting", {}).get("strategy") == "uncertainty" else None
    model = build_model_from_config(
        kind=manifest["kind"], encoding=manifest["encoding"], config=config,
        heads=[HeadSpec(t, m["type"], len(m["labels"])) for t, m in manifest["tasks"].items()],
        loss_weighting=weighting, lora=job["model"].get("lora"))
    missing, unexpected = model.load_state_dict(consolidated_state_dict(folder / "deepspeed"), strict=False)
    # Tied weights (e.g. an LM head tied to its embeddings) are stored once; anything else is a mismatch.
    tied = {k for k in missing if k.endswith(("lm_head.weight", "decoder.weight", "cls.predictions.decoder.weight"))}
    if set(missing) - tied or unexpected:
        raise UserError(f"{folder}: the saved weights do not match the model "
                        f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied and hasattr(model.lm or model.backbone, "tie_weights"):
        (model.lm or model.backbone).tie_weights()
    model.eval()
    return LoadedVersion(model, tokenizer, manifest, job, folder)
