"""Everything that can be checked before any resource starts.

The typed tree (trainer.spec) has already checked shapes, names and ranges. Here we read
what the job points at: the DeepSpeed JSON (and its agreement with the derived batch
numbers), the model folder, and every data file — columns present in every split, each
row checked by its task type, labels consistent across splits. All problems of all tasks
are collected, so one run of `mtl validate` lists everything to fix.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from trainer.data import ROW, CheckedTask, check_task_data, reading_once
from trainer.errors import UserError
from trainer.control import surgery_problem
from trainer.model import check_model, job_ds_config, zero_stage
from trainer.reporting import CONSOLE_TASKS
from trainer.spec import JobSpec
from trainer.tasks import CHARS_PER_TOKEN_BOUND
from trainer.versions import init_from, storage_problem


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tasks: dict[str, CheckedTask] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


class ValidationFailed(UserError):
    def __init__(self, report: Report):
        self.report = report
        super().__init__(f"{len(report.errors)} problem{'s' if len(report.errors) > 1 else ''} found:\n"
                         + "\n".join(f"  - {e}" for e in report.errors))


def validate_job(spec: JobSpec, *, check_files: bool = True, machine: bool = False, force: bool = False) -> Report:
    """check_files=False checks the spec and the DeepSpeed config only (no model or data files).
    machine: the workers run on this machine (the embedded default): the memory plan must fit it,
    unless `force`."""
    report = Report()
    _check_deepspeed(spec, report)
    if check_files:
        problem = storage_problem(spec.storage)
        if problem:
            report.errors.append(problem)
        _check_model(spec, report)
        with reading_once([task.data for task in spec.tasks.values()]):
            for name in spec.tasks:
                try:
                    report.tasks[name] = check_task_data(spec, name)
                except UserError as exc:
                    report.errors.append(str(exc))
        report.notes.extend(task_summary(report.tasks))
        for name, checked in report.tasks.items():
            _describe_task(spec, name, checked, report)
        report.errors.extend(_tracking_problems(spec))
        if spec.init_from is not None and not report.errors:
            report.errors.extend(_init_from_problems(spec))
        if not report.errors:
            _plan_memory(spec, report, machine, force)
        every, evals = spec.train.checkpoint_every, spec.train.eval_every
        if every and evals and every % evals:
            report.notes.append(f"train.checkpoint_every={every} is not a multiple of train.eval_every={evals}: "
                                "only versions saved at an evaluation step can be ranked best (registry.json)")
    return report


def require_valid(spec: JobSpec, *, check_files: bool = True, machine: bool = False, force: bool = False) -> Report:
    report = validate_job(spec, check_files=check_files, machine=machine, force=force)
    if not report.ok:
        raise ValidationFailed(report)
    return report


SPLITS = ("train", "validation", "test")


def task_summary(tasks: dict[str, CheckedTask]) -> list[str]:
    """The tasks on the console before a run: a table of up to CONSOLE_TASKS, counts beyond them
    (`mtl data` reports every task)."""
    if not tasks:
        return []
    missing = [name for name, c in tasks.items() if "validation" not in c.splits]
    if len(tasks) <= CONSOLE_TASKS:
        rows = [("task", "type", *SPLITS, "labels")]
        for name, c in tasks.items():
            labels = ", ".join(c.labels[:6]) + (f" (+{len(c.labels) - 6} more)" if len(c.labels) > 6 else "")
            rows.append((name, c.type, *(str(len(c.splits[s])) if s in c.splits else "-" for s in SPLITS), labels))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.rjust(w) if 2 <= i <= 4 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
                 for r in rows]
        if missing:
            lines.append(f"no validation split, so not evaluated during training: {', '.join(missing)}")
        return lines
    types = Counter(c.type for c in tasks.values())
    train = sorted(len(c.splits["train"]) for c in tasks.values())
    with_split = {s: sum(s in c.splits for c in tasks.values()) for s in ("validation", "test")}
    return [f"{len(tasks)} tasks: " + ", ".join(f"{n} {t}" for t, n in types.most_common()),
            f"  train rows per task: {train[0]:,} to {train[-1]:,} (median {train[len(train) // 2]:,}; "
            f"{sum(train):,} in all)",
            f"  with a validation split: {with_split['validation']} (the others are not evaluated during "
            f"training); with a test split: {with_split['test']}",
            "  `mtl data JOB` reports each task"]


def _describe_task(spec: JobSpec, name: str, checked: CheckedTask, report: Report) -> None:
    """What the summary table leaves out: bad rows, truncation, batch sizes that cannot work."""
    for split, bad in checked.bad.items():
        if bad.count:
            most = bad.count > bad.total / 2
            report.notes.append(f"{'warning: ' if most else ''}{name}/{split} ({bad.origin}): {bad.summary()}"
                                + ("; most of the split is left out: check the data and the task's columns and "
                                   "labels" if most else ""))
    _note_certain_truncation(spec, name, checked, report)
    rows, workers = len(checked.splits["train"]), spec.scaling.max_workers
    task = spec.tasks[name]
    batch = task.micro_batch_size or (None if task.max_tokens else spec.train.micro_batch_size)
    field = f"tasks.{name}.micro_batch_size" if task.micro_batch_size else "train.micro_batch_size"
    if rows < workers:
        report.errors.append(f"tasks.{name}: {rows} train rows cannot be shared by "
                             f"scaling.num_workers={workers} workers{' at most' if spec.scaling.elastic else ''}")
    elif batch and rows // workers < batch:
        report.errors.append(f"{field}: {batch} is more than the {rows // workers} train rows each worker gets "
                             f"of task '{name}' ({rows} rows / {workers} workers)")


def _note_certain_truncation(spec: JobSpec, name: str, checked: CheckedTask, report: Report) -> None:
    """Rows whose text alone is longer than max_length tokens could ever hold (no tokenizer
    needed to know): a text pasted whole, a file read as one row."""
    limit = (spec.tasks[name].max_length or spec.model.max_length) * CHARS_PER_TOKEN_BOUND
    for split, rows in checked.splits.items():
        sizes = [(sum(len(v) for k, v in row.items() if isinstance(v, str)), row[ROW]) for row in rows]
        long = [(size, row) for size, row in sizes if size > limit]
        if long:
            size, row = max(long)
            report.notes.append(f"warning: {name}/{split}: {len(long)} row{'s' if len(long) > 1 else ''} far longer "
                                f"than max_length ({limit // CHARS_PER_TOKEN_BOUND} tokens) will be truncated; the "
                                f"longest, row {row}, has {size:,} characters")


def _tracking_problems(spec: JobSpec) -> list[str]:
    """Each named tracker is installed, and MLflow has somewhere to write."""
    import importlib.util

    from trainer.trackers import mlflow_uri

    problems = [f"tracking.to: {name} is not installed here (pip install 'multitask-launcher[tracking]')"
                for name, module in (("wandb", "wandb"), ("mlflow", "mlflow")) if name in spec.tracking.to
                and importlib.util.find_spec(module) is None]
    if "mlflow" in spec.tracking.to and mlflow_uri(spec) is None:
        problems.append("tracking.to: mlflow on remote storage needs tracking.mlflow_uri or $MLFLOW_TRACKING_URI "
                        "(an MLflow server); without one, MLflow writes beside the experiments on local storage only")
    return problems


def _init_from_problems(spec: JobSpec) -> list[str]:
    """The version to start from exists and fits, unless the run has versions (it resumes from its own)."""
    from trainer.versions import committed_versions, open_storage

    if committed_versions(open_storage(spec.storage), spec.name):
        return []
    return init_from.check(spec)


def _plan_memory(spec: JobSpec, report: Report, machine: bool, force: bool) -> None:
    """What each rank will hold (trainer.model.memory_plan); on this machine, whether the ranks fit it."""
    from trainer.memory import total_bytes
    from trainer.model import GIB, RAY_KILL_FRACTION, describe, job_model_size, job_plan, load_config, model_class

    config, encoding = load_config(spec.model.name_or_path, spec.model.kind)
    if model_class(spec.model.kind, encoding, config) is None:
        return  # a class transformers does not map: loading it says so, a plan could not count it
    size = job_model_size(spec, config, encoding, [len(report.tasks[t].labels or ()) for t in spec.tasks
                                                   if t in report.tasks])
    precision = planned_precision(spec)
    plan = job_plan(spec, size, precision=precision)
    report.notes.extend(describe(plan))
    total = total_bytes()
    if not machine or total is None:
        return
    ranks, limit = spec.scaling.max_workers, int(total * RAY_KILL_FRACTION)

    def fits(candidate) -> bool:
        return ranks * candidate.host_bytes <= limit and (not candidate.device or device_fits(candidate.device_bytes))

    if fits(plan):
        return
    better = first_config_that_fits(spec, size, precision, fits)
    needed = (f"{ranks} ranks x {plan.host_bytes / GIB:.1f} GiB = {ranks * plan.host_bytes / GIB:.1f} GiB of host memory"
              if ranks * plan.host_bytes > limit else f"{plan.device_bytes / GIB:.1f} GiB per GPU")
    problem = (f"memory plan: {needed}, more than this machine has ({limit / GIB:.1f} GiB: "
               f"{RAY_KILL_FRACTION:.0%} of {total / GIB:.1f}, where Ray's memory monitor kills workers); "
               + (f"{better} fits" if better else "no shipped DeepSpeed config fits: more workers on more nodes, "
                  "LoRA (model.lora), or a smaller micro-batch")
               + "; --force runs it anyway")
    if force:
        report.notes.append(f"warning: {problem}")
    else:
        report.errors.append(problem)


def first_config_that_fits(spec: JobSpec, size, precision: str, fits) -> str | None:
    """The first shipped DeepSpeed config under which the plan fits (`fits(plan)`), as a job line."""
    from launcher.jobfile import SHIPPED_DS_CONFIGS
    from trainer.model import GIB, job_plan, read_ds_config

    for name in ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"):
        path = SHIPPED_DS_CONFIGS / f"{name}.json"
        if not path.exists() or (name.endswith("offload") and not spec.scaling.use_gpu):
            continue  # on CPU, offload moves nothing off the machine
        plan = job_plan(spec, size, precision=precision, ds_config=job_ds_config(spec, base=read_ds_config(str(path))))
        if fits(plan):
            return f"deepspeed: {name} ({max(plan.host_bytes, plan.device_bytes) / GIB:.1f} GiB per rank)"
    return None


def planned_precision(spec: JobSpec) -> str:
    """What train.precision: auto becomes where the job runs: bf16 on GPUs, on CPUs where it is fast here."""
    if spec.train.precision != "auto":
        return spec.train.precision
    if spec.scaling.use_gpu:
        return "bf16"
    import torch

    from trainer.model import fast_bf16

    return "bf16" if fast_bf16(torch.device("cpu")) else "fp32"


def device_fits(per_rank: int) -> bool:
    """Whether this machine's GPUs hold `per_rank` bytes each (True where there are none to ask)."""
    import torch

    if not torch.cuda.is_available():
        return True
    return per_rank <= min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def _check_deepspeed(spec: JobSpec, report: Report) -> None:
    try:
        config = job_ds_config(spec)
    except UserError as exc:
        report.errors.append(str(exc))
    else:
        problem = surgery_problem(spec.loss_weighting.surgery, zero_stage(config), spec.train.precision)
        if problem:
            report.errors.append(problem)
    if spec.train.precision == "fp16" and not spec.scaling.use_gpu:
        report.errors.append("train.precision: fp16 needs GPUs (scaling.use_gpu: true); on CPU use bf16")


