"""Where a rank's memory goes (trainer.memory), and the one line a rank killed for memory gets."""

from __future__ import annotations

import json

import numpy as np
import torch

from launcher.run import killed_for_memory, memory_kill_message
from trainer.memory import GIB, MemoryPhases, memory_key, read_notes


def test_each_phase_gets_its_own_peak_and_the_rank_notes_the_phase_it_is_in():
    notes = {}
    phases = MemoryPhases(0, torch.device("cpu"), publish=lambda note: notes.update(last=json.loads(note)))
    phases.enter("small")
    assert notes["last"]["phase"] == "small"
    phases.enter("large")
    block = np.ones(256 * 2 ** 20 // 8)  # 256 MiB, touched
    del block
    phases.enter("small again")  # the large phase's high-water mark must not leak into this one
    line = phases.line()
    assert line.startswith("[mtl] rank 0 peak memory: ") and "small again" in line
    assert phases.peaks["large"] - phases.peaks["small again"] > 200 * 2 ** 20 / GIB, phases.peaks
    assert phases.peak() == phases.peaks["large"]


def test_a_rank_killed_for_memory_is_named_with_its_phase_and_what_to_change():
    store = {memory_key("r1", 0): json.dumps({"phase": "steps", "pid": 6183, "resident_gib": 8.2}).encode(),
             memory_key("r1", 1): json.dumps({"phase": "step 1", "pid": 6210, "resident_gib": 3.2}).encode()}
    notes = read_notes(store.get, "r1", 3)  # rank 2 never noted anything
    # Ray's report of the kill, as the driver receives it (its table of the largest processes)
    report = ("3 worker(s) were killed due to the node running low on memory.\nTop 10 memory users: PID\tMEM(GB)\tCOMMAND\n"
              "6210\t11.13\tray::RayTrainWorker\n6183\t9.46\tray::RayTrainWorker\n5639\t0.40\t.venv/bin/mtl train\n")
    message = memory_kill_message(notes, report)
    assert message.startswith("killed for memory (Ray's memory monitor) during step 1: rank 0 9.5 GB when killed, "
                              "rank 1 11.1 GB when killed. The first step took it")
    assert "higher ZeRO stage" in message and "mtl validate" in message
    assert "rank 0 8.2 GiB at its last note" in memory_kill_message(notes)  # no table: the ranks' own notes
    assert "before it started training" in memory_kill_message({})


def test_rays_memory_kill_is_told_from_other_failures():
    from ray.exceptions import OutOfMemoryError
    from ray.train import WorkerGroupError

    def Failed(failures):
        return WorkerGroupError("Training failed due to worker errors", failures)

    health = RuntimeError("A worker health check failed. 3 worker(s) were killed due to the node running low on memory.")
    assert killed_for_memory(Failed({1: health}))
    assert killed_for_memory(Failed({0: OutOfMemoryError("killed")}))
    assert not killed_for_memory(Failed({0: ValueError("a bad row")}))
