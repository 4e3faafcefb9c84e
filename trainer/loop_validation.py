"""Validation in the loop, and what acts on it: the scores logged and recorded, mixture
adaptation, per-task early stopping, the forgetting report of an init_from run, and stopping
at a step boundary."""

from __future__ import annotations

from trainer.data import primary_metric, task_metrics
from trainer.errors import first_line
from trainer.evaluation import build_eval_set, evaluate_task
from trainer.loop_state import Run, WorkerStopped
from trainer.reporting import CONSOLE_TASKS, say
from trainer.versions import checkpoint as ckpt
from trainer.versions import forgetting_table, version_registry


def validate_in_loop(run: Run, metrics: dict, final: bool) -> bool:
    """After a step: finished validation tasks absorbed; at a validation step (train.eval_every, and
    the last) the tasks scored into `metrics`, and early stopping, mixture adaptation and the
    forgetting report acting on the scores. Returns whether this is the run's last step (every
    task may have stopped)."""
    spec = run.spec
    if run.background is not None:
        absorb_validations(run, run.background.finished())
    due = final or (spec.train.eval_every and run.step % spec.train.eval_every == 0)
    if spec.train.validation != "loop" or not due:
        return final
    metrics.update(evaluate_all(run, "validation"))
    if run.early is not None:
        stop_lagging_tasks(run)
        final = final or all_stopped(run)
    if run.adapter is not None and not final:
        adapt_rates(run)
    if final and run.init_from is not None:
        report_forgetting(run)
    return final


def primary_scores(last_eval: dict) -> dict[str, float]:
    """Task -> its primary metric in a validation's results."""
    primary = last_eval["primary"]
    return {t: m[primary[t]] for t, m in last_eval["tasks"].items() if primary.get(t) in m}


def adapt_rates(run: Run) -> None:
    """mixture.adapt after a validation: more micro-batches for lagging tasks, fewer for saturated ones."""
    skip = set(run.early.stopped()) if run.early is not None else set()
    before = run.planner.expected_rates()
    changes = run.adapter.update(run.step, primary_scores(run.last_eval), run.planner.scales, skip | run.planner.frozen)
    for task, (scale, _) in changes.items():
        run.planner.scale(task, scale)
    if changes and run.rank == 0:
        after = run.planner.expected_rates()
        for task, (scale, why) in changes.items():
            say(f"[mtl] mixture: {task} rate {before[task]:.3f} -> {after[task]:.3f} (x{scale:.3g} of its start; {why})")


def absorb_validations(run: Run, done: dict) -> None:
    """Rank 0, train.validation: task — finished validations: logged at their version's step, the
    versions ranked in the registry; the last version's also closes an init_from run's comparison."""
    if not done:
        return
    for version, report in sorted(done.items()):
        if isinstance(report, Exception):
            say(f"[mtl] warning: the validation task of {version} failed: {first_line(report)}")
            continue
        step = ckpt.version_step(version)
        record = validation_record(run.spec, step, report)
        run.version_scores[version] = version_registry.scores_of(record, step)
        log_evaluation(run, "validation", step, report, f"{version} (Ray task)")
        if run.init_from is not None and step == run.step:
            run.last_eval = record
            report_forgetting(run)
    committed = ckpt.committed_versions(run.storage)
    if committed:
        run.storage.write_json("registry.json", version_registry.registry(committed[-1], committed, run.version_scores))


def scores_from_evals(run: Run, versions: list[str]) -> dict:
    """Scores of versions validated by a task that finished after their own trainer_state was written."""
    found = {}
    for version in versions:
        report = run.storage.read_json(f"evals/{version}/validation.json")
        if report:
            step = ckpt.version_step(version)
            found[version] = version_registry.scores_of(validation_record(run.spec, step, report), step)
    return found


def stop_lagging_tasks(run: Run) -> None:
    """Early stopping after a validation: freeze or down-weight the tasks that stopped improving."""
    last = run.last_eval
    scores = primary_scores(last)
    options = run.spec.train.early_stopping
    for task in run.early.update(run.step, scores):
        if options.action == "freeze" or task in run.planner.fixed:
            run.planner.freeze(task)
            what = "froze"
        else:
            run.planner.scale(task, run.planner.scales[task] * options.factor)
            what = f"rate x{options.factor:g}, now {run.planner.expected_rates()[task]:.3f}"
        s = run.early.state[task]
        if run.rank == 0:
            say(f"[mtl] early stopping: {task} {what} at step {run.step} (best {last['primary'][task]} "
                f"{s['best']:.4f} at step {s['best_step']}, then {s['evals_without_gain']} validations without a "
                f"gain above {run.early.min_delta:g})")
    if all_stopped(run) and run.rank == 0:
        say(f"[mtl] early stopping: every task has stopped; the run ends at step {run.step}")


