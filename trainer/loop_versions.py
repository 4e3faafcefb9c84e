"""What the loop does with versions: each rank copies its part and uploads it on a thread, rank 0
commits, prunes and ranks them, and what each version records of the run (trainer.versions.checkpoint
holds the layout)."""

from __future__ import annotations

import time

from trainer.collectives import all_gather_objects
from trainer.control import UncertaintyWeighting
from trainer.data import task_context, task_metrics
from trainer.loop_state import Run
from trainer.model import DEEPSPEED_SUB_GROUP_SIZE, model_config
from trainer.reporting import say
from trainer.scratch import scratch_dir
from trainer.versions import checkpoint as ckpt
from trainer.versions import require_parts_on_storage, version_registry


def save_version(run: Run, metrics: dict) -> None:
    """Every rank copies its part to memory, then writes it to local scratch and uploads it on a
    background thread.

    Training waits only for the copy and the small files (and for the previous version, if it is still
    uploading: one in flight at a time). The version is committed at the first step where every
    rank's upload has finished (fit), or at the end (finish_upload).
    """
    started = time.perf_counter()
    finish_upload(run)
    phase, _ = run.memory.phase, run.memory.enter("version")
    name = ckpt.version_name(run.step)
    folder = scratch_dir("version")
    ckpt.write_rank_part(run.engine, folder, run.rank, run.streams, trained_only=run.base is not None)
    scores = version_registry.scores_of(run.last_eval, run.step)
    if scores:  # evaluated at this very step: the version can be ranked (trainer.versions.version_registry)
        run.version_scores[name] = scores
    state = trainer_state(run)  # on every rank: under ZeRO-3, reading learned weights is a collective
    if run.rank == 0:
        ckpt.write_global_part(folder, trainer_state=state, job_yaml=job_yaml(run.spec),
                               tokenizer=run.tokenizer, tasks=tasks_manifest(run),
                               model_config=model_config(run.engine.module), ds_config=run.ds_base, base=run.base)
    run.upload = ckpt.Upload(run.storage, folder, name, run.engine.checkpoint_engine.take())
    run.blocked_s = time.perf_counter() - started
    run.memory.enter(phase or "steps")
    run.runtime.report(metrics)


def finish_upload(run: Run) -> None:
    """Wait for this rank's upload of the version in flight, then commit it once all ranks have."""
    if run.upload is None:
        return
    started = time.perf_counter()
    run.upload.wait()
    files = all_gather_objects(run.upload.files)  # also the barrier: every rank's upload has finished
    if run.rank == 0:  # the marker says every rank's files are there: see that they are
        require_parts_on_storage(run.storage, run.upload.version, files, run.spec.storage.path)
    run.blocked_s += time.perf_counter() - started
    commit_version(run)


def commit_version(run: Run) -> None:
    """Rank 0 marks the version in flight complete, prunes, and updates the registry."""
    upload, run.upload = run.upload, None
    if run.rank != 0:
        return
    ckpt.mark_committed(run.storage, upload.version)
    if run.background is not None:
        run.background.submit(upload.version)
    kept = prune_versions(run)
    run.storage.write_json("registry.json", version_registry.registry(upload.version, kept, run.version_scores))
    written = run.blocked_s + (upload.seconds or 0.0)
    run.trackers.scalars({"version/blocked_s": run.blocked_s, "version/write_s": written,
                          "version/stall": run.blocked_s / written if written else 0.0}, run.step)
    run.trackers.sync()
    say(f"[mtl] saved version {upload.version} (training waited {run.blocked_s:.2f}s of {written:.2f}s)")


def prune_versions(run: Run) -> list[str]:
    """train.keep_last newest versions stay, tagged ones, and with train.keep_best the best of each task.

    Returns the committed versions that remain.
    """
    committed = ckpt.committed_versions(run.storage)
    protected = version_registry.protected(run.version_scores, committed) if run.spec.train.keep_best else set()
    protected |= set(ckpt.read_tags(run.storage).values())  # `mtl tag`: kept until untagged
    protected |= set(run.background.pending) if run.background is not None else set()  # still being validated
    doomed = ckpt.versions_to_delete(committed, run.spec.train.keep_last, protected)
    removed = []
    for name in doomed:
        if not ckpt.delete_version(run.storage, name):  # tagged meanwhile by `mtl tag`: kept
            continue
        removed.append(name)
        say(f"[mtl] removed version {name} (train.keep_last={run.spec.train.keep_last})")
    return [v for v in committed if v not in removed]


def resumed_layout(storage, versions: list[str], stage: int) -> dict:
    """The optimizer layout of the version this run will resume (the latest of `versions`, as in
    restore_latest), for the "auto" sizes to keep: a run resumes exactly only into the
    sub-groups its state was saved in."""
    if not versions:
        return {}
    return saved_layout(storage.read_json(f"{versions[-1]}/trainer_state.json") or {}, stage)


def saved_layout(state: dict, stage: int) -> dict:
    """A version's optimizer layout; one written before it was recorded used DeepSpeed's default."""
    if "optimizer_layout" in state:
        return state["optimizer_layout"]
    return {"sub_group_size": DEEPSPEED_SUB_GROUP_SIZE} if stage == 3 else {}


def optimizer_layout(engine) -> dict:
    """What a version's optimizer shards are cut by besides the world size: ZeRO-3's sub-groups."""
    return {"sub_group_size": int(engine.zero_sub_group_size())} if engine.zero_optimization_stage() == 3 else {}


def trainer_state(run: Run) -> dict:
    weighting = {} if isinstance(run.weighting, UncertaintyWeighting) else run.weighting.state_dict()
    return {"step": run.step, "planner": run.planner.state_dict(), "weighting": weighting,
            "weights": run.weighting.weights(), "rates": run.planner.expected_rates(),
            "seen": run.seen, "last_eval": run.last_eval, "world_size": run.world,
            "optimizer_layout": optimizer_layout(run.engine), "version_scores": run.version_scores, "train_s": run.train_s,
            "early_stopping": run.early.state_dict() if run.early is not None else None,
            "init_from": run.init_from,
            "trackers": run.trackers.ids() if run.trackers is not None else run.tracker_ids,
            "mixture_adapt": run.adapter.state_dict() if run.adapter is not None else None,
            "mixture_bandit": run.mixer.state_dict() if run.mixer is not None else None}


def tasks_manifest(run: Run) -> dict:
    spec = run.spec
    return {"kind": spec.model.kind, "encoding": run.encoding, "base_model": spec.model.name_or_path,
            "tasks": {t: {"type": spec.tasks[t].type, "labels": list(d.labels),
                          "prompt": task_context(spec, t).prompt,
                          "max_length": spec.tasks[t].max_length or spec.model.max_length,
                          "options": spec.tasks[t].options,
                          "metrics": task_metrics(spec, t)}
                      for t, d in run.tasks.items()}}


def job_yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
