"""`mtl eval`: evaluate committed versions on a held-out split, side by side, beside trivial baselines.

Evaluation reads versions, never a live run. Results are written per version and split
(`<experiment>/evals/<version>/<split>.json`), baselines once per split
(`<experiment>/evals/baselines/<split>.json`), so any version can be (re)evaluated later
without overwriting another's results.
"""

from __future__ import annotations

from trainer.inference import score_version
from trainer.versions import UNTRAINED, open_storage, pick_version


def evaluate_version(spec, *, version: str = "latest", split: str = "test", baselines: bool = True) -> dict:
    """One version of the job's experiment (its storage and name) evaluated; see evaluate_experiment."""
    report = evaluate_experiment(open_storage(spec.storage), spec.name, versions=[version], split=split,
                                 baselines=baselines)
    chosen = report["versions"][0]
    return {"version": chosen, "split": split, "results": report["results"][chosen], "baselines": report["baselines"]}


def evaluate_experiment(storage, name: str, *, versions: list[str], split: str = "test", baselines: bool = True,
                        tasks: list[str] | None = None, limit: int | None = None) -> dict:
    """Scores versions of experiment `name` on `split` of the data their own job names (labels,
    prompts and options as each was trained), beside the trivial baselines. A version is named
    as `pick_version` reads it, or `untrained`: the run's starting model, with the settings of
    the latest version. `tasks` and `limit` (the first N rows of the split) make a quicker look;
    each version's results go to evals/<version>/<split>.json, a partial look's to
    evals/<version>/<split>-partial.json so it never passes for the whole split's."""
    report = {"split": split, "versions": [], "results": {}, "baselines": {}, "parameters": {}}
    suffix = "-partial" if tasks or limit is not None else ""
    for asked in dict.fromkeys(versions):
        chosen = pick_version(storage, name, "latest" if asked == UNTRAINED else asked)
        results, base, parameters = score_version(storage, name, chosen, split, untrained=asked == UNTRAINED,
                                                  baselines=baselines and not report["baselines"], tasks=tasks,
                                                  limit=limit)
        label = UNTRAINED if asked == UNTRAINED else chosen
        report["parameters"][label] = parameters
        storage.write_json(f"{name}/evals/{label}/{split}{suffix}.json", results)
        report["versions"].append(label)
        report["results"][label] = results
        if base:
            storage.write_json(f"{name}/evals/baselines/{split}{suffix}.json", base)
            report["baselines"] = base
    return report


def evaluate_on_cluster(address: str | None, storage, name: str, *, gpus: float | None = None, cpus: float = 1.0,
                        **options) -> dict:
    """evaluate_experiment as a Ray task on a cluster (or in this process's Ray), so it runs where
    the GPUs are and the machine that asked stays free. `gpus`: what the task reserves (default:
    one when the cluster has GPUs). Storage and the version's data must be reachable from the
    cluster's nodes, as for training. The report says on which node it ran."""
    import ray

    from launcher.run import ray_session

    with ray_session(address):
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_evaluate_in_task)
        return ray.get(task.remote(storage, name, options))


def _evaluate_in_task(storage, name: str, options: dict) -> dict:
    import ray

    from trainer.reporting import quiet_libraries

    quiet_libraries()
    report = evaluate_experiment(storage, name, **options)
    return {**report, "node": ray.get_runtime_context().get_node_id()}


def format_table(report: dict) -> str:
    """One row per task and metric; one column per version, then the baseline."""
    versions = report["versions"]
    width = max(10, *(len(v) + 2 for v in versions))
    lines = [f"{report['split']} split",
             f"{'task':<12}{'metric':<13}" + "".join(f"{v:>{width}}" for v in versions) + f"{'baseline':>10}  baseline is"]
    first = report["results"][versions[0]]
    for task, r in first.items():
        base = report["baselines"].get(task, {})
        for metric in r["metrics"]:
            cells = ""
            for v in versions:
                value = report["results"][v].get(task, {}).get("metrics", {}).get(metric)
                cells += f"{'-' if value is None else f'{value:.3f}':>{width}}"
            b = base.get("metrics", {}).get(metric)
            lines.append(f"{task:<12}{metric:<13}{cells}{'' if b is None else f'{b:>10.3f}':>10}"
                         f"  {base.get('baseline', '')}")
    return "\n".join(lines)
