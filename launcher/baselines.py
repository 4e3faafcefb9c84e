"""`mtl baselines JOB`: the multitask model against one single-task model per task.

Each single-task run is the job with that task alone: the same model, hyper-parameters,
micro-batch shapes, DeepSpeed config and workers, for as many steps as it takes to see as many
of the task's examples as the multitask run's latest version saw (its own record, `seen`).
Each trains like any job (embedded Ray, or a cluster with --address) as the experiment
`<name>--<task>` beside the multitask one; running the command again resumes or reuses them.
Every model is then scored on the same split, and the table — per task and metric, multitask
against single-task, the difference, the average of the primary metrics, and the cost of N
models against one (parameters, storage of a version, training time) — is printed and saved to
`<experiment>/baselines/table.{json,md}`, which `mtl report` includes.
"""

from __future__ import annotations

import math

from launcher.evaluate import evaluate_experiment
from launcher.jobfile import parse_job
from trainer.errors import UserError
from trainer.spec import JobSpec
from trainer.versions import Storage, open_storage, pick_version


def single_task_spec(spec: JobSpec, task: str, examples: float) -> JobSpec:
    """The job with `task` alone, for enough steps to see `examples` of its rows."""
    job = spec.model_dump(mode="json")
    job["name"] = f"{spec.name}--{task}"
    job["tasks"] = {task: job["tasks"][task]}
    job["mixture"] = {"strategy": "uniform"}  # one task: nothing to mix
    rows = spec.tasks[task].micro_batch_size or spec.train.micro_batch_size  # a token budget (max_tokens) varies
    per_step = rows * spec.train.micro_batches_per_step * spec.scaling.max_workers
    steps = max(1, math.ceil(examples / per_step))
    job["train"]["steps"] = steps
    job["train"]["warmup_steps"] = min(spec.train.warmup_steps, steps - 1)
    return parse_job(job, source=f"mtl baselines ({task})")


def run_baselines(spec: JobSpec, *, split: str = "test", address: str | None = None) -> dict:
    from launcher.run import train

    storage = open_storage(spec.storage)
    latest = pick_version(storage, spec.name, "latest")  # the multitask run must exist first
    state = storage.read_json(f"{spec.name}/{latest}/trainer_state.json") or {}
    seen = state.get("seen", {})
    missing = [t for t in spec.tasks if not seen.get(t, {}).get("examples")]
    if missing:
        raise UserError(f"{spec.name}/{latest} saw no examples of {', '.join(missing)}: train the multitask job "
                        f"further before comparing it with single-task runs")
    print(f"[mtl] scoring {spec.name}/{latest} on the {split} split", flush=True)
    multi = evaluate_experiment(storage, spec.name, versions=[latest], split=split)
    table = {"split": split, "multitask": {"experiment": spec.name, "version": latest,
                                           **_cost(storage, spec.name, latest, multi, state)},
             "tasks": {}, "single": {}, "baselines": multi["baselines"]}
    for task in spec.tasks:
        single = single_task_spec(spec, task, seen[task]["examples"])
        print(f"[mtl] single-task run for {task}: '{single.name}', {single.train.steps} steps "
              f"(~{seen[task]['examples']:.0f} examples, as the multitask run saw)", flush=True)
        train(single, address=address, on_change="allow")  # a longer multitask run asks for more steps
        version = pick_version(storage, single.name, "latest")
        print(f"[mtl] scoring {single.name}/{version} on the {split} split", flush=True)
        report = evaluate_experiment(storage, single.name, versions=[version], split=split, baselines=False)
        single_state = storage.read_json(f"{single.name}/{version}/trainer_state.json") or {}
        table["single"][task] = {"experiment": single.name, "version": version, "steps": single.train.steps,
                                 **_cost(storage, single.name, version, report, single_state)}
        ours = multi["results"][latest].get(task, {}).get("metrics", {})
        theirs = report["results"][version].get(task, {}).get("metrics", {})
        table["tasks"][task] = {m: {"multitask": ours[m], "single": theirs[m], "difference": ours[m] - theirs[m]}
                                for m in ours if m in theirs}
    table["primary"] = {t: _primary(spec, t) for t in spec.tasks}
    storage.write_json(f"{spec.name}/baselines/table.json", table)
    text = format_table(table)
    storage.write_text(f"{spec.name}/baselines/table.md", text)
    return table


def _cost(storage: Storage, name: str, version: str, report: dict, state: dict) -> dict:
    """Parameters (from the evaluation), bytes on storage and training time (trainer_state) of a version."""
    return {"parameters": report.get("parameters", {}).get(version), "bytes": storage.size(f"{name}/{version}"),
            "train_s": state.get("train_s")}


def _primary(spec: JobSpec, task: str) -> str:
    from trainer.data import primary_metric, task_metrics

    return primary_metric(task_metrics(spec, task))


def format_table(table: dict) -> str:
    """Markdown: per task and metric, multitask | single-task | difference; the average; the cost."""
    lines = [f"{table['split']} split: multitask {table['multitask']['experiment']}/{table['multitask']['version']} "
             f"against one single-task run per task", "",
             "| task | metric | multitask | single-task | difference |", "|---|---|---|---|---|"]
    for task, metrics in table["tasks"].items():
        for metric, v in metrics.items():
            mark = " (primary)" if metric == table["primary"].get(task) else ""
            lines.append(f"| {task} | {metric}{mark} | {v['multitask']:.3f} | {v['single']:.3f} | "
                         f"{v['difference']:+.3f} |")
    prim = [table["tasks"][t][m] for t, m in table["primary"].items() if m in table["tasks"].get(t, {})]
    if prim:
        avg = {k: sum(p[k] for p in prim) / len(prim) for k in ("multitask", "single", "difference")}
        lines.append(f"| average | primary metrics | {avg['multitask']:.3f} | {avg['single']:.3f} | "
                     f"{avg['difference']:+.3f} |")
    multi, singles = table["multitask"], list(table["single"].values())

    def total(key: str):
        values = [s.get(key) for s in singles]
        return None if any(v is None for v in values) else sum(values)

    lines += ["", f"| cost | multitask (1 model) | single-task ({len(singles)} models) |", "|---|---|---|",
              f"| parameters | {_n(multi['parameters'])} | {_n(total('parameters'))} |",
              f"| storage of a version | {_bytes(multi['bytes'])} | {_bytes(total('bytes'))} |",
              f"| training time | {_seconds(multi['train_s'])} | {_seconds(total('train_s'))} |"]
    return "\n".join(lines) + "\n"


def _n(value) -> str:
    return "?" if value is None else f"{value / 1e6:.2f}M"


def _bytes(value) -> str:
    return "?" if value is None else f"{value / 2 ** 20:.1f} MiB"


def _seconds(value) -> str:
    return "?" if value is None else f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
