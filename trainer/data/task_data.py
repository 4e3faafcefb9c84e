"""Entry-level data preparation: reads the job, builds every task's checked and encoded
splits. This is the one place where the job spec meets the data components (which take
plain arguments)."""

from __future__ import annotations

import copy
import glob
import inspect
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.data.batching import group_micro_batches, shard_indices, task_salt
from trainer.data.check_encode import BadRows, CheckedTask, EncodedSplit, check_task, encode_split
from trainer.data.data_cache import CacheUse, DataCache, cache_root, file_identity, fingerprint, library_versions
from trainer.data.read_data import RawSplit, read_splits, reading_once, source_files
from trainer.tasks import TaskContext, registry


@dataclass
class TaskData:
    name: str
    type: str
    labels: tuple[str, ...]
    checked: CheckedTask
    encoded: dict[str, EncodedSplit] = field(default_factory=dict)
    cache: CacheUse | None = None  # how it was had: prepared here, or read from the node's cache
    source: str = ""  # what it is made of, wherever the node keeps the files (see data_signature)


def model_encoding(kind: str, is_encoder_decoder: bool) -> str:
    """How inputs are laid out for a model: heads | seq2seq | causal."""
    if kind == "heads":
        return "heads"
    return "seq2seq" if is_encoder_decoder else "causal"


def task_context(spec, name: str, tokenizer=None, encoding: str | None = None,
                 labels: tuple[str, ...] = ()) -> TaskContext:
    """The plain values a task's checks and encoders need, read from the job."""
    task = spec.tasks[name]
    task_type = registry.get(task.type)
    return TaskContext(
        task=name, tokenizer=tokenizer, encoding=encoding or spec.model.kind,
        max_length=task.max_length or spec.model.max_length,
        prompt=task.prompt or task_type.default_prompt, labels=labels,
        options=task_type.options_model.model_validate(task.options))


def task_metrics(spec, name: str) -> list[str]:
    """The metrics a task is scored with: the job's list, else its type's defaults."""
    task = spec.tasks[name]
    return list(task.metrics or registry.get(task.type).default_metrics)


def primary_metric(names: list[str]) -> str:
    """The metric that ranks a task's versions: the first of its list."""
    return "rougeL" if names[0] == "rouge" else names[0]


def check_task_data(spec, name: str, raw: list[RawSplit] | None = None) -> CheckedTask:
    task = spec.tasks[name]
    raw = read_splits(name, task.data) if raw is None else raw
    return check_task(name, registry.get(task.type), raw, task.columns, task.labels,
                      task_context(spec, name), task.bad_rows)


def prepare_tasks(spec, tokenizer, encoding: str, splits=("train", "validation", "test"), *,
                  tasks: list[str] | None = None, limit: int | None = None, start: int = 0,
                  processes: int | None = None) -> dict[str, TaskData]:
    """Each task's rows checked and encoded. `tasks`: only these; `limit`: the first N rows of
    each held-out split (train is never cut: baselines and label sets read it). Prepared data is
    kept in the node's cache (trainer.data.data_cache) and read from it when nothing it depends on changed.

    Tasks are had on a few threads at once: a task read from the cache mostly waits on files, and
    one being prepared mostly tokenizes in Rust, outside the GIL. `start` rotates the order in which
    they are begun: ranks on one node pass their local rank, so each prepares a different task first
    while the others wait on its cache entry's lock, and reads the rest from the cache. A split of
    many rows is encoded on `processes` processes (default: the cores this process may use)."""
    names = list(tasks or spec.tasks)
    order = names[start % len(names):] + names[:start % len(names)] if names else []
    root = cache_root()
    hashed = _tokenizer_hash(tokenizer)  # once: dill-pickling a tokenizer's vocabulary is ~10 ms a task or more
    copies = threading.local()

    def own_tokenizer():
        """A tokenizer per thread: a fast tokenizer's truncation settings are state of its Rust object,
        and two threads encoding through one raise 'Already borrowed'."""
        if not hasattr(copies, "tokenizer"):
            copies.tokenizer = tokenizer if threading.current_thread() is threading.main_thread() \
                else copy.deepcopy(tokenizer)
        return copies.tokenizer

    def have(name: str) -> TaskData:
        build = lambda raw=None: _prepare_task(spec, name, own_tokenizer(), encoding, splits, limit, raw,  # noqa: E731
                                               processes=processes or usable_cores())
        if root is None:
            started = time.perf_counter()
            data = build()
            data.cache = CacheUse("off", time.perf_counter() - started)
            return data
        raw = read_splits(name, spec.tasks[name].data) if spec.tasks[name].data.hub else None
        parts = cache_key(spec, name, tokenizer, encoding, splits, limit, raw, tokenizer_hash=hashed)
        data, use = DataCache(root).get_or_build(name, fingerprint(parts), lambda: build(raw),
                                                 store=_store_task, load=_load_task)
        data.cache, data.source = use, source_fingerprint(parts)
        return data

    threads = min(PREPARE_THREADS, len(order))
    with reading_once([spec.tasks[name].data for name in order]):
        if threads <= 1:
            done = {name: have(name) for name in order}
        else:
            _share_progress_bar_lock()
            with ThreadPoolExecutor(threads, thread_name_prefix="mtl-data") as pool:
                done = dict(zip(order, pool.map(have, order)))
    return {name: done[name] for name in names}


