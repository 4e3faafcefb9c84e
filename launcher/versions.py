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
    if version == "best" or version.startswith("best:"):
        return _best(storage, name, version, versions)
    if version not in versions:
        raise UserError(f"version '{version}' of '{name}' not found; committed: {', '.join(versions)}")
    return version


def _best(storage: Storage, name: str, version: str, versions: list[str]) -> str:
    """`best` (overall) or `best:<task>`, through registry.json (trainer.registry)."""
    reg = storage.read_json(f"{name}/registry.json") or {}
    if version == "best":
        chosen = (reg.get("overall") or {}).get("version")
        if chosen is None:
            raise UserError(f"'{name}' has no version evaluated on every task at its own step (train.eval_every "
                            f"and train.checkpoint_every in step); use --version latest or best:<task>")
    else:
        task = version.split(":", 1)[1]
        best = reg.get("best", {})
        if task not in best:
            known = ", ".join(sorted(best)) or "none yet"
            raise UserError(f"no best version for task '{task}' in '{name}' (tasks with one: {known})")
        chosen = best[task]["version"]
    if chosen not in versions:  # the registry only names committed versions; a deleted folder is not one
        raise UserError(f"registry.json names {chosen}, which is no longer a committed version of '{name}'")
    return chosen


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
