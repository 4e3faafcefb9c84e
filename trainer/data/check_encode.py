"""From raw splits to checked rows to model features, with counts of everything dropped.

`check_task` maps file columns onto the task type's fields, checks every row (missing or
empty fields, then the type's own check, e.g. a QA answer outside its context or a label
unseen in train), and applies the bad-row policy. `encode_split` turns checked rows into
features with the task type's encoder and records truncation and lengths.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace

from trainer.data.read_data import ROW, RawSplit
from trainer.errors import DataError, did_you_mean
from trainer.tasks import TaskContext, TaskType, label_text

EXAMPLE_ROWS = 5  # row numbers quoted per reason in a report


@dataclass
class BadRows:
    origin: str
    total: int = 0
    reasons: Counter = field(default_factory=Counter)
    rows: dict[str, list[int]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def add(self, reason: str, row: int) -> None:
        self.reasons[reason] += 1
        self.rows.setdefault(reason, [])
        if len(self.rows[reason]) < EXAMPLE_ROWS:
            self.rows[reason].append(row)

    def summary(self) -> str:
        parts = [f"{n} {reason} (rows {', '.join(map(str, self.rows[reason]))}{', ...' if n > EXAMPLE_ROWS else ''})"
                 for reason, n in self.reasons.most_common()]
        return f"{self.count} of {self.total} rows skipped: " + "; ".join(parts)


@dataclass
class CheckedTask:
    name: str
    type: str
    labels: tuple[str, ...]
    splits: dict[str, list[dict]]  # split -> rows holding the task fields + __row__
    bad: dict[str, BadRows]


def _columns_for(raw: RawSplit, task: str, task_type: TaskType, columns: dict[str, str]) -> dict[str, str]:
    """field -> column for this split; a missing required (or explicitly mapped) column is an error."""
    present = set(raw.rows.column_names) - {ROW}
    mapping = {}
    for name in task_type.fields:
        column = columns.get(name, name)
        if column in present:
            mapping[name] = column
        elif name in task_type.required or name in columns:
            hint = f" — map it with tasks.{task}.columns.{name}" if name not in columns else ""
            raise DataError(f"{raw.field} ({raw.origin}): column '{column}' (field '{name}') not found"
                            f"{did_you_mean(column, present)}; columns are: {', '.join(sorted(present))}{hint}")
    return mapping


def _empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, (list, dict)) and not value)


def _check_split(raw: RawSplit, task: str, task_type: TaskType, columns: dict[str, str],
                 ctx: TaskContext, policy: str) -> tuple[list[dict], BadRows]:
    mapping = _columns_for(raw, task, task_type, columns)
    names = {name: class_label_names(raw, column) for name, column in mapping.items()}
    bad = BadRows(origin=raw.origin, total=len(raw.rows))
    kept = []
    for source in raw.rows.to_list():  # one conversion of the table; row by row is ~10x slower
        row = {name: source[column] for name, column in mapping.items()}
        for name, values in names.items():  # ClassLabel ints -> their names (-1, "no label", -> None)
            if values is not None and row[name] is not None:
                row[name] = values[row[name]] if 0 <= row[name] < len(values) else None
        row[ROW] = source[ROW]
        problem = next((f"empty '{name}' (column '{mapping[name]}' is null or blank)" for name in task_type.required
                        if _empty(row[name])), None)
        if problem is None:
            problem = task_type.check_row(row, ctx)
        if problem is None:
            kept.append(row)
            continue
        if policy == "error":
            raise DataError(f"{raw.field} ({raw.origin}): row {row[ROW]}: {problem} "
                            f"(set tasks.{task}.bad_rows: skip to skip such rows)")
        bad.add(_reason(problem), row[ROW])
    if not kept:
        detail = f": {bad.summary()}" if bad.count else ""
        raise DataError(f"{raw.field} ({raw.origin}): the {raw.split} split of task '{task}' has no usable rows{detail}")
    return kept, bad


def _reason(problem: str) -> str:
    """Group messages by kind: "unknown label 'x' (...)" -> "unknown label 'x'", "answer not in ...: '…'" -> its head."""
    return problem.split(" (")[0].split(": ")[0]


def class_label_names(raw: RawSplit, column: str) -> list[str] | None:
    """The names of a `datasets.ClassLabel` column (hub datasets store labels as their index)."""
    import datasets

    feature = (getattr(raw.rows, "features", None) or {}).get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def infer_labels(rows: list[dict]) -> tuple[str, ...]:
    values = {r["label"] for r in rows}
    try:  # numeric labels sort as numbers (2 before 10)
        return tuple(sorted(values, key=float))
    except ValueError:
        return tuple(sorted(values))


def check_task(task: str, task_type: TaskType, raw_splits: list[RawSplit], columns: dict[str, str],
               labels: list[str] | None, ctx: TaskContext, policy: str) -> CheckedTask:
    """Check every split; train first, since it fixes the label set the others are checked against."""
    if not any(r.split == "train" for r in raw_splits):
        raise DataError(f"tasks.{task}.data: no train split")
    fixed = tuple(label_text(x) for x in labels) if labels else ()
    splits, bad = {}, {}
    for raw in raw_splits:
        split_ctx = _with_labels(ctx, fixed)
        splits[raw.split], bad[raw.split] = _check_split(raw, task, task_type, columns, split_ctx, policy)
        if raw.split == "train" and task_type.has_labels and not fixed:
            # A ClassLabel column gives the label set and its order; otherwise train's values, sorted.
            fixed = tuple(class_label_names(raw, columns.get("label", "label")) or infer_labels(splits["train"]))
            if len(fixed) < 2:
                raise DataError(f"{raw.field} ({raw.origin}): task '{task}' has a single label "
                                f"'{fixed[0]}' in train; classification needs at least two")
            _refuse_labels_like_scores(raw, task, fixed, len(splits["train"]))
    return CheckedTask(task, task_type.name, fixed if task_type.has_labels else (), splits, bad)


def _with_labels(ctx: TaskContext, labels: tuple[str, ...]) -> TaskContext:
    return replace(ctx, labels=labels)


MOST = 0.5  # more distinct labels than this share of the train rows: not classes


def _refuse_labels_like_scores(raw: RawSplit, task: str, labels: tuple[str, ...], rows: int) -> None:
    """Classes repeat; a label column with nearly as many values as rows holds scores or ids."""
    if len(labels) > 2 and len(labels) > MOST * rows:
        shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
        raise DataError(f"{raw.field} ({raw.origin}): task '{task}' has {len(labels)} distinct labels in {rows} "
                        f"train rows ({shown}): that looks like scores or ids, not classes. Map them to classes in "
                        f"the data, or name the classes with tasks.{task}.labels")


@dataclass
class EncodedSplit:
    features: object  # datasets.Dataset; every feature has input_ids and `length`
    rows: int
    truncated: int


PARALLEL_MIN_ROWS = 50_000  # below, starting processes costs about what they save


def encode_split(rows: list[dict], task_type: TaskType, ctx: TaskContext, chunk: int = 1000,
                 processes: int = 1) -> EncodedSplit:
    """The rows' features, encoded `chunk` rows at a time; a split of PARALLEL_MIN_ROWS rows or more
    on `processes` processes (see `_encode_in_processes`), in the same order."""
    batches = [rows[start:start + chunk] for start in range(0, len(rows), chunk)]
    if processes > 1 and len(rows) >= PARALLEL_MIN_ROWS:
        encoded = _encode_in_processes(batches, task_type, ctx, processes)
    else:
        encoded = (_encode_chunk(batch, task_type, ctx) for batch in batches)
    columns: dict[str, list] = {}
    truncated = 0
    for feats, cut in encoded:
        truncated += cut
        for key, values in feats.items():
            columns.setdefault(key, []).extend(values)
    columns["length"] = [len(ids) for ids in columns["input_ids"]]
    return EncodedSplit(dataset_from_columns(columns), len(rows), truncated)


def dataset_from_columns(columns: dict[str, list]):
    """`datasets.Dataset.from_dict(columns)` (the same Arrow types and features), with a fingerprint
    of its own: from_dict hashes every value to make one, 14 of the 19 ms it took for a split of
    300 rows. Nothing here is cached by a Dataset's fingerprint (trainer.data.data_cache keys by content)."""
    import datasets
    from datasets.arrow_writer import OptimizedTypedSequence
    from datasets.table import InMemoryTable

    typed = {col: OptimizedTypedSequence(values, col=col) for col, values in columns.items()}
    table = InMemoryTable.from_pydict(mapping=typed)
    features = datasets.Features({col: seq.get_inferred_type() for col, seq in typed.items()})
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=uuid.uuid4().hex)


