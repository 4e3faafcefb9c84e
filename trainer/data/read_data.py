"""Reading a task's raw splits: local files (jsonl/json/csv/tsv/parquet), one file split by
fractions, or a hub dataset. Every row gets `__row__`, its 1-based position in its source,
so that every later message can name the row."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass

import numpy as np

from trainer.errors import DataError, last_line
from trainer.scratch import scratch

SPLITS = ("train", "validation", "test")
ROW = "__row__"
_BUILDERS = {"jsonl": ("json", {}), "json": ("json", {}), "csv": ("csv", {}),
             "tsv": ("csv", {"delimiter": "\t"}), "parquet": ("parquet", {})}


@dataclass
class RawSplit:
    split: str
    rows: object  # datasets.Dataset with the file's columns + __row__
    origin: str   # what a message should name: a file path or hub:name/subset[split]
    field: str    # the spec field that points at it, e.g. tasks.qa.data.train


def file_format(path: str, declared: str | None, field: str) -> str:
    if declared:
        return declared
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in _BUILDERS:
        raise DataError(f"{field}: cannot tell the format of '{path}' from its extension; "
                        f"set data.format to one of {', '.join(_BUILDERS)}")
    return ext


def _files(path: str, field: str) -> list[str]:
    if os.path.isdir(path):
        found = sorted(f for f in glob.glob(os.path.join(path, "*"))
                       if os.path.splitext(f)[1].lstrip(".").lower() in _BUILDERS)
        if not found:
            raise DataError(f"{field}: folder '{path}' holds no {'/'.join(_BUILDERS)} files")
        return found
    if not os.path.exists(path):
        raise DataError(f"{field}: file not found: '{path}'")
    if not os.access(path, os.R_OK):
        raise DataError(f"{field}: file is not readable: '{path}'")
    return [path]


class SharedReads:
    """Files that several tasks of a job name (a collection with many prompts over one dataset),
    each read once while they are prepared: every task gets the same Dataset (Arrow tables do not
    change in place), dropped after the last task that names it has read it. Only files named
    more than once are kept, so a job of many files does not hold them all at once."""

    def __init__(self, uses: dict[tuple, int]):
        self.left = {key: n for key, n in uses.items() if n > 1}
        self.read: dict[tuple, list] = {}  # key -> [lock, Dataset or None]
        self.lock = threading.Lock()

    def get(self, key: tuple, read):
        with self.lock:
            if key not in self.left:
                return read()
            entry = self.read.setdefault(key, [threading.Lock(), None])
        with entry[0]:  # a second task waits for the first one's read instead of reading too
            if entry[1] is None:
                entry[1] = read()  # a DataError leaves it None: the next task reads (and names itself)
            value = entry[1]
        with self.lock:
            self.left[key] -= 1
            if not self.left[key]:
                del self.left[key], self.read[key]
        return value


_shared: SharedReads | None = None


def read_key(path: str, fmt: str | None) -> tuple:
    """What makes two reads the same: the files (as real paths, with their size and modification
    time: a file rewritten between two tasks' reads is read again) and the declared format."""
    try:
        files = _files(path, "")
    except DataError:  # read_file names the problem, with the task's field
        files = [path]
    return fmt, tuple((os.path.realpath(f), *_size_and_time(f)) for f in files)


def _size_and_time(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def reading_once(tasks: list):
    """Within it, read_file reads a file that several of `tasks` (DataSpecs) name once. Nested
    uses keep the outer one."""
    global _shared
    if _shared is not None:
        yield
        return
    uses: dict[tuple, int] = {}
    for data in tasks:
        for path in _named_files(data):
            key = read_key(path, data.format)
            uses[key] = uses.get(key, 0) + 1
    _shared = SharedReads(uses)
    try:
        yield
    finally:
        _shared = None


def _named_files(data) -> list[str]:
    if data.hub:
        return []
    return [data.path] if data.path else [getattr(data, s) for s in SPLITS if getattr(data, s)]


def read_file(path: str, fmt: str | None, field: str):
    """A local file (or folder of files) as a Dataset with `__row__` added (read once for every
    task that names it, within `reading_once`)."""
    shared = _shared
    if shared is None:
        return _read_file(path, fmt, field)
    return shared.get(read_key(path, fmt), lambda: _read_file(path, fmt, field))


def _read_file(path: str, fmt: str | None, field: str):
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()  # one line per file is noise at this scale; errors still surface
    files = _files(path, field)
    builder, kwargs = _BUILDERS[file_format(files[0], fmt, field)]
    if builder == "csv":
        kwargs = {**kwargs, "keep_default_na": False}  # an empty cell stays "", not NaN
    table = read_directly(files, builder)
    if table is not None:
        # A fingerprint of its own: otherwise datasets hashes the whole table to make one (5 ms here,
        # for nothing: prepared data is cached by content, never by a Dataset's fingerprint).
        table = table.append_column(ROW, pa.array(range(1, table.num_rows + 1), pa.int64()))
        return datasets.Dataset(table, fingerprint=uuid.uuid4().hex)
    try:
        # Converted in a scratch folder, not datasets' own cache: that one is keyed by path and
        # modification time, and would hand back old rows for a file rewritten within the same
        # instant. Prepared data is cached by content instead (trainer.data.data_cache).
        with _quiet_datasets(), scratch("read") as folder:
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=str(folder), **kwargs)
    except Exception as exc:  # the datasets builders raise many types; the user needs the file and the reason
        reason = unreadable_text(files, builder) or last_line(exc)
        raise DataError(f"{field}: cannot read '{path}' as {builder}: {reason}") from exc
    return ds.add_column(ROW, list(range(1, len(ds) + 1)))


def read_directly(files: list[str], builder: str):
    """One JSON Lines or Parquet file's table read by pyarrow itself, as datasets' builder reads it, or None
    where only the builder copes (a JSON array document, rows whose types change down the file, CSV's
    options). The builder costs ~25 ms a file in set-up alone (its cache folder, fingerprints, a
    split generator): 256 tasks' train and validation files took 12 s of `mtl validate`."""
    import pyarrow as pa

    if len(files) != 1 or builder not in ("json", "parquet"):
        return None
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(files[0])
        else:
            import pyarrow.json as paj

            table = paj.read_json(files[0])
    except (pa.ArrowException, OSError, ValueError):
        return None
    if table.num_rows == 0 or not table.num_columns or ROW in table.column_names:
        return None  # the builder's own handling (and message) for an empty file
    return table


def unreadable_text(files: list[str], builder: str) -> str | None:
    """Why a file failed to load, with its line, when datasets only says that generating the
    dataset failed: it is not UTF-8 text (a binary file), or a JSON Lines line does not parse."""
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as exc:
            line = open(path, "rb").read()[:exc.start].count(b"\n") + 1
            return f"'{path}' is not UTF-8 text (a binary file?): byte {exc.start} on line {line}"
        if builder != "json":
            continue
        try:
            json.loads(text)  # one JSON document (an array of rows) is fine as it is
            continue
        except ValueError:
            pass
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as exc:
                    return f"'{path}' line {number}: {exc}"
    return None


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs a parse failure itself before raising; we report it once, with the field."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def derive_splits(ds, fractions: dict[str, float], seed: int) -> dict[str, object]:
    """Deterministic held-out splits from one dataset: a seeded permutation cut by fractions."""
    order = np.random.default_rng(seed).permutation(len(ds))
    out, start = {}, 0
    for split in ("validation", "test"):
        if split in fractions:
            n = max(1, int(round(fractions[split] * len(ds))))
            out[split] = ds.select(sorted(order[start:start + n].tolist()))
            start += n
    out["train"] = ds.select(sorted(order[start:].tolist()))
    return out


def read_hub(name: str, subset: str | None, roles: dict[str, str] | None, field: str) -> dict[str, object]:
    import datasets

    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset(name, subset)
    except Exception as exc:
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("0", "")]
        hint = ""
        if offline or isinstance(exc, ConnectionError) or "Couldn't reach" in str(exc):
            task = field.split(".")[1]
            hint = (f". The hub is unreachable{f' ({offline[0]} is set)' if offline else ''}: save the dataset "
                    f"where it is reachable (datasets.load_dataset('{name}'{f', {subset!r}' if subset else ''})"
                    f"[split].to_json('train.jsonl')) and give the files as tasks.{task}.data.train / validation / test")
        raise DataError(f"{field}: cannot load hub dataset '{name}'{f'/{subset}' if subset else ''}: "
                        f"{last_line(exc)}{hint}") from exc
    roles = roles or {s: s for s in SPLITS if s in loaded}
    out = {}
    for role, hub_split in roles.items():
        if hub_split not in loaded:
            raise DataError(f"{field}: hub dataset '{name}' has no split '{hub_split}' (it has {', '.join(loaded)})")
        ds = loaded[hub_split]
        out[role] = ds.add_column(ROW, list(range(1, len(ds) + 1)))
    return out


