"""Finding versions on storage: committed ones only (a version without its marker is unfinished)."""

from __future__ import annotations

import re
import time

from trainer.errors import UserError
from trainer.versions import (
    COMMITTED,
    TAGS,
    UNTRAINED,
    Storage,
    committed_versions,
    existing_versions,
    pick_version,
    read_tags,
    version_step,
)

TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
RESERVED = ("latest", "best", UNTRAINED)


def resume_point(storage: Storage, name: str, spec_train, num_workers: int | None) -> tuple[str | None, str | None]:
    """(the version a run of `name` would resume from, a note when it changes the number of workers;
    none for an elastic run, num_workers None, whose size is known only when it starts)."""
    versions = committed_versions(storage, name)
    if not versions:
        return None, None
    if num_workers is None:
        return versions[-1], None
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


TAG_WAIT_S = 3.0


def tag_version(storage: Storage, name: str, version: str, tag: str) -> str:
    """Names a committed version (latest, best, best:TASK, step-N or another tag); returns the version."""
    if not TAG_NAME.match(tag) or tag in RESERVED or tag.startswith("step-"):
        raise UserError(f"tag '{tag}': use a letter, then letters, digits, '.', '_' or '-' (not latest, best, "
                        "untrained or step-...)")
    chosen = pick_version(storage, name, version)
    tags = read_tags(storage, name)
    tags[tag] = chosen
    storage.write_json(f"{name}/{TAGS}", dict(sorted(tags.items())))
    if not still_committed(storage, name, chosen):  # a running job pruned it as the tag was written
        tags = read_tags(storage, name)
        tags.pop(tag, None)
        storage.write_json(f"{name}/{TAGS}", tags)
        raise UserError(f"{chosen} was removed by the run's retention (train.keep_last) while it was being tagged; "
                        f"tag a newer version")
    return chosen


def still_committed(storage: Storage, name: str, version: str, wait_s: float = TAG_WAIT_S) -> bool:
    """Whether `version` keeps its marker. A run that is deleting it puts the marker back within
    moments if it sees the new tag (trainer.versions.checkpoint.delete_version): give it that time."""
    deadline = time.monotonic() + wait_s
    while True:
        if storage.exists(f"{name}/{version}/{COMMITTED}"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def untag(storage: Storage, name: str, tag: str) -> str:
    tags = read_tags(storage, name)
    if tag not in tags:
        raise UserError(f"'{name}' has no tag '{tag}' (tags: {', '.join(sorted(tags)) or 'none'})")
    version = tags.pop(tag)
    storage.write_json(f"{name}/{TAGS}", tags)
    return version


def version_table(storage: Storage, name: str) -> list[dict]:
    """One row per committed version: step, its own validation scores, size, tags, and what the registry calls it."""
    versions = existing_versions(storage, name)
    reg = storage.read_json(f"{name}/registry.json") or {}
    tags = read_tags(storage, name)
    rows = []
    for version in versions:
        marks = [f"best:{t}" for t, b in sorted(reg.get("best", {}).items()) if b["version"] == version]
        if (reg.get("overall") or {}).get("version") == version:
            marks.insert(0, "best")
        if version == versions[-1]:
            marks.insert(0, "latest")
        rows.append({"version": version, "step": version_step(version),
                     "scores": {t: s["value"] for t, s in (reg.get("scores") or {}).get(version, {}).items()},
                     "bytes": storage.size(f"{name}/{version}"),
                     "tags": sorted(t for t, v in tags.items() if v == version), "marks": marks})
    return rows


def format_versions(rows: list[dict]) -> str:
    tasks = sorted({t for r in rows for t in r["scores"]})
    head = f"{'version':<13}{'step':>6}" + "".join(f"{t[:12]:>13}" for t in tasks) + f"{'size':>10}  tags"
    lines = [head]
    for r in rows:
        scores = "".join(f"{r['scores'][t]:>13.4f}" if t in r["scores"] else f"{'-':>13}" for t in tasks)
        names = ", ".join([*r["marks"], *r["tags"]])
        lines.append(f"{r['version']:<13}{r['step']:>6}{scores}{r['bytes'] / 1e6:>8.1f}MB  {names}")
    return "\n".join(lines)
