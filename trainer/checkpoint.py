"""Versions: one folder per checkpoint, with a fixed layout, committed last.

    step-000060/
      deepspeed/state/     engine.save_checkpoint (model, optimizer, scheduler; every rank's shards)
      trainer_state.json   step, planner + weighting state, per-task counters, last metrics (rank 0)
      rng/rank-<k>.pt      rank k's RNG states (python, numpy, torch) and data stream positions
      job.yaml             the resolved job this version was trained with
      tokenizer/           tokenizer files
      config/              the backbone's (or LM's) transformers config
      heads.json           task -> type, labels, prompt, encoding (what eval/predict need)
      COMMITTED            written last, once every rank's files are on storage

Every rank writes its own part into a local folder; Ray Train uploads and merges them into
one folder on storage. Exact resume needs the RNG and data positions, which DeepSpeed's own
checkpoint does not hold.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

DS_TAG = "state"
COMMITTED = "COMMITTED"


def version_name(step: int) -> str:
    return f"step-{step:06d}"


def capture_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rank_part(engine, folder: Path, rank: int, streams: dict) -> None:
    """What every rank writes: its DeepSpeed shards (a collective call) and its RNG + data positions."""
    engine.save_checkpoint(str(folder / "deepspeed"), tag=DS_TAG)
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    torch.save({"rng": capture_rng(), "streams": {t: s.state_dict() for t, s in streams.items()}},
               folder / "rng" / f"rank-{rank}.pt")


def write_global_part(folder: Path, *, trainer_state: dict, job_yaml: str, tokenizer, heads: dict,
                      model_config) -> None:
    """What rank 0 adds: the run's state and what is needed to use the version on its own."""
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    model_config.save_pretrained(str(folder / "config"))
    (folder / "job.yaml").write_text(job_yaml)
    (folder / "heads.json").write_text(json.dumps(heads, indent=1))
    tokenizer.save_pretrained(str(folder / "tokenizer"))


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def load_rank_part(engine, folder: Path, rank: int, streams: dict) -> None:
    path, _ = engine.load_checkpoint(str(folder / "deepspeed"), tag=DS_TAG)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {folder / 'deepspeed'}")
    part = torch.load(folder / "rng" / f"rank-{rank}.pt", weights_only=False)
    for task, state in part["streams"].items():
        if task in streams:
            streams[task].load_state_dict(state)
    restore_rng(part["rng"])


def mark_committed(storage, version: str) -> None:
    """Write the commit marker on storage (a trainer.storage.Storage), after every rank's upload."""
    storage.write_text(f"{version}/{COMMITTED}", "ok\n")


def versions_to_delete(committed: list[str], keep_last: int | None, protected: set[str]) -> list[str]:
    """Versions beyond the newest `keep_last`, except protected ones (the best per task)."""
    if keep_last is None:
        return []
    keep = set(sorted(committed)[-keep_last:]) | protected
    return [v for v in sorted(committed) if v not in keep]


def committed_versions(storage, experiment: str = "") -> list[str]:
    """The versions under `experiment` whose marker is on storage, oldest first."""
    return [v for v in storage.list_dirs(experiment)
            if v.startswith("step-") and storage.exists(f"{experiment}/{v}/{COMMITTED}".lstrip("/"))]


def is_committed(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMMITTED).exists()