def source_files(data, base: str) -> list[str]:
    """The local files a file-based `data` block reads (a DataSpec; not for hub data)."""
    if data.path:
        return _files(data.path, f"{base}.path")
    return [f for s in SPLITS if getattr(data, s) for f in _files(getattr(data, s), f"{base}.{s}")]


def read_splits(task: str, data) -> list[RawSplit]:
    """Every split the task's `data` block names, read and numbered. `data` is a DataSpec."""
    base = f"tasks.{task}.data"
    if data.hub:
        loaded = read_hub(data.hub, data.subset, data.splits, f"{base}.hub")
        label = f"hub:{data.hub}{'/' + data.subset if data.subset else ''}"
        splits = [RawSplit(s, ds, f"{label}[{s}]", f"{base}.hub") for s, ds in loaded.items()]
    elif data.path:
        whole = read_file(data.path, data.format, f"{base}.path")
        derived = derive_splits(whole, data.split or {}, data.seed)
        splits = [RawSplit(s, ds, data.path, f"{base}.path") for s, ds in derived.items()]
    else:
        splits = [RawSplit(s, read_file(getattr(data, s), data.format, f"{base}.{s}"), getattr(data, s), f"{base}.{s}")
                  for s in SPLITS if getattr(data, s)]
    if data.limit:
        for raw in splits:
            raw.rows = raw.rows.select(range(min(data.limit, len(raw.rows))))
    return sorted(splits, key=lambda r: SPLITS.index(r.split))
