"""Finding versions on storage: committed ones only (a version without its marker is unfinished)."""

from __future__ import annotations

from trainer.checkpoint import committed_versions
from trainer.errors import UserError
from trainer.storage import Storage


def pick_version(storage: Storage, name: str, version: str) -> str:
    versions = committed_versions(storage, name)
    if not versions:
        raise UserError(f"no committed version of '{name}' in {storage.describe(name)}")
    if version == "latest":
        return versions[-1]
    if version == "best":
        best = (storage.read_json(f"{name}/registry.json") or {}).get("best", {})
        steps = {b["version"] for b in best.values()} & set(versions)
        if not steps:
            raise UserError(f"'{name}' has no evaluated version to call best; use --version latest")
        return max(steps, key=lambda v: sum(b["value"] for b in best.values() if b["version"] == v))
    if version not in versions:
        raise UserError(f"version '{version}' of '{name}' not found; committed: {', '.join(versions)}")
    return version


def check_resumable(storage: Storage, name: str, num_workers: int) -> str | None:
    """The version a run of `name` would resume from, after checking it fits `num_workers`."""
    versions = committed_versions(storage, name)
    if not versions:
        return None
    state = storage.read_json(f"{name}/{versions[-1]}/trainer_state.json") or {}
    if state.get("world_size", num_workers) != num_workers:
        raise UserError(f"'{name}' resumes from {versions[-1]}, written by {state['world_size']} workers, but "
                        f"scaling.num_workers is {num_workers}: ZeRO partitions and data shards belong to a world "
                        f"size. Use scaling.num_workers={state['world_size']}, or a new name.")
    return versions[-1]
