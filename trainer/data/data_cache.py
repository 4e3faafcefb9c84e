"""A node-local cache of prepared task data: the checked rows and the encoded features of a
task, keyed by everything they are made from, so that reading, checking and tokenizing happen
once per node and are reused by every rank on it and by every restart or later run.

The key covers the data (each file's path and content hash, or size and modification time
past 1 GiB; a hub dataset's fingerprint), the task's settings that reach the rows (type,
columns, labels, bad-row policy, prompt, length, options), the tokenizer (its `datasets`
fingerprint), the model encoding, the splits asked for, and the code that reads, checks,
encodes and stores (these modules' text, so a change of the entry layout is a new key; and the
versions of tokenizers/transformers/datasets). Anything else changes nothing here.

An entry is `<root>/<task>-<key>/`: `checked.json` (rows and skipped-row reports) and one
`datasets` folder per encoded split, which ranks memory-map rather than copy. Both are plain data,
never pickles: the root may be a shared folder where others can write, and loading a pickle runs
whatever code it names. An entry is written under a temporary name and renamed when complete, so
a killed writer leaves no half entry; a file lock per entry makes the other ranks of a node wait
for the first one's work instead of repeating it.

The root is `$MTL_DATA_CACHE`, else `$XDG_CACHE_HOME/mtl/data` (`~/.cache/mtl/data`);
`MTL_DATA_CACHE=off` turns the cache off. Removing the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOCK_WAIT_S = 3 * 3600  # another rank preparing a very large task; after this, prepare without the cache
OFF = ("off", "0", "false", "no")
HASH_LIMIT = 1 << 30  # data files up to 1 GiB are keyed by their content


def _process_umask() -> int:
    """Read once, at import: reading it means setting it, and tasks are prepared on several threads."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


UMASK = _process_umask()


def cache_root() -> Path | None:
    """Where entries live on this node, or None when the cache is off."""
    value = os.environ.get("MTL_DATA_CACHE", "")
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtl" / "data"


def fingerprint(parts: dict) -> str:
    """A stable hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_identity(paths: list[str]) -> list[list]:
    """What a change of a data file changes: its path and content hash; past HASH_LIMIT bytes its
    size and modification time stand for the content (hashing would cost more than it saves)."""
    out = []
    for path in paths:
        stat = os.stat(path)
        if stat.st_size <= HASH_LIMIT:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            out.append([os.path.realpath(path), digest.hexdigest()])
        else:
            out.append([os.path.realpath(path), stat.st_size, stat.st_mtime_ns])
    return out


def library_versions() -> dict[str, str]:
    import datasets
    import tokenizers
    import transformers

    return {"datasets": datasets.__version__, "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__}


@dataclass
class CacheUse:
    """How a task's data was had: 'built' (and stored), 'hit' (loaded), or 'off'; and its seconds."""

    status: str
    seconds: float
    entry: str = ""


class DataCache:
    def __init__(self, root: Path):
        self.root = root

    def entry(self, task: str, key: str) -> Path:
        return self.root / f"{task}-{key}"

    def get_or_build(self, task: str, key: str, build: Callable[[], object],
                     *, store: Callable[[object, Path], None], load: Callable[[Path], object]):
        """The task's prepared data and how it was had. `build()` makes it; `store(data, folder)`
        writes it, `load(folder)` reads it back."""
        from filelock import FileLock, Timeout

        started = time.perf_counter()
        folder = self.entry(task, key)
        lock = FileLock(str(folder) + ".lock")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=LOCK_WAIT_S)
        except (OSError, Timeout):  # no usable cache folder, or another rank took too long: prepare here
            return build(), CacheUse("off", time.perf_counter() - started)
        try:
            if (folder / "meta.json").exists():
                try:
                    return load(folder), CacheUse("hit", time.perf_counter() - started, str(folder))
                except Exception:  # noqa: BLE001 - unreadable (a cut copy, an older layout): prepare anew
                    pass
            data = build()
            stored = self._store(folder, data, store)
            return data, CacheUse("built" if stored else "off", time.perf_counter() - started,
                                  str(folder) if stored else "")
        finally:
            lock.release()

    def _store(self, folder: Path, data, store) -> bool:
        """Write the entry under a temporary name, then rename it into place. A cache that cannot be
        written (a full disk, a folder of someone else's), or data that JSON cannot hold (TypeError,
        ValueError from `store`), costs the reuse, never the run."""
        partial = None
        try:
            partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-{os.getpid()}-", dir=self.root))
            store(data, partial)
            (partial / "meta.json").write_text(json.dumps({"entry": folder.name, "created": time.time()}))
            os.chmod(partial, 0o777 & ~UMASK)  # mkdtemp makes it private; others on a shared node may read it
            shutil.rmtree(folder, ignore_errors=True)  # an entry without meta.json, or one that did not load
            os.rename(partial, folder)
            return True
        except (OSError, TypeError, ValueError):
            return False
        finally:
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
