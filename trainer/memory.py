"""Where a rank's memory goes: each phase's peak (data, build, engine init, step 1, steps, version).

A rank's resident memory peaks in different places for different models: building the
model, DeepSpeed allocating its partitions and buffers, the optimizer's first step creating
AdamW's moments, a version's copies. One peak for the whole run says how much, not where.
`MemoryPhases` reads the kernel's high-water mark (VmHWM) at the end of each phase and resets
it (/proc/self/clear_refs), so each phase gets its own peak; on a GPU, torch's allocator peak
the same way.

Each rank also publishes the phase it is in and its memory so far in Ray's key-value store:
when Ray's memory monitor kills a rank, the process can say nothing, and the driver names the
phase and the figure from there (launcher.run).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
from pathlib import Path

import torch

GIB = 2 ** 30


def memory_key(run_id: str, rank: int) -> bytes:
    return f"memory/{run_id}/{rank}".encode()


def resident_bytes() -> tuple[int, int]:
    """(now, the high-water mark since the last reset) of this process's resident memory."""
    now = peak = 0
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    now = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:  # not Linux: the process's peak, never reset
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return now, max(now, peak)


def reset_peak() -> None:
    """Start a new high-water mark (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def return_freed_memory() -> None:
    """Give the C allocator's freed pages back to the system.

    Building a model partitioned makes each layer whole and then keeps only this rank's part;
    the freed blocks stay in glibc's heap (only blocks above its mmap threshold are unmapped),
    where they count as resident memory that the rank never uses again.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


class MemoryPhases:
    """Per-phase peaks of one rank: `enter(phase)` ends the current phase and starts the next."""

    def __init__(self, rank: int, device: torch.device, publish=None):
        self.rank, self.device = rank, device
        self.peaks: dict[str, float] = {}  # phase -> peak resident GiB (the largest, when a phase recurs)
        self.device_peaks: dict[str, float] = {}
        self.phase: str | None = None
        self._publish = publish  # callable(bytes) or None

    def enter(self, phase: str) -> None:
        if self.phase is not None:
            self._close(self.phase)
        self.phase = phase
        self._note()

    def _close(self, phase: str) -> None:
        _, peak = resident_bytes()
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), peak / GIB)
        reset_peak()
        if self.device.type == "cuda":
            self.device_peaks[phase] = max(self.device_peaks.get(phase, 0.0),
                                           torch.cuda.max_memory_allocated(self.device) / GIB)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _note(self) -> None:
        if self._publish is None:
            return
        now, _ = resident_bytes()
        try:
            self._publish(json.dumps({"phase": self.phase, "pid": os.getpid(),
                                      "resident_gib": round(now / GIB, 2)}).encode())
        except Exception:  # a note for a failure message: never a reason to fail
            pass

    def peak(self) -> float:
        return max(self.peaks.values(), default=0.0)

    def line(self) -> str:
        """`[mtl] rank 0 peak memory: 9.12 GiB resident (build 2.90, engine init 6.31, ...)`."""
        if self.phase is not None:
            self._close(self.phase)
            self.phase = None
        phases = ", ".join(f"{p} {g:.2f}" for p, g in self.peaks.items())
        line = f"[mtl] rank {self.rank} peak memory: {self.peak():.2f} GiB resident ({phases})"
        if self.device_peaks:
            gpu = ", ".join(f"{p} {g:.2f}" for p, g in self.device_peaks.items())
            line += f"; {max(self.device_peaks.values()):.2f} GiB allocated on {self.device} ({gpu})"
        return line


def read_notes(kv_get, run_id: str, world: int) -> dict[int, dict]:
    """Rank -> its last note ({"phase", "pid", "resident_gib"}), for the ranks that left one."""
    notes = {}
    for rank in range(world):
        raw = kv_get(memory_key(run_id, rank))
        if raw:
            try:
                notes[rank] = json.loads(raw)
            except ValueError:
                continue
    return notes


def meminfo_bytes(key: str) -> int | None:
    """A /proc/meminfo figure (MemTotal, MemAvailable) in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_bytes(name: str) -> int | None:
    """A cgroup v2 memory figure of this process's group (memory.max, memory.current); None where
    there is no cgroup v2 or no limit."""
    try:
        value = Path(f"/sys/fs/cgroup/{name}").read_text().strip()
        return None if value == "max" else int(value)
    except (OSError, ValueError):
        return None


def total_bytes() -> int | None:
    """This machine's memory (MemTotal), or a cgroup's limit where it is lower."""
    total, limit = meminfo_bytes("MemTotal"), cgroup_bytes("memory.max")
    return total if limit is None or total is None else min(total, limit)


def available_bytes() -> int | None:
    """Memory the system can still give: MemAvailable, or less where a cgroup limits this process."""
    available, limit, used = meminfo_bytes("MemAvailable"), cgroup_bytes("memory.max"), cgroup_bytes("memory.current")
    if available is None or limit is None or used is None:
        return available
    return min(available, limit - used)


def spare_host_bytes(ranks_on_node: int) -> int | None:
    """What a rank may take of the host's free memory for a copy: half its share (the ranks of a
    node write their versions at the same step)."""
    available = available_bytes()
    return None if available is None else available // max(1, ranks_on_node) // 2
