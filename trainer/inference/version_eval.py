"""Scoring a committed version on a held-out split, in one process: `mtl eval` (launcher.evaluate),
`mtl baselines`, and validation as a Ray task beside a run (trainer.evaluation.background_validation).
"""

from __future__ import annotations

import tempfile
from pathlib import Path


from trainer.errors import UserError
from trainer.inference.devices import helper_device
from trainer.spec import JobSpec


def score_version(storage, name: str, chosen: str, split: str, *, untrained: bool, baselines: bool,
                  tasks: list[str] | None = None, limit: int | None = None) -> tuple[dict, dict, int]:
    """One committed version (or, untrained, the model its run started from) scored on `split`
    of the data its own job names, with the labels, prompts and options it was trained with, in
    this process (a GPU where there is one). Returns ({task: {metrics, rows, samples}}, the
    trivial baselines' {task: {baseline, metrics}} if asked, the model's parameter count)."""
    from trainer.data import prepare_tasks
    from trainer.evaluation import baseline_metrics, build_eval_set, evaluate_task
    from trainer.inference.version_io import load_from_storage

    with tempfile.TemporaryDirectory(prefix="mtl-eval-") as tmp:
        loaded = load_from_storage(storage, name, chosen, Path(tmp) / chosen, untrained=untrained)
    device = helper_device()  # a GPU where the command runs, or one its Ray task reserved
    loaded.model.to(device)
    trained = JobSpec.model_validate(loaded.job)  # the version's own resolved job
    known = loaded.manifest["tasks"]
    unknown = [t for t in tasks or () if t not in known]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; {chosen} knows: {', '.join(known)}")
    for task, meta in known.items():  # the label set and order the version was trained with, not today's file's
        if meta.get("labels"):
            trained.tasks[task].labels = list(meta["labels"])
    encoding = loaded.manifest["encoding"]
    prepared = prepare_tasks(trained, loaded.tokenizer, encoding, splits=(split,), tasks=tasks, limit=limit)
    results, base = {}, {}
    for task, data in prepared.items():
        if split not in data.encoded:
            continue
        es = build_eval_set(trained, task, data, loaded.tokenizer, encoding, split)
        result = evaluate_task(loaded.model, es, rank=0, world=1, pad_id=loaded.tokenizer.pad_token_id,
                               batch_size=trained.train.eval_batch_size or trained.train.micro_batch_size,
                               encoding=encoding, synced=False, device=device)
        results[task] = {"metrics": result.metrics, "rows": len(result.predictions), "samples": result.samples}
        if baselines and es.task_type.baseline is not None:
            base[task] = {"baseline": es.task_type.baseline_name,
                          "metrics": baseline_metrics(es, data.checked.splits["train"])}
    return results, base, sum(p.numel() for p in loaded.model.parameters())