PREPARE_THREADS = 4


def _share_progress_bar_lock() -> None:
    """Give tqdm its class lock before threads read data. `datasets` reads files through tqdm's
    `thread_map`, which creates the lock when there is none and deletes it when done: another
    thread's bar then fails with "'tqdm' object has no attribute '_lock'" (seen with 64 tasks).
    With a lock in place, `thread_map` puts it back instead."""
    from tqdm.std import tqdm

    tqdm.get_lock()


def _tokenizer_hash(tokenizer) -> str | None:
    from datasets.fingerprint import Hasher

    return Hasher.hash(tokenizer) if tokenizer is not None else None


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container or Ray may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _prepare_task(spec, name: str, tokenizer, encoding: str, splits, limit: int | None,
                  raw: list[RawSplit] | None = None, processes: int = 1) -> TaskData:
    task = spec.tasks[name]
    checked = check_task_data(spec, name, raw)
    ctx = task_context(spec, name, tokenizer, encoding, checked.labels)
    data = TaskData(name, task.type, checked.labels, checked)
    for split in splits:
        if split in checked.splits:
            if limit is not None and split != "train":
                checked.splits[split] = checked.splits[split][:limit]
            data.encoded[split] = encode_split(checked.splits[split], registry.get(task.type), ctx,
                                               processes=processes)
    return data


def cache_key(spec, name: str, tokenizer, encoding: str, splits, limit: int | None,
              raw: list[RawSplit] | None, *, tokenizer_hash: str | None = None) -> dict:
    """Everything a task's prepared data is made from (see trainer.data.data_cache);
    `tokenizer_hash`: the tokenizer's, when the caller has it already."""
    task = spec.tasks[name]
    task_type = registry.get(task.type)
    ctx = task_context(spec, name)
    if raw is not None:  # a hub dataset: its own fingerprint names its content
        data = [[r.split, r.rows._fingerprint] for r in raw]
    else:
        data = file_identity(source_files(task.data, f"tasks.{name}.data"))
    return {"data": data, "data_spec": task.data.model_dump(mode="json"), "type": task.type,
            "columns": task.columns, "labels": task.labels, "bad_rows": task.bad_rows,
            "max_length": ctx.max_length, "prompt": ctx.prompt, "options": ctx.options.model_dump(mode="json"),
            "tokenizer": tokenizer_hash or _tokenizer_hash(tokenizer), "encoding": encoding,
            "splits": list(splits), "limit": limit, "code": _code_hash(task_type), "libraries": library_versions()}


def source_fingerprint(parts: dict) -> str:
    """The cache key's parts without where a node keeps things: each data file's content hash (past
    the hashing limit its size: a copy's modification time differs), and not the code's identity,
    whose paths differ where a job's package is unpacked per node, nor the tokenizer's hash, which
    may hold the path of its files in a node's hub cache (data_signature compares tokens instead)."""
    content = [list(entry[1:2]) for entry in parts["data"]]  # [path, sha] -> [sha]; [path, size, mtime] -> [size]
    return fingerprint({**{k: v for k, v in parts.items() if k not in ("code", "tokenizer")}, "data": content})


