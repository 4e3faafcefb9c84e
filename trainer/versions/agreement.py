"""What every rank must see the same on a cluster whose nodes have their own disks, checked with
collectives at the points where a difference would otherwise go unnoticed:

- at setup, that `storage.path` is one place for all nodes: rank 0 writes a probe there and every
  rank must read it back (a folder on each node's own disk, the default `./runs` included, would
  leave each rank writing its shards where no other rank, and no resume, will look);
- before a version's marker, that every rank's files are on storage (rank 0 lists them);
- the versions a run resumes from: rank 0 lists storage once and the others take its list (NFS
  attribute caches can show two nodes different listings for a while);
- that every rank prepared the same data: each task's source identity and counts.

A difference stops the run on every rank with one line that says what to use instead.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from trainer.collectives import all_gather_objects, barrier, from_rank0
from trainer.errors import UserError

PROBE_WAIT_S = float(os.environ.get("MTL_STORAGE_PROBE_WAIT_S", "45"))  # NFS may hide a new file for ~30 s
SHARED_INSTEAD = ("every node must see one folder: a shared filesystem mounted at the same path on each node "
                  "(NFS, a cluster filesystem), or s3://bucket/prefix")


def require_shared_storage(storage, rank: int, where: str, wait_s: float = PROBE_WAIT_S) -> None:
    """Rank 0 writes a probe; every rank must see it within `wait_s`; then rank 0 removes it."""
    probe = f".mtl-probe-{from_rank0(uuid.uuid4().hex if rank == 0 else None)}"
    if rank == 0:
        storage.write_text(probe, probe)
    barrier()
    deadline = time.monotonic() + wait_s
    seen = storage.read_text(probe) == probe
    while not seen and time.monotonic() < deadline:
        time.sleep(1.0)
        seen = storage.read_text(probe) == probe
    views = all_gather_objects((seen, socket.gethostname()))
    if rank == 0:
        storage.delete_file(probe)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise UserError(f"storage.path {where} is not shared: {', '.join(blind)} cannot see what rank 0 on "
                        f"{views[0][1]} wrote there, so versions would be split across the nodes' own disks; "
                        f"{SHARED_INSTEAD}")


def require_parts_on_storage(storage, version: str, files: list[dict[str, int]], where: str) -> None:
    """Rank 0, before the marker: each rank's files (`files[r]`: path -> bytes) are in the version."""
    present = storage.list_files(version)
    for rank, wrote in enumerate(files):
        missing = [path for path, size in wrote.items() if present.get(path) != size]
        if missing:
            raise UserError(f"version {version}: rank {rank}'s files are not on storage.path {where} "
                            f"({len(missing)} of {len(wrote)} missing or cut short, e.g. {missing[0]}); "
                            f"{SHARED_INSTEAD}")


def agreed_versions(listed: list[str]) -> list[str]:
    """The committed versions as rank 0 listed them, on every rank."""
    return from_rank0(listed)


def require_same_data(signatures: dict, rank: int) -> None:
    """`signatures`: task -> what its prepared data is made of and holds (task_data.data_signature)."""
    views = all_gather_objects((socket.gethostname(), signatures))
    host0, first = views[0]
    for other, (host, theirs) in enumerate(views[1:], 1):
        differ = sorted(t for t in set(first) | set(theirs) if first.get(t) != theirs.get(t))
        if differ:
            task = differ[0]
            raise UserError(f"tasks {', '.join(differ)}: rank {other} on {host} prepared other data than rank 0 on "
                            f"{host0} ({task}: {describe(theirs.get(task))} against {describe(first.get(task))}); "
                            f"every node must read the same files: put the data on a shared path or the hub")


def describe(signature: dict | None) -> str:
    if not signature:
        return "nothing"
    rows = ", ".join(f"{split} {n} rows" for split, n in signature["rows"].items())
    return f"{rows}, source {signature['source'][:12]}"
