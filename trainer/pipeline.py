"""Using a trained version: one model, requests routed by task name.

    pipe = MultitaskPipeline.from_version("runs/demo")                  # latest; or version="best", a tag
    pipe("sentiment", [{"text": "A fine film."}])   -> [{"label": "positive", "score": ...}]
    pipe("qa", [{"question": ..., "context": ...}])  -> [{"answer": ..., "start": 17, "end": 24, "score": ...}]
    pipe("summary", [{"source": ...}])               -> [{"text": ...}]

Rows go through the version's own task settings (prompts, labels, max_length, QA windows and
generation options, as it was trained) and the same prediction code as `mtl eval`, so the two
agree on the same rows. A row needs the fields the model reads (`TaskType.prompt_fields`, the
QA context among them); answers are not needed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from trainer.check_encode import encode_split
from trainer.errors import UserError
from trainer.evaluation import EvalSet, best_per_example, predict_features
from trainer.read_data import ROW
from trainer.spec import JobSpec
from trainer.task_data import task_context
from trainer.tasks import registry
from trainer.version_io import LoadedVersion, load_from_storage

# What a row without answers is given where the encoders expect one (it is never scored).
_PLACEHOLDERS = {
    "classification": lambda row, labels: {"label": labels[0]},
    "extractive_qa": lambda row, labels: {"answers": {"text": [row["context"][:1]], "answer_start": [0]}},
    "generation": lambda row, labels: {"target": ""},
}


class MultitaskPipeline:
    def __init__(self, loaded: LoadedVersion, version: str = "", device: torch.device | None = None):
        self.version = version
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = loaded.model.to(self.device).eval()
        self.tokenizer, self.manifest = loaded.tokenizer, loaded.manifest
        self.spec = JobSpec.model_validate(loaded.job)
        self.encoding = self.manifest["encoding"]

    @classmethod
    def from_version(cls, location, version: str = "latest") -> "MultitaskPipeline":
        """`location`: an experiment on storage (a trainer.storage.Storage and a name, as a tuple)
        or its folder / URI (trainer.storage.open_experiment)."""
        from trainer.registry import pick_version
        from trainer.storage import open_experiment

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

    def __call__(self, task: str, inputs: dict | list[dict], batch_size: int = 8) -> list[dict]:
        task_type = self.task_type(task)
        rows = [inputs] if isinstance(inputs, dict) else list(inputs)
        labels = tuple(self.manifest["tasks"][task]["labels"])
        ctx = task_context(self.spec, task, self.tokenizer, self.encoding, labels)
        needed = [f for f in task_type.prompt_fields if f in task_type.required]
        prepared = []
        for number, row in enumerate(rows, 1):
            missing = [f for f in needed if not isinstance(row.get(f), str) or not row[f].strip()]
            if missing:
                raise UserError(f"{task}: input {number} lacks {', '.join(missing)} "
                                f"({task_type.name} inputs: {', '.join(task_type.prompt_fields)})")
            prepared.append({**{f: row.get(f) for f in task_type.prompt_fields},
                             **_PLACEHOLDERS[task_type.name](row, labels), ROW: number})
        features = encode_split(prepared, task_type, ctx).features
        es = EvalSet(task, task_type, ctx, features, {r[ROW]: r for r in prepared}, [])
        best = best_per_example(predict_features(
            self.model, es, list(range(len(features))), batch_size=batch_size, pad_id=self.tokenizer.pad_token_id,
            encoding=self.encoding, device=self.device))
        return [_result(task_type.name, prepared[i - 1], *best[i]) for i in range(1, len(prepared) + 1)]


def _result(kind: str, row: dict, score: float, prediction: str) -> dict:
    if kind == "classification":
        return {"label": prediction, "score": score}
    if kind == "extractive_qa":  # heads cut the span out of the context; a generated one may not be in it (-1)
        start = row["context"].find(prediction) if prediction else -1
        return {"answer": prediction, "start": start, "end": start + len(prediction) if start >= 0 else -1,
                "score": score}
    return {"text": prediction}
