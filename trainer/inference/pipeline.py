"""Using a trained version: one model, requests routed by task name.

    pipe = MultitaskPipeline.from_version("runs/demo")                  # latest; or version="best", a tag
    pipe("sentiment", [{"text": "A fine film."}])   -> [{"label": "positive", "score": 0.91,
                                                          "scores": {"negative": 0.09, "positive": 0.91}}]
                                                         (every label's probability)
    pipe("qa", [{"question": ..., "context": ...}])  -> [{"answer": ..., "start": 17, "end": 24, "score": ...}]
    pipe("summary", [{"source": ...}])               -> [{"text": ...}]
    pipe("summary", rows, options={"max_new_tokens": 20})   # the task's decoding options, overridden

Rows go through the version's own task settings (prompts, labels, max_length, QA windows and
generation options, as it was trained) and the same prediction code as `mtl eval`, so the two
agree on the same rows. A row needs the fields the model reads (`TaskType.prompt_fields`, the
QA context among them); answers are not needed. `check` refuses bad input before any work (a
server checks each request, then batches the rows of many).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
from pydantic import ValidationError

from trainer.data import ROW, encode_split, task_context
from trainer.errors import UserError
from trainer.evaluation import EvalSet, best_per_example, label_probabilities, predict_features
from trainer.inference.devices import helper_device
from trainer.inference.version_io import LoadedVersion, load_from_storage
from trainer.spec import JobSpec
from trainer.tasks import registry

# What a row without answers is given where the encoders expect one (it is never scored).
_PLACEHOLDERS = {
    "classification": lambda row, labels: {"label": labels[0]},
    "extractive_qa": lambda row, labels: {"answers": {"text": [row["context"][:1]], "answer_start": [0]}},
    "generation": lambda row, labels: {"target": ""},
}
# Task options a request may override: how text is decoded, never how the task was trained.
DECODING_OPTIONS = ("max_new_tokens", "num_beams")


class MultitaskPipeline:
    def __init__(self, loaded: LoadedVersion, version: str = "", device: torch.device | None = None):
        self.version = version
        self.device = device or helper_device()  # a replica with --gpus-per-replica 0 stays off the GPUs
        self.model = loaded.model.to(self.device).eval()
        self.tokenizer, self.manifest = loaded.tokenizer, loaded.manifest
        self.spec = JobSpec.model_validate(loaded.job)
        self.encoding = self.manifest["encoding"]

    @classmethod
    def from_version(cls, location, version: str = "latest") -> "MultitaskPipeline":
        """`location`: an experiment on storage (a trainer.versions.storage.Storage and a name, as a tuple)
        or its folder / URI (trainer.versions.storage.open_experiment)."""
        from trainer.versions import open_experiment, pick_version

        storage, name = location if isinstance(location, tuple) else open_experiment(location)
        chosen = pick_version(storage, name, version)
        with tempfile.TemporaryDirectory(prefix="mtl-predict-") as tmp:
            return cls(load_from_storage(storage, name, chosen, Path(tmp) / chosen), version=chosen)

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def task_type(self, task: str):
        """The registered type of one of this version's tasks; an unknown task is refused with the known ones."""
        if task not in self.manifest["tasks"]:
            raise UserError(f"unknown task '{task}'; this version knows: {', '.join(self.tasks)}")
        return registry.get(self.manifest["tasks"][task]["type"])

    def check(self, task: str, inputs: dict | list[dict]) -> list[dict]:
        """The rows, each with the fields the task reads; an unknown task or a missing field is refused."""
        task_type = self.task_type(task)
        rows = [inputs] if isinstance(inputs, dict) else list(inputs)
        needed = [f for f in task_type.prompt_fields if f in task_type.required]
        checked = []
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise UserError(f"{task}: input {number} is not an object with the fields "
                                f"{', '.join(task_type.prompt_fields)}")
            missing = [f for f in needed if not isinstance(row.get(f), str) or not row[f].strip()]
            if missing:
                raise UserError(f"{task}: input {number} lacks {', '.join(missing)} "
                                f"({task_type.name} inputs: {', '.join(task_type.prompt_fields)})")
            checked.append({f: row.get(f) for f in task_type.prompt_fields})
        return checked

    def context(self, task: str, options: dict | None = None):
        """The task's encoding context as trained, with decoding options overridden (checked like the job's)."""
        task_type = self.task_type(task)
        ctx = task_context(self.spec, task, self.tokenizer, self.encoding, tuple(self.manifest["tasks"][task]["labels"]))
        if not options:
            return ctx
        unknown = sorted(set(options) - set(DECODING_OPTIONS))
        if unknown:
            raise UserError(f"{task}: options {', '.join(unknown)} cannot be overridden; decoding options are "
                            f"{', '.join(DECODING_OPTIONS)}")
        try:
            merged = task_type.options_model.model_validate({**ctx.options.model_dump(), **options})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise UserError(f"{task}: options: {problems}") from None
        return dataclasses.replace(ctx, options=merged)

    def __call__(self, task: str, inputs: dict | list[dict], batch_size: int = 8,
                 options: dict | None = None) -> list[dict]:
        task_type = self.task_type(task)
        rows = self.check(task, inputs)
        ctx = self.context(task, options)
        prepared = [{**row, **_PLACEHOLDERS[task_type.name](row, ctx.labels), ROW: number}
                    for number, row in enumerate(rows, 1)]
        features = encode_split(prepared, task_type, ctx).features
        es = EvalSet(task, task_type, ctx, features, {r[ROW]: r for r in prepared}, [])
        every = list(range(len(features)))
        common = dict(batch_size=batch_size, pad_id=self.tokenizer.pad_token_id, encoding=self.encoding,
                      device=self.device)
        if task_type.name == "classification":  # one feature per row: every label's probability
            probs = label_probabilities(self.model, es, every, **common)
            return [_classified(probs[number], ctx.labels) for number in range(1, len(rows) + 1)]
        best = best_per_example(predict_features(self.model, es, every, **common))
        return [_result(task_type.name, prepared[i - 1], *best[i]) for i in range(1, len(rows) + 1)]


def _classified(probs: list[float], labels: tuple[str, ...]) -> dict:
    top = max(range(len(labels)), key=probs.__getitem__)
    return {"label": labels[top], "score": probs[top], "scores": dict(zip(labels, probs))}


def _result(kind: str, row: dict, score: float, prediction: str) -> dict:
    if kind == "extractive_qa":  # heads cut the span out of the context; a generated one may not be in it (-1)
        start = row["context"].find(prediction) if prediction else -1
        return {"answer": prediction, "start": start, "end": start + len(prediction) if start >= 0 else -1,
                "score": score}
    return {"text": prediction}
