"""`mtl eval`: evaluate a committed version on a held-out split, beside trivial baselines.

Evaluation reads versions, never a live run. Results are written per version and split
(`<experiment>/evals/<version>/<split>.json`), baselines once per split
(`<experiment>/evals/baselines/<split>.json`), so any version can be (re)evaluated later
without overwriting another's results.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from launcher.jobfile import parse_job
from trainer.storage import open_storage
from trainer.registry import pick_version

def evaluate_version(spec, *, version: str = "latest", split: str = "test", baselines: bool = True) -> dict:
    """The job's experiment (its storage and name) evaluated; see evaluate_experiment."""
    return evaluate_experiment(open_storage(spec.storage), spec.name, version=version, split=split,
                               baselines=baselines)


def evaluate_experiment(storage, name: str, *, version: str = "latest", split: str = "test",
                        baselines: bool = True) -> dict:
    """Scores a version of experiment `name` on `split` of the data its own job names (labels,
    prompts and options as it was trained), beside the trivial baselines."""
    from trainer.evaluation import baseline_metrics, build_eval_set, evaluate_task
    from trainer.task_data import prepare_tasks
    from trainer.version_io import load_from_storage

    chosen = pick_version(storage, name, version)
    with tempfile.TemporaryDirectory(prefix="mtl-eval-") as tmp:
        local = Path(tmp) / chosen
        loaded = load_from_storage(storage, name, chosen, local)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU where the command runs has one
    loaded.model.to(device)
    trained = parse_job(loaded.job, source=f"{chosen}/job.yaml")
    encoding = loaded.manifest["encoding"]
    tasks = prepare_tasks(trained, loaded.tokenizer, encoding, splits=(split,))
    results, base = {}, {}
    for task, data in tasks.items():
        if split not in data.encoded:
            continue
        es = build_eval_set(trained, task, data, loaded.tokenizer, encoding, split)
        result = evaluate_task(loaded.model, es, rank=0, world=1, pad_id=loaded.tokenizer.pad_token_id,
                               batch_size=trained.train.eval_batch_size or trained.train.micro_batch_size,
                               encoding=encoding, synced=False, device=device)
        results[task] = {"metrics": result.metrics, "samples": result.samples}
        if baselines and es.task_type.baseline is not None:
            base[task] = {"baseline": es.task_type.baseline_name,
                          "metrics": baseline_metrics(es, data.checked.splits["train"])}
    storage.write_json(f"{name}/evals/{chosen}/{split}.json", results)
    if base:
        storage.write_json(f"{name}/evals/baselines/{split}.json", base)
    return {"version": chosen, "split": split, "results": results, "baselines": base}


def format_table(report: dict) -> str:
    lines = [f"{report['split']} split, version {report['version']}",
             f"{'task':<12}{'metric':<13}{'model':>8}{'baseline':>10}  baseline is"]
    for task, r in report["results"].items():
        base = report["baselines"].get(task, {})
        for metric, value in r["metrics"].items():
            b = base.get("metrics", {}).get(metric)
            lines.append(f"{task:<12}{metric:<13}{value:>8.3f}{'' if b is None else f'{b:>10.3f}':>10}"
                         f"  {base.get('baseline', '')}")
    return "\n".join(lines)
