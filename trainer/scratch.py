"""Local scratch on a node: a rank's part of a version before upload, a version's files while
a rank resumes from them, TensorBoard events before they reach storage.

Everything lives under `<tmp>/mtl-scratch/<host>-<boot>-<pidns>-<pid>-<kind>-<random>` (or
`$MTL_SCRATCH_DIR`, e.g. a node's local NVMe or a RAM disk: training waits for the write there
at every version), removed when its work is done. A SIGKILLed worker runs no cleanup, so every
worker starts by removing the folders of processes that no longer exist: a node that restarts
workers many times does not fill its disk with hundreds of megabytes of stale shards per restart.

A PID alone does not name a process when the root is shared by containers with their own PID
namespaces (a hostPath mounted by every pod of a node): a PID missing here may be a live run
there, uploading from its folder. So a folder also names its host, the kernel's boot and the PID
namespace, and a worker removes only folders of its own host: those from before a reboot, and
those of PIDs gone from its own namespace (containers of one pod share a host name).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

ROOT = Path(os.environ.get("MTL_SCRATCH_DIR") or Path(tempfile.gettempdir()) / "mtl-scratch")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
PID_NAMESPACE = Path("/proc/self/ns/pid")
# host (no '-': it is sanitised), boot, PID namespace, pid, then kind and mkdtemp's random part (may hold '-').
OWNED = re.compile(r"(?P<host>[A-Za-z0-9.]+)-(?P<boot>[0-9a-f]{8}|noboot)-(?P<ns>[0-9]+|nons)-(?P<pid>[0-9]+)-.+")


def host_name() -> str:
    """This host's name with every character other than [A-Za-z0-9.] made '.', so that '-' only
    ever separates the parts of a folder's name ('pod-abc-123' -> 'pod.abc.123')."""
    return re.sub(r"[^A-Za-z0-9.]", ".", socket.gethostname()) or "nohost"


def boot_id() -> str:
    """The first 8 hex digits of the running kernel's boot id: a folder from another boot belongs to
    no live process. 'noboot' where the kernel does not say."""
    try:
        digits = BOOT_ID.read_text().strip().replace("-", "")[:8].lower()
    except OSError:
        return "noboot"
    return digits if re.fullmatch(r"[0-9a-f]{8}", digits) else "noboot"


def pid_namespace() -> str:
    """The inode of this process's PID namespace: the same number for every process whose PIDs we see."""
    try:
        return str(os.stat(PID_NAMESPACE).st_ino)
    except OSError:
        return "nons"


def owner_prefix() -> str:
    """`<host>-<boot>-<pidns>`: what a folder's PID is relative to."""
    return f"{host_name()}-{boot_id()}-{pid_namespace()}"


def scratch_dir(kind: str) -> Path:
    """A new folder owned by this process (remove it with `shutil.rmtree`, or let `scratch` do it)."""
    ROOT.mkdir(parents=True, exist_ok=True)
    owner = f"{owner_prefix()}-{os.getpid()}"
    return Path(tempfile.mkdtemp(prefix=f"{owner}-{kind}-", dir=ROOT))


@contextlib.contextmanager
def scratch(kind: str):
    folder = scratch_dir(kind)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphans(root: Path = ROOT) -> list[Path]:
    """Remove the scratch folders of this host's processes that are gone; returns what was removed."""
    removed = []
    if not root.is_dir():
        return removed
    host, boot, ns = host_name(), boot_id(), pid_namespace()
    for folder in root.iterdir():
        if _orphaned(folder.name, host, boot, ns):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _orphaned(name: str, host: str, boot: str, ns: str) -> bool:
    """Whether the folder `name` belongs to a process of this host that cannot be alive.

    Another host's or PID namespace's folder, or one named `<pid>-...` by older code, is kept: its
    PID was taken in a namespace we cannot see, so we cannot know whether its owner lives. Removing it could cut a
    running upload short; keeping it costs only disk until someone who can tell removes it."""
    import psutil

    owner = OWNED.fullmatch(name)
    if owner is None or owner["host"] != host:
        return False
    if owner["boot"] != boot:  # this host rebooted since: nothing from before lives
        return True
    if owner["ns"] != ns:  # another container on this kernel: its PIDs are not ours to look up
        return False
    return not psutil.pid_exists(int(owner["pid"]))
