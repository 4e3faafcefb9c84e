"""Durable runs, piece by piece: storage retries, TensorBoard streaming, background uploads,
scratch cleanup and stop requests (the end-to-end drills are in test_durable_e2e.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from trainer.control import stopping
from trainer.versions.checkpoint import Upload
from trainer.scratch import owner_prefix, remove_orphans, scratch_dir
from trainer.versions.storage import Storage, StorageError


class FlakyFs:
    """A local filesystem whose operations fail `failures` times with an IO error first."""

    def __init__(self, failures: int):
        self.inner, self.failures, self.calls = pafs.LocalFileSystem(), failures, 0

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.failures:
                self.failures -= 1
                raise OSError("When writing: connection reset by peer")
            return method(*args, **kwargs)
        return call


def test_storage_retries_transient_errors_then_succeeds(tmp_path):
    fs = FlakyFs(failures=2)
    storage = Storage(fs, str(tmp_path), str(tmp_path), retry_delays_s=(0.0, 0.0, 0.0))
    storage.write_text("exp/step-000001/COMMITTED", "ok\n")
    assert (tmp_path / "exp" / "step-000001" / "COMMITTED").read_text() == "ok\n"
    assert storage.read_text("exp/step-000001/COMMITTED") == "ok\n"


def test_storage_gives_up_with_the_operation_and_path_named(tmp_path):
    storage = Storage(FlakyFs(failures=100), str(tmp_path), "s3://bucket/runs", retry_delays_s=(0.0, 0.0))
    with pytest.raises(StorageError, match=r"could not write s3://bucket/runs/exp/registry.json after 3 attempts: "
                                           r"When writing: connection reset by peer"):
        storage.write_json("exp/registry.json", {})


class HalfWrites:
    """A local file system whose writes stop half-way with a full disk."""

    type_name = "local"

    def __init__(self):
        self.inner = pafs.LocalFileSystem()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open_output_stream(self, path):
        inner = self.inner.open_output_stream(path)

        class Broken:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                inner.close()

            def write(self, data):
                inner.write(data[: len(data) // 2])
                raise OSError("No space left on device")
        return Broken()


def test_a_small_file_is_replaced_whole_or_not_at_all(tmp_path):
    """tags.json, registry.json, markers: a write cut short leaves the old file, never half a new one."""
    Storage(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path)).write_json("exp/tags.json", {"prod": "step-1"})
    broken = Storage(HalfWrites(), str(tmp_path), str(tmp_path), retry_delays_s=(0.0,))
    with pytest.raises(StorageError, match="could not write .*tags.json after 2 attempts: No space left on device"):
        broken.write_json("exp/tags.json", {"prod": "step-2", "best": "step-2"})
    assert json.loads((tmp_path / "exp" / "tags.json").read_text()) == {"prod": "step-1"}
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["tags.json"]  # no temporary file left


def test_a_missing_file_is_an_answer_not_a_failure(tmp_path):
    fs = FlakyFs(failures=0)
    storage = Storage(fs, str(tmp_path), str(tmp_path), retry_delays_s=(0.0, 0.0))
    assert storage.read_text("nothing/here.json") is None
    storage.delete_dir("nothing")  # already gone is fine
    assert fs.calls <= 3


@pytest.mark.timeout(120)
def test_an_unreachable_s3_endpoint_is_a_clear_error():
    from trainer.spec import StorageSpec
    from launcher.local_cluster import free_port
    from trainer.versions.storage import open_storage

    spec = StorageSpec(path="s3://bucket/runs", endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1")
    storage = open_storage(spec)
    storage.retry_delays_s = (0.0,)
    with pytest.raises(StorageError, match=r"could not write s3://bucket/runs/exp/job.yaml after 2 attempts"):
        storage.write_text("exp/job.yaml", "name: exp\n")


def test_tensorboard_events_reach_storage_while_the_run_goes(tmp_path):
    from trainer.reporting import Board

    storage = Storage(pafs.LocalFileSystem(), str(tmp_path / "runs"), str(tmp_path / "runs"))
    board = Board(storage, "exp/tensorboard", sync_every_s=0.2)
    board.scalars({"loss/a": 1.5}, 1)
    deadline = time.monotonic() + 20
    while not list((tmp_path / "runs" / "exp" / "tensorboard").glob("events.out.tfevents.*")):
        assert time.monotonic() < deadline, "no events on storage before the run ended"
        time.sleep(0.1)
    local = board.local
    board.scalars({"loss/a": 1.25}, 2)
    board.close()
    assert not local.exists()  # the local staging is removed at the end
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((tmp_path / "runs" / "exp" / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss/a")] == [1.5, 1.25]


def test_an_upload_runs_in_the_background_and_removes_its_scratch(tmp_path):
    storage = Storage(pafs.LocalFileSystem(), str(tmp_path / "runs"), str(tmp_path / "runs"))
    folder = scratch_dir("version")
    (folder / "deepspeed").mkdir()
    (folder / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    upload = Upload(storage, folder, "step-000003")
    upload.wait()
    assert upload.finished() and upload.seconds is not None
    assert (tmp_path / "runs" / "step-000003" / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert not folder.exists()


def test_a_version_copied_to_memory_is_written_later_as_it_was(tmp_path):
    """The loop changes parameters and optimizer state in place right after a version; the
    files written later on the upload thread must hold the values of the version's step."""
    from collections import OrderedDict

    import torch

    from trainer.versions.deferred_writes import DeferredWrites

    weight = torch.ones(4)
    module = OrderedDict(weight=weight, tied=weight)
    module._metadata = {"": {"version": 1}}
    state = {"module": module, "optimizer": {"state": {0: {"exp_avg": torch.zeros(4), "step": 3}}},
             "shape": torch.Size([4]), "lr": [0.1]}
    engine = DeferredWrites()
    folder = scratch_dir("version")
    engine.save(state, str(folder / "model.pt"))
    engine.take()  # taken, not yet written
    with pytest.raises(RuntimeError, match="before the previous one's files were written"):
        engine.save(state, str(folder / "model.pt"))
    engine._taken = []
    engine.pending.clear()
    engine.save(state, str(folder / "model.pt"))
    weight.add_(1.0)
    state["optimizer"]["state"][0]["exp_avg"].add_(5.0)
    state["lr"][0] = 9.0
    assert not (folder / "model.pt").exists()  # nothing written in the loop

    upload = Upload(Storage(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path)), folder, "step-000003",
                    engine.take())
    upload.wait()
    saved = torch.load(tmp_path / "step-000003" / "model.pt", weights_only=False)
    assert saved["module"]["weight"].tolist() == [1.0] * 4
    assert saved["module"]["tied"] is saved["module"]["weight"]  # one tensor saved once
    assert saved["module"]._metadata == {"": {"version": 1}}
    assert saved["optimizer"]["state"][0]["exp_avg"].tolist() == [0.0] * 4
    assert saved["optimizer"]["state"][0]["step"] == 3
    assert saved["lr"] == [0.1] and saved["shape"].numel() == 4  # DeepSpeed's param_shapes are torch.Size

    # The next version reuses the host buffers, only once the previous files are written.
    engine.save(state, str(folder / "model.pt"))
    taken = engine.take()
    assert taken[0][0]["module"]["weight"].tolist() == [2.0] * 4
    with pytest.raises(RuntimeError, match="before the previous one's files were written"):
        engine.save(state, str(folder / "again.pt"))


