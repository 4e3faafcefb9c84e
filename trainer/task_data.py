"""Entry-level data preparation: reads the job, builds every task's checked and encoded
splits. This is the one place where the job spec meets the data components (which take
plain arguments)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trainer.batching import group_micro_batches, shard_indices, task_salt
from trainer.read_data import read_splits
from trainer.check_encode import CheckedTask, EncodedSplit, check_task, encode_split
from trainer.tasks import registry
from trainer.tasks.registry import TaskContext


@dataclass
class TaskData:
    name: str
    type: str
    labels: tuple[str, ...]
    checked: CheckedTask
    encoded: dict[str, EncodedSplit] = field(default_factory=dict)


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


def check_task_data(spec, name: str) -> CheckedTask:
    task = spec.tasks[name]
    raw = read_splits(name, task.data)
    return check_task(name, registry.get(task.type), raw, task.columns, task.labels,
                      task_context(spec, name), task.bad_rows)


def prepare_tasks(spec, tokenizer, encoding: str, splits=("train", "validation", "test"), *,
                  tasks: list[str] | None = None, limit: int | None = None) -> dict[str, TaskData]:
    """Each task's rows checked and encoded. `tasks`: only these; `limit`: the first N rows of
    each held-out split (train is never cut: baselines and label sets read it)."""
    out = {}
    for name in tasks or spec.tasks:
        task = spec.tasks[name]
        checked = check_task_data(spec, name)
        ctx = task_context(spec, name, tokenizer, encoding, checked.labels)
        data = TaskData(name, task.type, checked.labels, checked)
        for split in splits:
            if split in checked.splits:
                if limit is not None and split != "train":
                    checked.splits[split] = checked.splits[split][:limit]
                data.encoded[split] = encode_split(checked.splits[split], registry.get(task.type), ctx)
        out[name] = data
    return out


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
