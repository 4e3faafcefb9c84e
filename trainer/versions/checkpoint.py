"""Versions: one folder per checkpoint on storage, with a fixed layout, committed last.

    step-000060/
      deepspeed/state/     engine.save_checkpoint (model, optimizer, scheduler; every rank's shards)
      weights/model.safetensors  ZeRO-3 only: the whole weights, gathered one parameter at a time
                           (trainer.versions.whole_weights; ZeRO 0-2: in the model-states file)
      trainer_state.json   step, planner + weighting state, per-task counters, last metrics (rank 0)
      rng/rank-<k>.json    rank k's RNG states (python, numpy, torch) and data stream positions
      job.yaml             the resolved job this version was trained with
      deepspeed.json       the job's DeepSpeed file as the run read it (its path may not outlive the run)
      tokenizer/           tokenizer files
      config/              the backbone's (or LM's) transformers config
      tasks.json           task -> type, labels, prompt, encoding (what eval/predict need)
      base.json            LoRA on pretrained weights: the base model and its fingerprint; the
                           version then holds the trained parameters only (trainer.versions.base_model)
      COMMITTED            written last, once every rank's files are on storage

**One record of versions.** A version exists, complete, exactly when its COMMITTED marker is
on storage; resume (the workers), `mtl train`'s pre-flight and `mtl eval` (the driver) and
retention all read that, through `committed_versions`. Ray Train is told metrics only, never
a checkpoint, so its own bookkeeping holds no versions that could disagree with the folders
(with reported checkpoints, pruning a version made the next run of the name refuse to start).

Every rank copies its DeepSpeed state to memory (`trainer.versions.deferred_writes`: the only time training
waits, a memory copy), then a background thread serialises it into a local scratch folder and
uploads that straight into the version's folder while training goes on (file names never
collide: DeepSpeed names shards by rank). Each step's all-reduce carries
whether each rank's upload has finished; at the first step where all have, rank 0 writes the
marker. One version is in flight at a time: the next one, a stop and the end wait for it.
Pruning removes the marker first, so an interrupted delete never leaves a version that looks
complete; a folder without a marker is a write that never finished: never loaded, removed
when the run resumes. Exact resume needs the RNG and data
positions, which DeepSpeed's own checkpoint does not hold.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from trainer.versions.base_model import write_base
from trainer.versions.whole_weights import FILE as WEIGHTS_FILE
from trainer.versions.whole_weights import frozen_names, write_gathered

DS_TAG = "state"
# The model's whole weights in their training dtype, for reading a version without its optimizer
# state: ZeRO 0-2 keep them in DeepSpeed's model-states file, ZeRO-3 versions get this folder.
WHOLE_WEIGHTS = "weights"
MODEL_STATES = f"deepspeed/{DS_TAG}/mp_rank_00_model_states.pt"
COMMITTED = "COMMITTED"
DS_FILE = "deepspeed.json"


def version_name(step: int) -> str:
    return f"step-{step:06d}"


def version_step(name: str) -> int:
    """The step of a version by its name (version_name's inverse)."""
    return int(name.removeprefix("step-"))


def capture_rng() -> dict:
    """The RNG states as JSON values (a version's files are read back as data, never unpickled)."""
    version, keys, gauss = random.getstate()
    kind, keys_np, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(keys), gauss],
            "numpy": [kind, keys_np.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist(),
            # This rank's own GPU only: another rank's device may be visible here and is not ours to touch.
            "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, keys_np, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys_np, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = state["cuda"]
        if saved and isinstance(saved[0], list):  # written by older versions: every visible device's
            saved = saved[torch.cuda.current_device()] if len(saved) > 1 else saved[0]
        torch.cuda.set_rng_state(torch.tensor(saved, dtype=torch.uint8))


def write_pending(pending: list[tuple[object, str]]) -> None:
    for state, path in pending:
        torch.save(state, path)


def write_rank_part(engine, folder: Path, rank: int, streams: dict, trained_only: bool = False) -> None:
    """What every rank writes: its DeepSpeed shards (a collective call) and its RNG + data positions.
    trained_only: leave frozen parameters out (a LoRA base, which base.json names)."""
    if trained_only:
        leave_out_frozen(engine)
    engine.save_checkpoint(str(folder / "deepspeed"), tag=DS_TAG, exclude_frozen_parameters=trained_only)
    if engine.zero_optimization_partition_weights():  # ZeRO-3: gathered (a collective), written by rank 0
        write_gathered(engine.module, folder / WHOLE_WEIGHTS / WEIGHTS_FILE, rank, trained_only=trained_only)
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    part = {"rng": capture_rng(), "streams": {t: s.state_dict() for t, s in streams.items()}}
    (folder / "rng" / f"rank-{rank}.json").write_text(json.dumps(part))


def leave_out_frozen(engine) -> None:
    """DeepSpeed's exclude_frozen_parameters drops the names named_parameters gives, which lists a
    tied weight once: the alias of a frozen one (a LoRA model's lm_head, tied to its embeddings:
    57 MiB of the demo's 80) stayed in the version. The engine's module_state_dict here drops
    every frozen name."""
    if getattr(engine, "_mtl_leaves_out_frozen", False):
        return
    frozen, state_dict = frozen_names(engine.module), engine.module_state_dict

    def without_frozen(*args, **kwargs):
        found = state_dict(*args, **kwargs)
        if kwargs.get("exclude_frozen_parameters"):
            for name in frozen & set(found):
                del found[name]
        return found

    engine.module_state_dict = without_frozen
    engine._mtl_leaves_out_frozen = True


def write_global_part(folder: Path, *, trainer_state: dict, job_yaml: str, tokenizer, tasks: dict,
                      model_config, ds_config: dict | None = None, base: dict | None = None) -> None:
    """What rank 0 adds: the run's state and what is needed to use the version on its own."""
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    if base is not None:
        write_base(folder, base)
    model_config.save_pretrained(str(folder / "config"))
    (folder / "job.yaml").write_text(job_yaml)
    if ds_config is not None:  # the job's DeepSpeed file as the run read it: its path may be gone later
        (folder / DS_FILE).write_text(json.dumps(ds_config, indent=1, sort_keys=True))
    (folder / "tasks.json").write_text(json.dumps(tasks, indent=1))
    tokenizer.save_pretrained(str(folder / "tokenizer"))


def read_rank_part(folder: Path, rank: int) -> dict:
    """Rank `rank`'s RNG states and data-stream positions: {"rng": ..., "streams": {task: state}}."""
    return json.loads((folder / "rng" / f"rank-{rank}.json").read_text())


def load_rank_part(engine, folder: Path, rank: int, streams: dict, trained_only: bool = False) -> None:
    """trained_only: the version holds the trained parameters only (a LoRA version): the rest is the
    base the model was built from."""
    path, _ = engine.load_checkpoint(str(folder / "deepspeed"), tag=DS_TAG, load_module_strict=not trained_only)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {folder / 'deepspeed'}")
    part = read_rank_part(folder, rank)
    for task, state in part["streams"].items():
        if task in streams:
            streams[task].load_state_dict(state)
    restore_rng(part["rng"])


def mark_committed(storage, version: str) -> None:
    """Write the commit marker on storage (a trainer.versions.storage.Storage), after every rank's upload."""
    storage.write_text(f"{version}/{COMMITTED}", "ok\n")


def upload_part(storage, folder: Path, version: str) -> None:
    """This rank's files into the version's folder on storage (merged with the other ranks')."""
    storage.upload(str(folder), version)


class Upload:
    """This rank's part of a version going to storage on a background thread: first the files
    trainer.versions.deferred_writes holds in memory are written into the scratch folder, then the folder is
    uploaded and removed (also when the upload failed for good)."""

    def __init__(self, storage, folder: Path, version: str, pending: list | None = None):
        self.version = version
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self.files: dict[str, int] = {}  # what this rank put in the version: path -> bytes
        self._thread = threading.Thread(target=self._run, args=(storage, folder, pending or []), name=f"mtl-upload-{version}",
                                         daemon=True)
        self._thread.start()

    def _run(self, storage, folder: Path, pending: list) -> None:
        started = time.perf_counter()
        try:
            write_pending(pending)
            self.files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
            upload_part(storage, folder, self.version)
        except BaseException as exc:  # raised on the training thread by finished()/wait()
            self.error = exc
        finally:
            pending.clear()  # the memory copies may be reused (trainer.versions.deferred_writes)
            shutil.rmtree(folder, ignore_errors=True)
            self.seconds = time.perf_counter() - started

    def finished(self) -> bool:
        """Whether this rank's files are all on storage; raises what the upload failed with."""
        if self._thread.is_alive():
            return False
        if self.error is not None:
            raise self.error
        return True

    def wait(self) -> None:
        self._thread.join()
        self.finished()


_RANK_SHARD = re.compile(r"zero_pp_rank_(\d+)_")


def rank_needs(relative: str, rank: int) -> bool:
    """Whether rank `rank` reads this file of a version to resume: not the other ranks' shards or RNG,
    nor the whole weights (DeepSpeed's own files restore the model)."""
    if relative.startswith("weights/"):
        return False
    name = relative.rsplit("/", 1)[-1]
    shard = _RANK_SHARD.search(name)
    if shard:
        return int(shard.group(1)) == rank
    if relative.startswith("rng/"):
        return name == f"rank-{rank}.json"
    return True


def model_needs(relative: str) -> bool:
    """Whether using a version's model (eval, predict, export) reads this file: never optimizer
    state, another rank's RNG or the universal checkpoint."""
    return not (relative.endswith("optim_states.pt") or relative.startswith(("rng/", "deepspeed/state_universal/")))


def settings_needs(relative: str) -> bool:
    """Whether reading a version's settings alone (job, tasks.json, tokenizer, config) reads this
    file: no weights, DeepSpeed state or RNG (the untrained model takes the job's own weights)."""
    return not relative.startswith(("deepspeed/", "weights/", "rng/"))


def download_part(storage, version: str, local: Path, rank: int) -> Path:
    """What rank `rank` needs of a version, in `local` (the version's layout); returns `local`."""
    storage.download_files(version, str(local), keep=lambda relative: rank_needs(relative, rank))
    return local


def versions_to_delete(committed: list[str], keep_last: int | None, protected: set[str]) -> list[str]:
    """Versions beyond the newest `keep_last`, except protected ones (the best per task)."""
    if keep_last is None:
        return []
    keep = set(sorted(committed)[-keep_last:]) | protected
    return [v for v in sorted(committed) if v not in keep]


def delete_version(storage, version: str, experiment: str = "") -> bool:
    """Delete a version unless `mtl tag` (another process) names it; whether it was deleted.

    Marker first: a delete cut short leaves an uncommitted folder, never a version that looks
    complete. Tags are read right before the marker goes and again right after: a tag written
    before the second read keeps the version (the marker is put back, and `mtl tag` waits for it),
    one written after finds the marker gone and is refused (launcher.versions.tag_version)."""
    folder = f"{experiment}/{version}" if experiment else version
    if version in read_tags(storage, experiment).values():
        return False
    storage.delete_file(f"{folder}/{COMMITTED}")
    if version in read_tags(storage, experiment).values():
        mark_committed(storage, folder)
        return False
    storage.delete_dir(folder)
    return True


def version_folders(storage, experiment: str = "") -> dict[str, bool]:
    """Every version folder under `experiment`, oldest first -> whether its marker is on storage."""
    prefix = f"{experiment}/" if experiment else ""
    return {v: storage.exists(f"{prefix}{v}/{COMMITTED}") for v in storage.list_dirs(experiment)
            if v.startswith("step-")}


TAGS = "tags.json"  # tag -> version, beside the versions; retention never deletes a tagged version


def read_tags(storage, experiment: str = "") -> dict[str, str]:
    return storage.read_json(f"{experiment}/{TAGS}".lstrip("/")) or {}


def committed_versions(storage, experiment: str = "") -> list[str]:
    """The versions under `experiment` whose marker is on storage, oldest first (the one record)."""
    return [v for v, committed in version_folders(storage, experiment).items() if committed]