def test_a_state_whose_copy_the_host_cannot_spare_is_written_in_place(tmp_path):
    """On CPU (or with offload) a version's copy doubles the optimizer state in host memory: a
    0.7B model's run on 2 ranks was killed for memory writing its first version. A copy that needs
    more fresh memory than the host can spare is not made: the state is written at once."""
    import torch

    from trainer.versions.deferred_writes import DeferredWrites

    spare = {"bytes": 10 * 4}
    engine = DeferredWrites(spare_bytes=lambda: spare["bytes"])
    folder = scratch_dir("version")
    small, large = {"w": torch.ones(4)}, {"w": torch.ones(64)}
    engine.save(small, str(folder / "small.pt"))  # 16 bytes fit
    engine.save(large, str(folder / "large.pt"))  # 256 bytes do not
    assert [path.rsplit("/", 1)[-1] for _, path in engine.pending] == ["small.pt"]
    assert not (folder / "small.pt").exists() and (folder / "large.pt").exists() and engine.written_in_place == 1
    large["w"].add_(1.0)
    assert torch.load(folder / "large.pt")["w"].tolist() == [1.0] * 64  # the version's values
    engine.take()
    engine._taken = []

    spare["bytes"] = 0  # the next version: the buffer the small state had is reused, nothing fresh is needed
    engine.save(small, str(folder / "small2.pt"))
    assert [path.rsplit("/", 1)[-1] for _, path in engine.pending] == ["small2.pt"] and engine.written_in_place == 1


