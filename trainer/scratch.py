"""Local scratch on a node: a rank's part of a version before upload, a version's files while
a rank resumes from them, TensorBoard events before they reach storage.

Everything lives under `<tmp>/mtl-scratch/<pid>-<kind>-<random>` (or `$MTL_SCRATCH_DIR`, e.g.
a node's local NVMe or a RAM disk: training waits for the write there at every version),
removed when its work is done. A SIGKILLed worker runs no cleanup, so every worker starts by removing the folders of
processes that no longer exist: a node that restarts workers many times does not fill its
disk with hundreds of megabytes of stale shards per restart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(os.environ.get("MTL_SCRATCH_DIR") or Path(tempfile.gettempdir()) / "mtl-scratch")


def scratch_dir(kind: str) -> Path:
    """A new folder owned by this process (remove it with `shutil.rmtree`, or let `scratch` do it)."""
    ROOT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{kind}-", dir=ROOT))


@contextlib.contextmanager
def scratch(kind: str):
    folder = scratch_dir(kind)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphans(root: Path = ROOT) -> list[Path]:
    """Remove the scratch folders of processes that are gone; returns what was removed."""
    import psutil

    removed = []
    if not root.is_dir():
        return removed
    for folder in root.iterdir():
        owner = folder.name.split("-", 1)[0]
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