def _check_model(spec: JobSpec, report: Report) -> None:
    path = spec.model.name_or_path
    if os.path.isfile(path):
        report.errors.append(f"model.name_or_path: '{path}' is a file; give the folder that holds the model's "
                             "config.json, weights and tokenizer (or a hub name)")
        return
    if os.path.isabs(path) and not os.path.isdir(path):
        report.errors.append(f"model.name_or_path: folder not found: '{path}'")
        return
    if not os.path.isdir(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        report.errors.append(f"model.name_or_path: '{path}' is not a local folder and the hub is offline "
                             "(HF_HUB_OFFLINE=1)")
        return
    lengths = {"model.max_length": spec.model.max_length}
    lengths.update({f"tasks.{n}.max_length": t.max_length for n, t in spec.tasks.items() if t.max_length})
    lora = spec.model.lora
    report.errors.extend(check_model(path, spec.model.kind, lengths, lora.layers_to_transform if lora else None,
                                     generated=_generated_lengths(spec), init=spec.model.init,
                                     attn_implementation=spec.model.attn_implementation,
                                     gradient_checkpointing=spec.model.gradient_checkpointing))


def _generated_lengths(spec: JobSpec) -> dict[str, tuple[int, int]]:
    """Task field -> (its prompt's max_length, max_new_tokens) for the tasks a text2text model
    answers by generating at evaluation."""
    from trainer.tasks import registry

    if spec.model.kind != "text2text":
        return {}
    out = {}
    for name, task in spec.tasks.items():
        task_type = registry.get(task.type)
        new_tokens = getattr(task_type.options_model.model_validate(task.options), "max_new_tokens", None)
        if task_type.text2text_eval == "generate" and new_tokens:
            out[f"tasks.{name}"] = (task.max_length or spec.model.max_length, new_tokens)
    return out