def test_a_failed_upload_is_raised_on_the_training_thread(tmp_path):
    storage = Storage(FlakyFs(failures=100), str(tmp_path / "runs"), "s3://bucket/runs", retry_delays_s=(0.0,))
    folder = scratch_dir("version")
    (folder / "rng").mkdir()
    (folder / "rng" / "rank-0.json").write_bytes(b"x")
    upload = Upload(storage, folder, "step-000003")
    with pytest.raises(StorageError, match="could not upload to s3://bucket/runs/step-000003"):
        upload.wait()
    assert not folder.exists()


def test_scratch_of_processes_that_are_gone_is_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    owner = owner_prefix()  # only this host's and PID namespace's folders are removed (see test_scratch.py)
    stale = tmp_path / f"{owner}-{gone.pid}-version-abc"
    (stale / "deepspeed").mkdir(parents=True)
    mine = tmp_path / f"{owner}-{os.getpid()}-version-def"
    mine.mkdir()
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    assert remove_orphans(tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and unrelated.exists()


class FakeRayWorker:
    """Stands in for ray._private.worker: what Ray's SIGTERM handler calls."""

    def __init__(self):
        self.exits = []

    def raise_sys_exit_with_custom_error_message(self, message, exit_code=1):
        self.exits.append(message)


def _hooked(monkeypatch, grace_s: float):
    import ray._private.worker as ray_worker

    fake = FakeRayWorker()
    monkeypatch.setattr(ray_worker, "raise_sys_exit_with_custom_error_message",
                        fake.raise_sys_exit_with_custom_error_message)
    monkeypatch.setattr(stopping, "_MIN_PROGRESS_WAIT_S", 0.5)
    from trainer.runtime import RayRuntime

    runtime = object.__new__(RayRuntime)  # its SIGTERM hook, outside a Ray Train worker
    stops = stopping.StopRequests(None, rank=1, grace_s=grace_s, runtime=runtime)
    exited = []
    stops.exit_process = lambda: exited.append(time.monotonic())
    assert stops.install_sigterm_hook()
    return stops, fake, exited, ray_worker


def test_sigterm_is_deferred_while_the_rank_makes_progress(monkeypatch):
    stops, fake, exited, ray_worker = _hooked(monkeypatch, grace_s=1.5)
    stops.local()
    ray_worker.raise_sys_exit_with_custom_error_message("The process receives a SIGTERM.", exit_code=1)
    assert fake.exits == [] and stops.sigterm_at is not None
    assert stops.local()[1] == 1.0  # the next step boundary carries it to every rank
    time.sleep(1.0)
    assert exited == []  # a boundary came: the version gets the whole grace
    time.sleep(1.0)
    assert len(exited) == 1
    ray_worker.raise_sys_exit_with_custom_error_message("The process receives a SIGTERM.", exit_code=1)
    assert fake.exits == ["The process receives a SIGTERM."]  # the second one is Ray's own exit


def test_sigterm_exits_soon_when_no_step_boundary_comes(monkeypatch):
    stops, fake, exited, ray_worker = _hooked(monkeypatch, grace_s=60)
    ray_worker.raise_sys_exit_with_custom_error_message("The process receives a SIGTERM.", exit_code=1)
    time.sleep(1.5)  # blocked in a collective whose peers are gone: no grace for that
    assert len(exited) == 1


def test_sigterm_after_training_exits_at_once(monkeypatch):
    stops, fake, exited, ray_worker = _hooked(monkeypatch, grace_s=60)
    stops.training = False
    ray_worker.raise_sys_exit_with_custom_error_message("The process receives a SIGTERM.", exit_code=1)
    assert fake.exits == ["The process receives a SIGTERM."] and stops.sigterm_at is None


def test_the_driver_asks_once_then_stops_at_once(monkeypatch):
    from launcher.run import stop_on_signals

    asked_runs = []
    monkeypatch.setattr(stopping, "request_stop", asked_runs.append)
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals("run-1", grace_s=60) as asked:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert asked == [signal.SIGTERM] and asked_runs == ["run-1"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_request_that_never_returns_does_not_deafen_the_driver(monkeypatch):
    """With the local raylet killed by the same Ctrl-C, Ray's key-value put blocks for good: the
    first signal must still return at once, and the second must still stop the driver."""
    from launcher.run import stop_on_signals

    forever = threading.Event()
    monkeypatch.setattr(stopping, "request_stop", lambda run_id: forever.wait())
    with stop_on_signals("run-1", grace_s=60) as asked:
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert asked == [signal.SIGINT] and time.monotonic() - started < 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    forever.set()


PICKLE_BOMB = """
import os, sys, torch
class Bomb:
    def __reduce__(self):
        return (os.mkdir, (sys.argv[2],))
torch.save({"optimizer_state_dict": {"state": Bomb()}}, sys.argv[1])
"""

LOAD_LIKE_DEEPSPEED = """
import sys, torch
from trainer.versions.safe_load import weights_only_loads
weights_only_loads()
try:
    torch.load(sys.argv[1], weights_only=False)  # what DeepSpeed's loaders pass
except Exception as exc:
    print("refused:", type(exc).__name__)
"""


def test_a_version_file_is_never_unpickled_as_code(tmp_path):
    """Storage is shared: a planted shard must not run code in the workers or in `mtl eval`."""
    shard, marker = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", PICKLE_BOMB, str(shard), str(marker)], check=True)
    out = subprocess.run([sys.executable, "-c", LOAD_LIKE_DEEPSPEED, str(shard)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, check=True)
    assert "refused: UnpicklingError" in out.stdout, out.stdout + out.stderr
    assert not marker.exists()


def test_rng_and_data_positions_round_trip_through_json(tmp_path):
    import random

    import numpy as np
    import torch

    from trainer.versions import checkpoint as ckpt

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(ckpt.capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_console_noise_is_recognised_and_useful_lines_are_kept():
    from launcher.console import is_noise
    from trainer.reporting import duration

    assert is_noise("[2026-11-26 03:29:12,451 E 19960 19989] core_worker.cc:2465: Actor with class name: "
                    "'PreemptionWatcher' and ID: '16433c' has constructor arguments in the object store and "
                    "max_restarts > 0.")
    assert is_noise("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert not is_noise("[mtl] step 4/6 | loss sentiment 0.878 | grad norm 14.6")
    assert not is_noise("core_worker.cc:2465: Actor with class name: 'MyActor' died")  # others' errors stay
    assert [duration(9.4), duration(312), duration(3725)] == ["9s", "5m12s", "1h02m"]


def test_a_universal_conversion_cut_short_is_done_again_not_loaded(tmp_path, monkeypatch):
    """A kill mid-upload left part of state_universal/ in the version: before, "the prefix exists"
    counted as done and every later resize of the version loaded half a checkpoint."""
    import pyarrow.fs as pafs

    from trainer.versions import resize
    from trainer.versions.storage import Storage

    storage = Storage(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))
    storage.write_text("step-000004/deepspeed/state/mp_rank_00_model_states.pt", "weights")
    storage.write_text("step-000004/deepspeed/state_universal/zero/layer.0/fp32.pt", "half")  # cut short
    conversions = []

    def convert(folder, stage):
        conversions.append(stage)
        (folder / "state_universal" / "zero" / "layer.1").mkdir(parents=True)
        (folder / "state_universal" / "zero" / "layer.1" / "fp32.pt").write_text("whole")

    monkeypatch.setattr(resize, "convert_to_universal", convert)
    resize.universal_on_storage(storage, "step-000004", 2)
    files = storage.list_files("step-000004/deepspeed/state_universal")
    assert conversions == [2] and set(files) == {"zero/layer.1/fp32.pt", "COMPLETE"}
    resize.universal_on_storage(storage, "step-000004", 2)  # complete: reused as it is
    assert conversions == [2]


def test_a_version_tagged_while_the_run_prunes_is_kept(tmp_path, monkeypatch):
    """`mtl tag` runs in another process: a tag written after pruning chose what to delete, but
    before the delete, keeps its version (tags are read again right before each delete)."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    from trainer.versions import checkpoint as ckpt
    from trainer import loop_versions
    from trainer.versions.storage import Storage

    storage = Storage(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))
    for step in (1, 2, 3):
        storage.write_text(f"step-00000{step}/COMMITTED", "ok\n")
    reads = []

    def tags_as_mtl_tag_writes_them(*_):  # a user tags step-000001 just after the marker went
        reads.append(1)
        return {} if len(reads) <= 2 else {"prod": "step-000001"}

    monkeypatch.setattr(ckpt, "read_tags", tags_as_mtl_tag_writes_them)
    run = SimpleNamespace(storage=storage, version_scores={}, background=None,
                          spec=SimpleNamespace(train=SimpleNamespace(keep_best=False, keep_last=1)))
    kept = loop_versions.prune_versions(run)
    assert ckpt.committed_versions(storage) == ["step-000001", "step-000003"] == kept  # its marker put back


def test_a_tag_on_a_version_the_run_just_pruned_is_refused_and_not_kept(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from launcher import versions
    from trainer.errors import UserError
    from trainer.versions.storage import Storage

    storage = Storage(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))
    for step in (1, 2):
        storage.write_text(f"exp/step-00000{step}/COMMITTED", "ok\n")
    monkeypatch.setattr(versions, "TAG_WAIT_S", 0.3)
    real_write = storage.write_json

    def write_then_pruned(relative, value):  # the run's retention removes step-000001 as the tag lands
        real_write(relative, value)
        if "prod" in value:
            storage.delete_file("exp/step-000001/COMMITTED")

    monkeypatch.setattr(storage, "write_json", write_then_pruned)
    with pytest.raises(UserError, match="step-000001 was removed by the run's retention .* while it was being tagged"):
        versions.tag_version(storage, "exp", "step-000001", "prod")
    assert "prod" not in (storage.read_json("exp/tags.json") or {})


def test_each_ranks_own_lines_pass_rays_log_deduplication(monkeypatch):
    """Ray folds lines of different processes that differ only in numbers; a rank's line about itself
    must reach the console, while Ray keeps folding the rest."""
    import ray._private.ray_logging as ray_logging

    from launcher.console import keep_rank_lines

    dedup = ray_logging.LogDeduplicator(5, None, None, _timesource=lambda: 0.0)

    def printed(lines_by_pid: dict[int, str]) -> list[str]:
        out = []
        for pid, line in lines_by_pid.items():
            for batch in dedup.deduplicate({"ip": "10.0.0.1", "pid": pid, "lines": [line]}):
                out += batch["lines"]
        return out

    ranks = {11: "[mtl] rank 0 data: qa read from the node cache in 0.1s",
             12: "[mtl] rank 1 data: qa read from the node cache in 0.1s"}
    assert printed(ranks) == [ranks[11]]  # what Ray does on its own
    monkeypatch.setattr(ray_logging, "stdout_deduplicator", dedup)
    monkeypatch.setattr(ray_logging, "stderr_deduplicator", ray_logging.LogDeduplicator(5, None, None))
    keep_rank_lines()
    keep_rank_lines()  # twice: one pattern
    assert dedup.allow_re.pattern.count("rank") == 1
    assert printed(ranks) == list(ranks.values())
    assert printed({11: "epoch 3 of 9 done", 12: "epoch 4 of 9 done"}) == ["epoch 3 of 9 done"]
