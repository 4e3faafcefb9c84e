"""registry.json: the latest committed version, and the best one per task and overall.

A version is ranked only by an evaluation of its own weights: the validation run at the step
it was saved (`version_scores`); a version saved between evaluations has no score and is never
called best. Per task, the primary metric decides (higher is better). Overall, the mean of the
tasks' primary metrics (each in [0, 1]) among versions scored on every task. Only committed
versions appear, so nothing in the registry names a version that does not exist.
"""

from __future__ import annotations

from trainer.errors import UserError
from trainer.versions.checkpoint import committed_versions, read_tags

# Not a version: the model a run started from, which `mtl eval` scores beside versions
# (trainer.inference.version_io.load_untrained); no tag may take the name.
UNTRAINED = "untrained"


def scores_of(last_eval: dict, step: int) -> dict | None:
    """{task: {"metric", "value"}} from the evaluation at `step`, or None if there was none."""
    if last_eval.get("step") != step or last_eval.get("split") != "validation":
        return None
    primary = last_eval.get("primary", {})
    return {task: {"metric": primary[task], "value": values[primary[task]]}
            for task, values in last_eval.get("tasks", {}).items() if primary.get(task) in values}


def best_versions(version_scores: dict[str, dict], committed: list[str]) -> tuple[dict, dict | None]:
    """(task -> {version, metric, value}, {version, score} overall or None) among committed versions."""
    scored = {v: s for v, s in version_scores.items() if v in set(committed) and s}
    per_task: dict[str, dict] = {}
    for version in sorted(scored):  # the earlier version wins a tie
        for task, score in scored[version].items():
            if task not in per_task or score["value"] > per_task[task]["value"]:
                per_task[task] = {"version": version, **score}
    tasks = set(per_task)
    complete = {v: sum(s[t]["value"] for t in tasks) / len(tasks) for v, s in scored.items() if set(s) == tasks}
    overall = None
    if complete:
        version = max(sorted(complete), key=lambda v: complete[v])
        overall = {"version": version, "score": complete[version]}
    return per_task, overall


def registry(latest: str, committed: list[str], version_scores: dict[str, dict]) -> dict:
    per_task, overall = best_versions(version_scores, committed)
    return {"latest": latest, "best": per_task, "overall": overall,
            "scores": {v: version_scores[v] for v in committed if version_scores.get(v)}}


def protected(version_scores: dict[str, dict], committed: list[str]) -> set[str]:
    """The versions retention keeps with train.keep_best: each task's best and the best overall."""
    per_task, overall = best_versions(version_scores, committed)
    return {b["version"] for b in per_task.values()} | ({overall["version"]} if overall else set())


def existing_versions(storage, name: str) -> list[str]:
    """The committed versions of experiment `name`, oldest first; none is an error a user reads."""
    versions = committed_versions(storage, name)
    if not versions:
        raise UserError(f"no committed version of '{name}' in {storage.describe(name)}")
    return versions


def pick_version(storage, name: str, version: str) -> str:
    """A committed version of experiment `name` by what a user calls it: latest, best, best:TASK, a tag or step-N."""
    versions = existing_versions(storage, name)
    if version == "latest":
        return versions[-1]
    if version == "best" or version.startswith("best:"):
        return _best(storage, name, version, versions)
    tags = read_tags(storage, name)
    if version in tags:
        if tags[version] not in versions:
            raise UserError(f"tag '{version}' names {tags[version]}, which is not a committed version of '{name}'")
        return tags[version]
    if version not in versions:
        raise UserError(f"version '{version}' of '{name}' not found; committed: {', '.join(versions)}")
    return version


def _best(storage, name: str, version: str, versions: list[str]) -> str:
    """`best` (overall) or `best:<task>`, through registry.json (trainer.versions.version_registry)."""
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