def token_sample(features, count: int = 32) -> str:
    """A hash of the token ids of up to `count` features spread over a split: tokenizers that differ
    between nodes encode them differently, at the cost of reading `count` rows."""
    n = len(features)
    picked = sorted({i * n // count for i in range(count)}) if n > count else list(range(n))
    # Through Arrow: a Column of datasets is hashed by its repr, which shows its first rows only.
    return fingerprint(features.with_format("arrow")[picked]["input_ids"].to_pylist() if picked else [])


def data_signature(tasks: dict[str, TaskData]) -> dict:
    """task -> what every rank must agree on: the data's identity (content and settings,
    source_fingerprint), its prepared counts and a sample of its token ids (trainer.versions.agreement)."""
    return {name: {"source": data.source, "labels": list(data.labels),
                   "rows": {split: enc.rows for split, enc in data.encoded.items()},
                   "features": {split: len(enc.features) for split, enc in data.encoded.items()},
                   "tokens": {split: token_sample(enc.features) for split, enc in data.encoded.items()}}
            for name, data in tasks.items()}


def _code_hash(task_type) -> str:
    """The hash of the code a task type runs, once per type in a process (the code it runs does
    not change under it; hashing its files again for each of hundreds of tasks took 1 ms a task)."""
    known = CODE_HASHES.get(id(task_type))
    if known is None or known[0] is not task_type:
        known = CODE_HASHES[id(task_type)] = (task_type, fingerprint(file_identity(code_files(task_type))))
    return known[1]


CODE_HASHES: dict[int, tuple[object, str]] = {}  # id -> (the task type, kept so that its id is not reused; its hash)


def code_files(task_type) -> list[str]:
    """The code that reads, checks, encodes and stores rows, the task type's own included: a change
    to any of it is a new cache entry."""
    here = Path(__file__).parent
    files = [str(here / f) for f in ("read_data.py", "check_encode.py", "task_data.py", "data_cache.py")]
    files += glob.glob(str(here.parent / "tasks" / "*.py"))
    for fn in (task_type.check_row, task_type.encode, task_type.reference):
        source = inspect.getsourcefile(fn)
        if source and os.path.exists(source):
            files.append(source)
    return sorted(set(files))


def _store_task(data: TaskData, folder: Path) -> None:
    """The checked rows and reports as JSON, the features as `datasets` folders (Arrow): an entry is
    read back as data, never unpickled, since anyone who can write to the cache folder could plant it.
    A value JSON cannot hold (bytes, a date) raises TypeError, a cycle ValueError: DataCache then
    keeps no entry, and the run goes on with the data it built."""
    import datasets

    datasets.disable_progress_bars()
    text = json.dumps(_task_json(data))  # one shot, in C: json.dump to a file runs the pure-Python encoder
    (folder / "checked.json").write_text(text, encoding="utf-8")
    for split, enc in data.encoded.items():
        enc.features.save_to_disk(str(folder / split))


def _load_task(folder: Path) -> TaskData:
    import datasets

    stored = json.loads((folder / "checked.json").read_text(encoding="utf-8"))
    data = _task_from_json(stored)
    data.encoded = {split: EncodedSplit(datasets.load_from_disk(str(folder / split)), rows, truncated)
                    for split, (rows, truncated) in stored["encoded"].items()}
    return data


def _task_json(data: TaskData) -> dict:
    """A task's checked data as JSON values. Rows need no conversion: they come from Arrow's
    `to_list` (str, numbers, bool, None, lists, dicts with str keys), which JSON holds exactly."""
    checked = data.checked
    bad = {split: {"origin": b.origin, "total": b.total, "reasons": dict(b.reasons), "rows": b.rows}
           for split, b in checked.bad.items()}
    return {"name": data.name, "type": data.type, "labels": list(data.labels),
            "checked": {"name": checked.name, "type": checked.type, "labels": list(checked.labels),
                        "splits": checked.splits, "bad": bad},
            "encoded": {split: [e.rows, e.truncated] for split, e in data.encoded.items()}}


def _task_from_json(stored: dict) -> TaskData:
    """The inverse of `_task_json`, with the types JSON drops put back (label tuples, Counters;
    JSON objects keep their order, so `most_common` breaks ties as it did before)."""
    c = stored["checked"]
    bad = {split: BadRows(b["origin"], b["total"], Counter(b["reasons"]), b["rows"]) for split, b in c["bad"].items()}
    checked = CheckedTask(c["name"], c["type"], tuple(c["labels"]), c["splits"], bad)
    return TaskData(stored["name"], stored["type"], tuple(stored["labels"]), checked)


@dataclass
class PaddingStats:
    micro_batches: int
    real_tokens: int
    padded_tokens: int

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


def epoch_padding(lengths: np.ndarray, *, rank: int, world: int, seed: int, task: str,
                  rows: int | None, max_tokens: int | None, pool: int, by_length: bool) -> PaddingStats:
    """Real vs. padded tokens of one epoch of one rank's micro-batches (what the loop would see)."""
    idx = shard_indices(len(lengths), rank, world, seed, task_salt(task), 0)
    batches = group_micro_batches(idx, lengths, np.random.default_rng(seed), rows=rows, max_tokens=max_tokens,
                                  pool=pool, by_length=by_length)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return PaddingStats(len(batches), real, padded)