def all_stopped(run: Run) -> bool:
    """Nothing is left to train: every task is frozen, or has stopped early (down-weighted ones too)."""
    return run.planner.all_frozen() or (run.early is not None and len(run.early.stopped()) == len(run.tasks))


def stop_early(run: Run, reasons: dict[str, bool]) -> None:
    """After the version at this step is committed: end here (the driver asked) or hand over to Ray."""
    name = ckpt.version_name(run.step)
    if reasons["sigterm"]:
        if run.stops.sigterm_at is not None:
            run.stops.exit_process()  # Ray's own SIGTERM exit, deferred until now
        raise WorkerStopped(f"a worker got SIGTERM at step {run.step}; {name} is written and the run "
                            f"resumes from it if train.max_failures allows")
    if run.rank == 0:
        say(f"[mtl] stopped at step {run.step} of {run.spec.train.steps} as asked; {name} is written")


def evaluate_all(run: Run, split: str) -> dict:
    spec = run.spec
    out, report, primary = {}, {}, {}
    for name, data in run.tasks.items():
        if split not in data.encoded:
            continue
        es = build_eval_set(spec, name, data, run.tokenizer, run.encoding, split)
        result = evaluate_task(run.engine.module, es, rank=run.rank, world=run.world,
                               batch_size=spec.train.eval_batch_size or spec.train.micro_batch_size,
                               pad_id=run.tokenizer.pad_token_id, encoding=run.encoding,
                               synced=run.engine.zero_optimization_stage() == 3, device=run.device)
        report[name] = {"metrics": result.metrics, "samples": result.samples}
        primary[name] = primary_metric(es.metric_names)
        out.update({f"{split}/{name}/{k}": v for k, v in result.metrics.items()})
    run.last_eval = {"step": run.step, "split": split, "tasks": {t: r["metrics"] for t, r in report.items()},
                     "primary": primary}
    if run.rank == 0:
        log_evaluation(run, split, run.step, report, f"step {run.step}")
        run.storage.write_json(f"evals/{ckpt.version_name(run.step)}/{split}.json", report)
    return out


def log_evaluation(run: Run, split: str, step: int, report: dict, label: str) -> None:
    """Rank 0: an evaluation's metrics and sample predictions to the trackers at `step`, a line per task."""
    run.trackers.scalars({f"{split}/{t}/{k}": v for t, r in report.items() for k, v in r["metrics"].items()}, step)
    for name, r in report.items():
        run.trackers.text(f"samples/{name}", "\n\n".join(f"**{s['id']}** pred: {s['prediction']} | ref: {s['reference']}"
                                                         for s in r["samples"]), step)
    if len(report) <= CONSOLE_TASKS:
        for name, r in report.items():
            say(f"[mtl] eval {split} {label} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items()))
        return
    primary = {t: primary_metric(task_metrics(run.spec, t)) for t in report}
    say(f"[mtl] eval {split} {label}: {len(report)} tasks; "
        + "; ".join(metric_spread(metric, {t: report[t]["metrics"].get(metric) for t in report if primary[t] == metric})
                    for metric in dict.fromkeys(primary.values()))
        + f" (every task's metrics: TensorBoard and evals/{ckpt.version_name(step)}/{split}.json)")


def metric_spread(metric: str, values: dict[str, float | None]) -> str:
    """'accuracy of 64 tasks: mean 0.5234, lowest t001 0.1875, highest t018 0.9375'."""
    known = {t: v for t, v in values.items() if v is not None}
    if not known:
        return f"{metric}: no values"
    low, high = min(known, key=known.get), max(known, key=known.get)
    return (f"{metric} of {len(known)} tasks: mean {sum(known.values()) / len(known):.4f}, lowest {low} "
            f"{known[low]:.4f}, highest {high} {known[high]:.4f}")


def validation_record(spec, step: int, report: dict) -> dict:
    """A validation report ({task: {metrics, samples}}) as the run keeps its last one (Run.last_eval)."""
    return {"step": step, "split": "validation", "tasks": {t: r["metrics"] for t, r in report.items()},
            "primary": {t: primary_metric(task_metrics(spec, t)) for t in report}}


def report_forgetting(run: Run) -> None:
    """At the end of a run started from a version: every task's validation metric then and now."""
    if run.rank != 0:
        return
    table = forgetting_table(run.init_from, run.last_eval.get("tasks", {}), run.step)
    say("[mtl] before and after this run:\n" + table)
    run.storage.write_json("forgetting.json", {**run.init_from, "after": run.last_eval.get("tasks", {}),
                                               "step": run.step})
