"""The task-type registry: a task type is one frozen record of plain functions.

A type declares its fields (what `columns` maps file columns onto), which model kinds it
supports, its metrics and options, how a raw row is checked and normalised, and how a
batch of rows becomes model features for each model encoding. Adding a type is one
`register(TaskType(...))` call; nothing in the loop changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from trainer.errors import SpecError, did_you_mean


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TaskContext:
    """What encoding a task needs, as plain values (built by the entry code from the job)."""

    task: str
    tokenizer: Any
    encoding: str  # "heads" | "causal" | "seq2seq"
    max_length: int
    prompt: str
    labels: tuple[str, ...] = ()
    options: Any = None

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


# check_row(row, ctx) -> problem or None; may normalise the row in place.
# make_head(hidden_size, num_labels) -> nn.Module whose forward(hidden, batch) gives (loss, logits).
# decode(logits, batch, rows_by_id, ctx) -> [(example_id, score, prediction)] per feature (heads models).
RowCheck = Callable[[dict, TaskContext], "str | None"]
# encode(rows, ctx) -> (features: dict of equal-length lists, truncated: rows whose input was cut)
Encode = Callable[[list[dict], TaskContext], "tuple[dict[str, list], int]"]


@dataclass(frozen=True)
class TaskType:
    name: str
    fields: tuple[str, ...]
    required: tuple[str, ...]
    prompt_fields: tuple[str, ...]  # what a prompt may show: the model's inputs, never the answer
    model_kinds: tuple[str, ...]
    default_metrics: tuple[str, ...]
    allowed_metrics: tuple[str, ...]
    default_prompt: str
    check_row: RowCheck
    encode: Encode
    reference: Callable[[dict], Any] = lambda row: None  # the gold answer a metric compares with
    make_head: Callable[[int, int], Any] | None = None  # None: no heads-model support
    decode: Callable[..., list] | None = None
    text2text_eval: str = "generate"  # generate | rank (score each label as the target)
    # baseline(train_rows) -> predict(row): a trivial predictor that results are compared with
    baseline: Callable[[list[dict]], Callable[[dict], Any]] | None = None
    baseline_name: str = ""
    options_model: type[BaseModel] = NoOptions
    has_labels: bool = False  # a label set is inferred from train and stored with the model
    description: str = field(default="", compare=False)


_REGISTRY: dict[str, TaskType] = {}


def register(task_type: TaskType) -> TaskType:
    if task_type.name in _REGISTRY:
        raise ValueError(f"task type '{task_type.name}' is already registered")
    _REGISTRY[task_type.name] = task_type
    return task_type


def get(name: str) -> TaskType:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError("", f"unknown task type '{name}'{did_you_mean(name, _REGISTRY)} "
                            f"(registered: {', '.join(sorted(_REGISTRY))})") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def suggest(word: str, choices) -> str:
    return did_you_mean(word, choices)

