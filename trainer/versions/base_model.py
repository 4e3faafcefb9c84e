"""LoRA versions hold what was trained, and name the base model they were trained on.

A LoRA run trains adapters and heads on a frozen base: writing the base into every version
made the demo's versions 650 MiB of weights that never change. A LoRA version on a pretrained
base holds only the trained parameters (DeepSpeed's `exclude_frozen_parameters`) and `base.json`:
where the base came from and a fingerprint of its weight files. Everything that reads the
version (resume, eval, predict, serve, export, init_from) builds the base from there and loads
the version over it, after checking the fingerprint: adapters over other weights would load
without complaint and mean nothing.

A random initialisation (`model.init: random`) has no file to come back from: its versions
keep the whole model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trainer.errors import UserError

BASE_FILE = "base.json"
_SAMPLES, _SAMPLE_BYTES = 16, 64 * 1024  # per weight file: enough to tell one checkpoint from another


def adapters_only(spec) -> bool:
    """Whether the run's versions hold the trained parameters only (LoRA on pretrained weights)."""
    return spec.model.lora is not None and spec.model.init == "pretrained"


def weight_files(name_or_path: str) -> list[Path]:
    """The files a model's weights load from (a local folder or the hub's cache for a hub id)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        from transformers.utils import cached_file

        found = cached_file(name_or_path, "config.json", _raise_exceptions_for_missing_entries=False)
        if found is None:
            return []
        folder = Path(found).parent
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")
                  and not p.name.startswith("training_args"))


def fingerprint(name_or_path: str) -> str:
    """A fingerprint of a model's weight files: each one's name, size and 16 sampled blocks.

    Sampled rather than read whole (a 70B checkpoint is 140 GB): another checkpoint differs in its
    header and its blocks, which is what this must tell apart."""
    digest = hashlib.sha256()
    files = weight_files(name_or_path)
    if not files:
        raise UserError(f"model.name_or_path: '{name_or_path}' has no weight files to fingerprint")
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            for i in range(_SAMPLES):
                fh.seek(max(0, (size - _SAMPLE_BYTES) * i // max(1, _SAMPLES - 1)))
                digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def base_record(name_or_path: str) -> dict:
    """What base.json says: a local folder by its absolute path (a version outlives the working
    directory it was trained from), a hub id as it is."""
    where = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
    return {"name_or_path": where, "fingerprint": fingerprint(name_or_path)}


def write_base(folder: Path, record: dict) -> None:
    (folder / BASE_FILE).write_text(json.dumps(record, indent=1))


def read_base(folder: Path) -> dict | None:
    path = Path(folder) / BASE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def require_base(record: dict, where: str, name_or_path: str | None = None) -> str:
    """The base model to build (`name_or_path`, or the one the version names), checked against the
    version's fingerprint; returns its path or hub id."""
    path = name_or_path or record["name_or_path"]
    try:
        found = fingerprint(path)
    except (UserError, OSError) as exc:
        raise UserError(f"{where} holds LoRA adapters and heads only: its base model '{path}' cannot be read "
                        f"here ({exc}); put the base model there, or resume/evaluate where it is") from None
    if found != record["fingerprint"]:
        raise UserError(f"{where} was trained on other weights than '{path}' has now (fingerprint "
                        f"{record['fingerprint']} in its {BASE_FILE}, {found} here): its adapters would load "
                        f"over a different base; use the base model it was trained on")
    return path
