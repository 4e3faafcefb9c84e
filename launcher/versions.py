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


def resume_point(storage: Storage, name: str, spec_train, num_workers: int) -> tuple[str | None, str | None]:
    """(the version a run of `name` would resume from, a note when it changes the number of workers)."""
    versions = committed_versions(storage, name)
    if not versions:
        return None, None
    state = storage.read_json(f"{name}/{versions[-1]}/trainer_state.json") or {}
    old_world = state.get("world_size", num_workers)
    if old_world == num_workers:
        return versions[-1], None
    per_step = spec_train.micro_batches_per_step
    keep = per_step * old_world / num_workers
    keeps = keep == int(keep) and keep != per_step
    hint = f"; train.micro_batches_per_step={int(keep)} with --allow-changes keeps it" if keeps else ""
    return versions[-1], (f"{versions[-1]} was written by {old_world} workers and resumes on {num_workers}: the "
                          f"model and optimizer go through DeepSpeed's universal checkpoint, each task's current "
                          f"epoch goes on with the examples no worker has drawn yet; a step now takes "
                          f"{num_workers}×{per_step} micro-batches instead of {old_world}×{per_step}{hint}")