def _encode_chunk(batch: list[dict], task_type: TaskType, ctx: TaskContext) -> tuple[dict, int]:
    feats, cut = task_type.encode(batch, ctx)
    if "example_id" not in feats:  # one feature per row: its id is the row's number
        feats["example_id"] = [r[ROW] for r in batch]
    return feats, cut


_forked: tuple | None = None  # (task type, context) in a process forked by _encode_in_processes


def _remember(task_type: TaskType, ctx: TaskContext) -> None:
    global _forked
    _forked = (task_type, ctx)


def _encode_forked(batch: list[dict]) -> tuple[dict, int]:
    return _encode_chunk(batch, *_forked)


def _encode_in_processes(batches: list[list[dict]], task_type: TaskType, ctx: TaskContext, processes: int):
    """Each chunk encoded in one of `processes` forked processes (what `datasets.map(num_proc=...)`
    does): the row checks and the tokenizer's Python side hold the GIL, so threads would not help.

    Forked, the processes have the task type and its tokenizer without pickling them, and need no
    imports. A fast tokenizer that already ran on threads turns its threads off in a forked child,
    with a warning per child; TOKENIZERS_PARALLELISM=false says so first, and each process then
    encodes on one core."""
    import multiprocessing

    quiet = "TOKENIZERS_PARALLELISM" not in os.environ
    if quiet:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(min(processes, len(batches)), initializer=_remember,
                                                        initargs=(task_type, ctx))
    finally:
        if quiet:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
    with pool:
        return pool.map(_encode_forked, batches, chunksize=max(1, len(batches) // (4 * processes)))
