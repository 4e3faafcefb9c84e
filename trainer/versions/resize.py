"""Resuming a version on another number of workers (a lost node, a bigger cluster).

ZeRO-1/2/3 shards belong to the world size that wrote them. Rank 0 converts the version once
into DeepSpeed's universal checkpoint (`ds_to_universal`: one folder per parameter with its
fp32 weights and optimizer moments, loadable by any world size) and adds it to the version on
storage as `deepspeed/state_universal/`, its marker `COMPLETE` written last: a second resize
reuses it, and a conversion cut short (a kill mid-upload) is removed and done again rather than
loaded half. Each node downloads the files it needs once, into a folder its ranks share; every
rank then loads it with `load_universal`. ZeRO-0 keeps whole states and loads as it is.

The data streams continue from global positions (trainer.data.batching.TaskStream.continue_from):
every rank reads every old rank's stream state. Ranks that existed before take their RNG
state back; new ranks keep their fresh seeds. The global batch is `num_workers ×
micro_batches_per_step` micro-batches: the driver says how it changes (launcher.run).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from trainer.collectives import barrier
from trainer.reporting import say
from trainer.scratch import ROOT, scratch
from trainer.versions import checkpoint as ckpt

UNIVERSAL_TAG = "state_universal"
COMPLETE = "COMPLETE"


def convert_to_universal(ds_folder: Path, stage: int) -> None:
    """`ds_folder/state` (any world size) -> `ds_folder/state_universal`."""
    command = [sys.executable, "-m", "trainer.versions.safe_load", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(ds_folder / ckpt.DS_TAG), "--output_folder", str(ds_folder / UNIVERSAL_TAG),
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if stage in (1, 2):  # a plain nn.Module never records the partition info the converter expects
        command.append("--inject_missing_state")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"DeepSpeed's ds_to_universal failed on {ds_folder}:\n{(done.stdout + done.stderr)[-2000:]}")


def universal_on_storage(storage, version: str, stage: int) -> None:
    """Rank 0: make sure the version has its universal form on storage (converted once)."""
    universal = f"{version}/deepspeed/{UNIVERSAL_TAG}"
    if storage.exists(f"{universal}/{COMPLETE}"):
        return
    storage.delete_dir(universal)  # a conversion whose upload was cut short: never loaded, done again
    with scratch("universal") as local:
        storage.download(f"{version}/deepspeed/{ckpt.DS_TAG}", str(local / ckpt.DS_TAG))
        convert_to_universal(local, stage)
        storage.upload(str(local / UNIVERSAL_TAG), universal)
    storage.write_text(f"{universal}/{COMPLETE}", "ok\n")


@contextlib.contextmanager
def node_copy(storage, version: str, keep, local_rank: int):
    """The files of `version` that `keep` selects, downloaded once per node into a folder its ranks
    share (the first rank there downloads while the others wait), removed by local rank 0 after
    every rank has loaded them."""
    from filelock import FileLock

    key = hashlib.sha256(storage.describe(version).encode()).hexdigest()[:16]
    folder = ROOT / f"node-copy-{key}"
    ROOT.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / COMPLETE).exists():
            shutil.rmtree(folder, ignore_errors=True)
            storage.download_files(version, str(folder), keep=keep)
            (folder / COMPLETE).write_text("ok\n")
    try:
        yield folder
    finally:
        barrier()  # every rank of every node has loaded its part
        if local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            Path(str(folder) + ".lock").unlink(missing_ok=True)


def load_resized(run, version: str, old_world: int) -> None:
    """Model, optimizer, schedule and data positions of `version` (written by `old_world` ranks)."""
    stage = run.engine.zero_optimization_stage()
    if stage > 0 and run.rank == 0:
        why = (f"was written by {old_world} workers" if old_world != run.world
               else "has its optimizer state in other ZeRO-3 sub-groups")
        say(f"[mtl] {version} {why}; converting it to DeepSpeed's universal checkpoint for {run.world}")
        universal_on_storage(run.storage, version, stage)
    barrier()  # the universal form is on storage before any rank reads it
    tag = UNIVERSAL_TAG if stage > 0 else ckpt.DS_TAG

    def needed(relative: str) -> bool:
        return relative.startswith((f"deepspeed/{tag}/", "rng/"))

    with node_copy(run.storage, version, needed, run.runtime.local_rank) as local:
        if stage > 0:
            run.engine._config.load_universal_checkpoint = True
        # A LoRA version holds the trained parameters only (trainer.versions.base_model): the base is the model's own.
        path, _ = run.engine.load_checkpoint(str(local / "deepspeed"), tag=tag, load_module_strict=run.base is None)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {local / 'deepspeed' / tag}")
        if stage == 3:
            _restore_zero3_param_groups(run.engine, local / "deepspeed" / tag)
        parts = [ckpt.read_rank_part(local, k) for k in range(old_world)]
    for task, stream in run.streams.items():
        stream.continue_from([part["streams"][task] for part in parts], old_world)
    if run.rank < old_world:
        ckpt.restore_rng(parts[run.rank]["rng"])


def _restore_zero3_param_groups(engine, universal: Path) -> None:
    """DeepSpeed's ZeRO-3 universal load (0.19) gives every param group the first group's
    hyper-parameters (the no-decay group gets weight decay) and one shared `step` tensor,
    which AdamW then advances once per group; put back what the version saved."""
    saved = torch.load(universal / "zero" / "optimizer_state.pt", weights_only=True)["optimizer_state_dict"]
    optimizer = engine.optimizer.optimizer
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
