"""The worker: one DeepSpeed rank, in a Ray Train worker or a torchrun process (trainer.runtime).

setup() builds everything from the resolved job (data, streams, planner, weighting, model,
engine) and restores the latest version if there is one; fit() runs the optimizer steps.
Each step runs its plan: so many micro-batches of each task, each one task only, each
back-propagated with its task's weight; DeepSpeed steps the optimizer once, at the
accumulation boundary that closes the plan.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer import checkpoint as ckpt
from trainer.batching import TaskStream
from trainer.collectives import all_gather_objects, to_device
from trainer.deferred_writes import DeferredWrites
from trainer.ds_config import DEEPSPEED_SUB_GROUP_SIZE, fill_model_sizes, job_ds_config, zero_stage
from trainer.errors import first_line
from trainer.evaluation import build_eval_set, evaluate_task
from trainer.init_from import forgetting_table, load_init_optimizer, load_init_weights
from trainer.agreement import agreed_versions, require_parts_on_storage, require_same_data, require_shared_storage
from trainer.job_env import receive_secrets
from trainer.model_io import load_model_files
from trainer.precision import agreed_precision
from trainer.adapt_mixture import MixtureAdapter
from trainer.background_validation import WAIT_AT_END_S, BackgroundValidation
from trainer.early_stopping import EarlyStopping
from trainer.models import HeadSpec, build_model, first_target, hidden_size, lr_factor, model_config, param_groups
from trainer.resize import load_resized
from trainer import version_registry
from trainer.base_model import BASE_FILE, adapters_only, base_record, require_base
from trainer.head_guard import HeadGuard
from trainer.zero3_master import share_master_partitions
from trainer.memory import MemoryPhases, memory_key, return_freed_memory, spare_host_bytes
from trainer.reporting import StepStats, flat_hparams, quiet_libraries, say, step_line
from trainer.runtime import RayRuntime
from trainer.sampling import StepPlanner, mixture_rates
from trainer.safe_load import weights_only_loads
from trainer.scratch import remove_orphans, scratch, scratch_dir
from trainer.stopping import StopRequests, agreed
from trainer.storage import Storage, open_storage, worker_filesystem
from trainer.trackers import Trackers, open_trackers
from trainer.task_data import TaskData, data_signature, prepare_tasks, primary_metric, task_context, task_metrics
from trainer.weighting import UncertaintyWeighting, build_weighting

TRAIN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")


@dataclass
class Run:
    spec: object
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    encoding: str
    tasks: dict[str, TaskData]
    streams: dict[str, TaskStream]
    planner: StepPlanner
    weighting: object
    engine: object
    storage: Storage  # rooted at this experiment's folder
    runtime: object  # where this rank runs: Ray Train or torchrun (trainer.runtime)
    step: int = 0
    seen: dict = field(default_factory=dict)  # task -> examples / tokens so far (global)
    version_scores: dict = field(default_factory=dict)  # version -> its own validation scores (trainer.version_registry)
    train_s: float = 0.0  # the optimizer steps' wall time so far, over resumes (a run's cost, for mtl baselines)
    early: EarlyStopping | None = None  # per-task early stopping (train.early_stopping)
    adapter: MixtureAdapter | None = None  # validation-driven rates (mixture.adapt)
    background: BackgroundValidation | None = None  # rank 0's validation tasks (train.validation: task)
    last_eval: dict = field(default_factory=dict)
    trackers: Trackers | None = None  # rank 0's TensorBoard / W&B / MLflow (tracking.to)
    tracker_ids: dict = field(default_factory=dict)  # the W&B / MLflow runs a resumed run continues
    stops: StopRequests | None = None  # set by train_loop_per_worker before fit
    upload: ckpt.Upload | None = None  # this rank's part of the version in flight
    blocked_s: float = 0.0  # how long the version in flight kept training waiting
    recent_step_s: list = field(default_factory=list)  # the last steps' times, for the ETA
    init_from: dict | None = None  # what the run started from, with the tasks' scores then (trainer.init_from)
    ds_base: dict | None = None  # the job's DeepSpeed file as the driver read it (each version records it)
    memory: MemoryPhases | None = None  # this rank's peak memory per phase (trainer.memory)
    base: dict | None = None  # LoRA on pretrained weights: the base its versions name (trainer.base_model)
    head_guard: HeadGuard | None = None  # heads of tasks a step does not train stay put (trainer.head_guard)


class WorkerStopped(RuntimeError):
    """A worker got SIGTERM: the version at this step is written; Ray Train restarts the group from it."""


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry: the driver's config (launcher.run) on a Ray Train worker."""
    from trainer.spec import JobSpec

    # The driver's secrets (storage keys, hub and tracker tokens), before storage or the hub is touched.
    received = receive_secrets(config.get("secrets"))
    runtime = RayRuntime()
    if received:
        say(f"[mtl] rank {runtime.rank}: secrets from the driver: {', '.join(received)}")
    run_worker(JobSpec.model_validate(config["job"]), runtime, run_id=config.get("run_id"),
               ds_base=config.get("ds_config"))


def run_worker(spec, runtime, *, run_id: str | None = None, ds_base: dict | None = None) -> None:
    """One rank's whole run under `runtime`: setup (or resume), then the steps."""
    weights_only_loads()  # a version on shared storage is data, never code
    quiet_libraries()
    stops = StopRequests(run_id, runtime.rank, spec.train.stop_grace_s, runtime)
    stops.install_sigterm_hook()
    for folder in remove_orphans():  # left by workers that were killed on this node
        say(f"[mtl] removed stale scratch {folder}")
    memory = MemoryPhases(runtime.rank, runtime.device(),
                          publish=(lambda note: runtime.publish(memory_key(run_id, runtime.rank), note)) if run_id else None)
    run = setup(spec, runtime, ds_base=ds_base, memory=memory)
    run.stops = stops
    try:
        fit(run)
    finally:
        stops.training = False


def setup(spec, runtime, ds_base: dict | None = None, memory: MemoryPhases | None = None) -> Run:
    import deepspeed

    rank, world = runtime.rank, runtime.world
    device = runtime.device()
    memory = memory or MemoryPhases(rank, device)
    memory.enter("data")
    if device.type == "cpu":
        # The worker reserved cpus_per_worker; more threads would fight the other ranks.
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
        skip_inference_comm_op()
    say_placement(runtime, device)
    if spec.scaling.elastic and rank == 0:
        per_step = spec.step_shape(world)[0]
        say(f"[mtl] elastic run on {world} workers (scaling.num_workers {list(spec.scaling.num_workers)}): "
            f"{per_step} micro-batches each per step, {per_step * world} in all")
    base_config, tokenizer, encoding = load_model_files(spec.model.name_or_path, spec.model.kind)
    tasks = prepare_tasks(spec, tokenizer, encoding)
    say_data_cache(rank, tasks)
    require_same_data(data_signature(tasks), rank)
    streams = build_streams(spec, tasks, tokenizer, rank, world)
    planner = build_planner(spec, tasks, world)
    static = {t: s.weight for t, s in spec.tasks.items()}
    weighting = build_weighting(spec.loss_weighting.strategy, static, temperature=spec.loss_weighting.temperature,
                                window=spec.loss_weighting.window)

    precision, warning = agreed_precision(spec.train.precision, device)
    if warning and rank == 0:
        say(f"[mtl] warning: {warning}")
    spec.train.precision = precision  # what the run trains in, as its versions record it
    storage = experiment_storage(spec, runtime)
    require_shared_storage(storage, rank, spec.storage.path)
    versions = agreed_versions(ckpt.committed_versions(storage) if rank == 0 else None)
    ds_config = job_ds_config(spec, world, base=ds_base)
    fill_model_sizes(ds_config, hidden_size(base_config), keep=resumed_layout(storage, versions, zero_stage(ds_config)))
    torch.manual_seed(spec.train.seed)  # identical initial heads on every rank
    memory.enter("build")
    model = build_model(kind=spec.model.kind, encoding=encoding, name_or_path=spec.model.name_or_path,
                        heads=[HeadSpec(t, spec.tasks[t].type, len(d.labels)) for t, d in tasks.items()],
                        loss_weighting=weighting if isinstance(weighting, UncertaintyWeighting) else None,
                        lora=spec.model.lora.model_dump() if spec.model.lora else None, ds_config=ds_config,
                        init=spec.model.init, attn_implementation=spec.model.attn_implementation,
                        gradient_checkpointing=spec.model.gradient_checkpointing)
    if rank == 0:
        say_model_options(spec.model)
    started_from = None
    if spec.init_from is not None and not versions:  # a run with versions resumes from its own
        started_from = load_init_weights(model, spec, {t: d.labels for t, d in tasks.items()})
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=spec.train.weight_decay,
                                               weighting_lr=spec.loss_weighting.lr),
                                  lr=spec.train.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(spec.train.lr_schedule, spec.train.warmup_steps, spec.train.steps))
    return_freed_memory()  # a partitioned build frees each whole layer it made
    memory.enter("engine init")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    share_master_partitions(engine.optimizer)  # fp32 ZeRO-3: one copy of each partition, not two
    return_freed_memory()
    memory.enter("start")
    # Versions: a memory copy in the loop, files on a thread; written in place where the copy
    # would take more than half of this rank's share of the host's free memory.
    engine.checkpoint_engine = DeferredWrites(spare_bytes=lambda: spare_host_bytes(runtime.local_world))
    engine.train()  # from_pretrained leaves the backbone in eval mode: dropout would be off
    # Dropout differs per rank (as it would on separate machines) but is reproducible.
    seed_everything(spec.train.seed * 1000 + rank + 1)
    run = Run(spec, rank, world, device, tokenizer, encoding, tasks, streams, planner, weighting, engine, storage,
              runtime, seen={t: {"examples": 0, "real_tokens": 0, "padded_tokens": 0} for t in tasks},
              ds_base=ds_base, memory=memory,
              base=base_record(spec.model.name_or_path) if adapters_only(spec) else None,
              head_guard=HeadGuard(engine.module.heads) if len(engine.module.heads) else None)
    if spec.train.early_stopping is not None:
        run.early = EarlyStopping(list(tasks), spec.train.early_stopping.patience, spec.train.early_stopping.min_delta)
    if spec.mixture.adapt is not None:
        run.adapter = MixtureAdapter(**spec.mixture.adapt.model_dump())
    if spec.train.validation == "task" and rank == 0:
        run.background = BackgroundValidation(spec)
    job_groups = [{k: g[k] for k in ("initial_lr", "weight_decay")} for g in engine.optimizer.param_groups]
    if restore_latest(run):
        follow_job_hyperparameters(engine, job_groups)
    elif started_from is not None and spec.init_from.resume_optimizer:
        load_init_optimizer(engine, spec, rank)
        follow_job_hyperparameters(engine, job_groups)
    if rank == 0:
        run.trackers = open_trackers(spec, run.storage, run.tracker_ids)
        metrics = [f"validation/{t}/{primary_metric(task_metrics(spec, t))}" for t in tasks]
        run.trackers.hparams(flat_hparams(spec.model_dump(mode="json", exclude={"storage", "tracking"})), metrics)
    if started_from is not None:
        if rank == 0:
            say(f"[mtl] started from {started_from['experiment']}/{started_from['version']} (weights"
                f"{', optimizer state' if spec.init_from.resume_optimizer else '; a fresh optimizer'}): kept {', '.join(started_from['kept']) or 'no task'}"
                + "".join(f"; {what} {', '.join(started_from[what])}" for what in ("added", "dropped")
                          if started_from[what]))
        evaluate_all(run, "validation")  # the tasks' scores before this run: forgetting is measured against them
        run.init_from = {**started_from, "before": run.last_eval.get("tasks", {}),
                         "primary": run.last_eval.get("primary", {})}
    return run


def say_data_cache(rank: int, tasks: dict[str, TaskData]) -> None:
    """How each rank had its data: prepared (and cached for the node), or read from that cache."""
    parts = [f"{name} {'read from the node cache' if d.cache.status == 'hit' else 'prepared'} in {d.cache.seconds:.1f}s"
             for name, d in tasks.items() if d.cache is not None]
    say(f"[mtl] rank {rank} data: {', '.join(parts)}")
    cut = [f"{name} {e.truncated} of {e.rows} {split}" for name, d in tasks.items()
           for split, e in d.encoded.items() if e.truncated]
    if rank == 0 and cut:
        say(f"[mtl] rows longer than their task's max_length are truncated: {'; '.join(cut)} "
            "(mtl data JOB shows each task's lengths)")


def experiment_storage(spec, runtime) -> Storage:
    """The experiment's folder on storage, opened the way this rank can (see worker_filesystem)."""
    given, folder = runtime.storage_location()
    if given is None:  # no driver handed one over: the job's own storage
        root = open_storage(spec.storage)
        return Storage(root.fs, root.path(spec.name), f"{root.uri.rstrip('/')}/{spec.name}")
    return Storage(worker_filesystem(spec.storage, given), folder, folder)


def say_model_options(model) -> None:
    """The model settings that change how it is built or run, when not the defaults."""
    said = [text for text, on in (("a random initialisation of its config (model.init: random)", model.init == "random"),
                                  ("gradient checkpointing", model.gradient_checkpointing),
                                  (f"{model.attn_implementation} attention", model.attn_implementation)) if on]
    if said:
        say(f"[mtl] model: {', '.join(said)}")


def say_placement(runtime, device: torch.device) -> None:
    """Where this rank runs: node, address and device (the multi-node check reads these lines)."""
    import socket

    node, address = runtime.where()
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    say(f"[mtl] rank {runtime.rank} of {runtime.world} on node {node} at {address} ({socket.gethostname()}, "
        f"{device}{threads})")


def skip_inference_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it starts (36 s on a
    fresh 2-core machine, November 2026). Only its inference all-reduce (tensor-parallel serving)
    uses that op; training all-reduces through torch.distributed (gloo), so the op is marked
    unavailable here and DeepSpeed never builds it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_streams(spec, tasks: dict[str, TaskData], tokenizer, rank: int, world: int) -> dict[str, TaskStream]:
    streams = {}
    for name, data in tasks.items():
        task = spec.tasks[name]
        feats = data.encoded["train"].features
        feats = feats.select_columns([c for c in (*TRAIN_COLUMNS, "length") if c in feats.column_names])
        rows = None if task.max_tokens else (task.micro_batch_size or spec.train.micro_batch_size)
        streams[name] = TaskStream(name, feats, rank=rank, world=world, seed=spec.train.seed,
                                   pad_id=tokenizer.pad_token_id, micro_batch_size=rows, max_tokens=task.max_tokens,
                                   pool=spec.train.pool_micro_batches, by_length=spec.train.length_grouping)
    return streams


def build_planner(spec, tasks: dict[str, TaskData], world: int) -> StepPlanner:
    per_step, fixed = spec.step_shape(world)  # an elastic run spreads the same global batch over `world`
    free = {t: len(tasks[t].encoded["train"].features) for t in spec.tasks if t not in fixed}
    rates = mixture_rates(spec.mixture.strategy, free, temperature=spec.mixture.temperature, cap=spec.mixture.cap,
                          explicit=spec.explicit_rates()) if free else {}
    return StepPlanner(list(spec.tasks), rates, fixed, per_step, spec.train.seed)


def follow_job_hyperparameters(engine, job_groups: list[dict]) -> None:
    """After a resume, the lr and weight decay are the job's, not the version's.

    The optimizer's and scheduler's saved state carries the learning rate and weight decay the
    version was trained with; a run continued with `--allow-changes` must train with the new
    ones from its next step (the same numbers when nothing changed). The schedule's shape comes
    from the job's LambdaLR as built; its position (the step) from the version.
    """
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [g["initial_lr"] for g in job_groups]
    for group, wanted, factor in zip(engine.optimizer.param_groups, job_groups, scheduler.lr_lambdas):
        group.update(wanted)
        group["lr"] = wanted["initial_lr"] * factor(scheduler.last_epoch)


def restore_latest(run: Run) -> bool:
    """Continue from the latest committed version on storage, if there is one (see trainer.checkpoint);
    returns whether there was one."""
    folders = ckpt.version_folders(run.storage) if run.rank == 0 else {}
    if run.rank == 0:
        for name in [v for v, committed in folders.items() if not committed]:  # cut short by a crash or kill
            run.storage.delete_dir(name)
            say(f"[mtl] removed {name}: its write never finished (no commit marker)")
    # Rank 0's listing, after its deletes: every rank resumes the same version.
    versions = agreed_versions([v for v, committed in folders.items() if committed])
    if not versions:
        return False
    state = run.storage.read_json(f"{versions[-1]}/trainer_state.json")
    recorded = run.storage.read_json(f"{versions[-1]}/{BASE_FILE}")
    if recorded is not None:  # its adapters go over the base this run built: the one they were trained on
        require_base(recorded, versions[-1], run.spec.model.name_or_path)
    layout = saved_layout(state, run.engine.zero_optimization_stage())
    if state["world_size"] != run.world or layout != optimizer_layout(run.engine):
        # ZeRO partitions and data shards belong to a world size, ZeRO-3's optimizer state to its
        # sub-groups too (a config that sets sub_group_size anew): the universal checkpoint loads
        # into any of them.
        load_resized(run, versions[-1], state["world_size"])
    else:
        with scratch("resume") as local:
            ckpt.load_rank_part(run.engine, ckpt.download_part(run.storage, versions[-1], local, run.rank),
                                run.rank, run.streams)
    run.step = state["step"]
    run.planner.load_state_dict(state["planner"])
    if not isinstance(run.weighting, UncertaintyWeighting):  # learned weights came back with the model
        run.weighting.load_state_dict(state["weighting"])
    run.seen, run.last_eval = state["seen"], state.get("last_eval", {})
    run.version_scores = state.get("version_scores", {})
    if run.background is not None:  # versions whose validation task finished after their trainer_state was written
        run.version_scores.update(scores_from_evals(run, [v for v in versions if v not in run.version_scores]))
    run.train_s = state.get("train_s", 0.0)
    run.init_from = state.get("init_from")
    run.tracker_ids = state.get("trackers") or {}
    if run.early is not None and state.get("early_stopping"):
        run.early.load_state_dict(state["early_stopping"])
    if run.adapter is not None and state.get("mixture_adapt"):
        run.adapter.load_state_dict(state["mixture_adapt"])
    if run.rank == 0:
        say(f"[mtl] resumed from {ckpt.version_name(run.step)} (step {run.step} of {run.spec.train.steps})")
        if run.step >= run.spec.train.steps:
            say(f"[mtl] '{run.spec.name}' already reached train.steps={run.spec.train.steps}; "
                f"raise train.steps to train further")
        elif all_stopped(run):
            say(f"[mtl] '{run.spec.name}': every task had stopped early; nothing is left to train")
    return True


def fit(run: Run) -> None:
    """The optimizer steps. Ray Train hears of the run only when a version is saved: every
    ray.train.report is a barrier that waits for Ray's controller to collect it (it polls every
    2 s), so a report per step held fast steps to one per 2 s. Steps go to the console and
    TensorBoard instead."""
    spec, engine = run.spec, run.engine
    names = list(run.tasks)
    stops = run.stops
    first = run.step
    while run.step < spec.train.steps and not all_stopped(run):
        started = time.perf_counter()
        if run.step in (first, first + 1):
            run.memory.enter("step 1" if run.step == first else "steps")  # AdamW makes its moments at the first
        plan = run.planner.plan()
        weights = run.weighting.weights()
        held = run.head_guard.hold([t for t in names if not plan.get(t)]) if run.head_guard else []
        stats = run_plan(engine, plan, run.streams, weights, names, run.device)
        HeadGuard.restore(held)
        run.step += 1
        assert engine.global_steps == run.step, "plan size and DeepSpeed accumulation disagree"
        uploaded = run.upload is not None and run.upload.finished()
        per_task, flags = stats.reduce(run.device, [*stops.local(), float(uploaded)])
        reasons = agreed(flags[:-1])
        if run.upload is not None and flags[-1] == run.world:  # every rank's part is on storage
            commit_version(run)
        run.weighting.end_step({t: v["loss"] for t, v in per_task.items() if v["micro_batches"]})
        for task, v in per_task.items():
            for key in run.seen[task]:
                run.seen[task][key] += v[key]
        metrics = step_metrics(run, per_task, weights, time.perf_counter() - started)
        final = run.step == spec.train.steps
        stopping = reasons["driver"] or reasons["sigterm"]
        if run.background is not None:
            absorb_validations(run, run.background.finished())
        in_loop = spec.train.validation == "loop"
        if in_loop and (final or (spec.train.eval_every and run.step % spec.train.eval_every == 0)):
            metrics.update(evaluate_all(run, "validation"))
            if run.early is not None:
                stop_lagging_tasks(run)
                final = final or all_stopped(run)
            if run.adapter is not None and not final:
                adapt_rates(run)
            if final and run.init_from is not None:
                report_forgetting(run)
        preempted = reasons["preemption"] and not stops.preemption_seen  # one version per notice
        if preempted:
            stops.preemption_seen = True
            if run.rank == 0:
                say(f"[mtl] a node of this run is being preempted: writing a version at step {run.step}")
        if final or stopping or preempted or (spec.train.checkpoint_every and run.step % spec.train.checkpoint_every == 0):
            save_version(run, metrics)
        if stopping or preempted:  # committed now: a drained node may not live to see a later step
            finish_upload(run)
            if preempted and run.rank == 0:
                say(f"[mtl] version {ckpt.version_name(run.step)} committed before training goes on (preemption)")
        if stopping:
            stop_early(run, reasons)
            break
    finish_upload(run)
    if run.background is not None:
        absorb_validations(run, run.background.finished(WAIT_AT_END_S))
        if run.background.pending:
            say(f"[mtl] warning: validation of {', '.join(run.background.pending)} still running after "
                f"{WAIT_AT_END_S:.0f}s; the run ends without it (mtl eval --split validation scores it)")
    if run.trackers is not None:
        run.trackers.close()
    say(run.memory.line())


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


def run_plan(engine, plan: dict[str, int], streams: dict[str, TaskStream], weights: dict[str, float],
             tasks: list[str], device) -> StepStats:
    """One optimizer step: the plan's micro-batches, each of one task, each with its task's weight."""
    stats = StepStats(tasks)
    for task, count in plan.items():
        for _ in range(count):
            host = with_first_target(streams[task].next_batch())
            loss, weighted = engine(task, to_device(host, device), weight=weights[task])
            engine.backward(weighted)  # DeepSpeed divides by gradient_accumulation_steps
            engine.step()  # steps the optimizer only at the boundary that ends this plan
            stats.add(task, loss, host)  # no read back from the device until the step's end (StepStats)
    return stats


def with_first_target(batch: dict) -> dict:
    """A text-to-text micro-batch carries where its targets start, found here on the host (see
    MultiTaskModel._lm_loss): a decoder then computes logits from there on without asking the device."""
    labels = batch.get("labels")
    if torch.is_tensor(labels) and labels.dim() == 2:
        batch["first_target"] = first_target(labels)
    return batch


def step_metrics(run: Run, per_task: dict, weights: dict, seconds: float) -> dict:
    lr = run.engine.get_lr()[0]
    tokens = sum(v["real_tokens"] for v in per_task.values())
    rates = run.planner.expected_rates()
    norm = run.engine.get_global_grad_norm()  # of this step's gradients, before clipping
    metrics = {"step": run.step, "lr": float(lr), "step_time": seconds, "tokens_per_s": tokens / seconds,
               "grad_norm": float(norm) if norm is not None else None}
    run.recent_step_s = [*run.recent_step_s[-19:], seconds]
    run.train_s += seconds
    for task, v in per_task.items():
        metrics.update({f"loss/{task}": v["loss"], f"weight/{task}": weights[task], f"rate/{task}": float(rates[task]),
                        f"micro_batches/{task}": v["micro_batches"],
                        f"tokens_real/{task}": v["real_tokens"], f"tokens_padded/{task}": v["padded_tokens"],
                        f"examples_seen/{task}": run.seen[task]["examples"]})
    if run.rank == 0:
        if run.step % run.spec.train.log_every == 0 or run.step == run.spec.train.steps:
            eta = (run.spec.train.steps - run.step) * sum(run.recent_step_s) / len(run.recent_step_s)
            say(step_line(run.step, run.spec.train.steps, per_task, lr, seconds, metrics["tokens_per_s"],
                          grad_norm=metrics["grad_norm"], eta_s=eta))
        run.trackers.scalars({k: v for k, v in metrics.items() if k != "step"}, run.step)
    return metrics


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
        say(f"[mtl] eval {split} {label} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items()))


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


def save_version(run: Run, metrics: dict) -> None:
    """Every rank copies its part to memory, then writes it to local scratch and uploads it on a
    background thread.

    Training waits only for the copy and the small files (and for the previous version, if it is still
    uploading: one in flight at a time). The version is committed at the first step where every
    rank's upload has finished (fit), or at the end (finish_upload).
    """
    started = time.perf_counter()
    finish_upload(run)
    phase, _ = run.memory.phase, run.memory.enter("version")
    name = ckpt.version_name(run.step)
    folder = scratch_dir("version")
    ckpt.write_rank_part(run.engine, folder, run.rank, run.streams, trained_only=run.base is not None)
    scores = version_registry.scores_of(run.last_eval, run.step)
    if scores:  # evaluated at this very step: the version can be ranked (trainer.version_registry)
        run.version_scores[name] = scores
    state = trainer_state(run)  # on every rank: under ZeRO-3, reading learned weights is a collective
    if run.rank == 0:
        ckpt.write_global_part(folder, trainer_state=state, job_yaml=job_yaml(run.spec),
                               tokenizer=run.tokenizer, tasks=tasks_manifest(run),
                               model_config=model_config(run.engine.module), ds_config=run.ds_base, base=run.base)
    run.upload = ckpt.Upload(run.storage, folder, name, run.engine.checkpoint_engine.take())
    run.blocked_s = time.perf_counter() - started
    run.memory.enter(phase or "steps")
    run.runtime.report(metrics)


def finish_upload(run: Run) -> None:
    """Wait for this rank's upload of the version in flight, then commit it once all ranks have."""
    if run.upload is None:
        return
    started = time.perf_counter()
    run.upload.wait()
    files = all_gather_objects(run.upload.files)  # also the barrier: every rank's upload has finished
    if run.rank == 0:  # the marker says every rank's files are there: see that they are
        require_parts_on_storage(run.storage, run.upload.version, files, run.spec.storage.path)
    run.blocked_s += time.perf_counter() - started
    commit_version(run)


def commit_version(run: Run) -> None:
    """Rank 0 marks the version in flight complete, prunes, and updates the registry."""
    upload, run.upload = run.upload, None
    if run.rank != 0:
        return
    ckpt.mark_committed(run.storage, upload.version)
    if run.background is not None:
        run.background.submit(upload.version)
    kept = prune_versions(run)
    run.storage.write_json("registry.json", version_registry.registry(upload.version, kept, run.version_scores))
    written = run.blocked_s + (upload.seconds or 0.0)
    run.trackers.scalars({"version/blocked_s": run.blocked_s, "version/write_s": written,
                          "version/stall": run.blocked_s / written if written else 0.0}, run.step)
    run.trackers.sync()
    say(f"[mtl] saved version {upload.version} (training waited {run.blocked_s:.2f}s of {written:.2f}s)")


def prune_versions(run: Run) -> list[str]:
    """train.keep_last newest versions stay, tagged ones, and with train.keep_best the best of each task.

    Returns the committed versions that remain.
    """
    committed = ckpt.committed_versions(run.storage)
    protected = version_registry.protected(run.version_scores, committed) if run.spec.train.keep_best else set()
    protected |= set(ckpt.read_tags(run.storage).values())  # `mtl tag`: kept until untagged
    protected |= set(run.background.pending) if run.background is not None else set()  # still being validated
    doomed = ckpt.versions_to_delete(committed, run.spec.train.keep_last, protected)
    removed = []
    for name in doomed:
        if not ckpt.delete_version(run.storage, name):  # tagged meanwhile by `mtl tag`: kept
            continue
        removed.append(name)
        say(f"[mtl] removed version {name} (train.keep_last={run.spec.train.keep_last})")
    return [v for v in committed if v not in removed]


def resumed_layout(storage, versions: list[str], stage: int) -> dict:
    """The optimizer layout of the version this run will resume (the latest of `versions`, as in
    restore_latest), for the "auto" sizes to keep: a run resumes exactly only into the
    sub-groups its state was saved in."""
    if not versions:
        return {}
    return saved_layout(storage.read_json(f"{versions[-1]}/trainer_state.json") or {}, stage)


def saved_layout(state: dict, stage: int) -> dict:
    """A version's optimizer layout; one written before it was recorded used DeepSpeed's default."""
    if "optimizer_layout" in state:
        return state["optimizer_layout"]
    return {"sub_group_size": DEEPSPEED_SUB_GROUP_SIZE} if stage == 3 else {}


def optimizer_layout(engine) -> dict:
    """What a version's optimizer shards are cut by besides the world size: ZeRO-3's sub-groups."""
    return {"sub_group_size": int(engine.zero_sub_group_size())} if engine.zero_optimization_stage() == 3 else {}


def trainer_state(run: Run) -> dict:
    weighting = {} if isinstance(run.weighting, UncertaintyWeighting) else run.weighting.state_dict()
    return {"step": run.step, "planner": run.planner.state_dict(), "weighting": weighting,
            "weights": run.weighting.weights(), "rates": run.planner.expected_rates(),
            "seen": run.seen, "last_eval": run.last_eval, "world_size": run.world,
            "optimizer_layout": optimizer_layout(run.engine), "version_scores": run.version_scores, "train_s": run.train_s,
            "early_stopping": run.early.state_dict() if run.early is not None else None,
            "init_from": run.init_from,
            "trackers": run.trackers.ids() if run.trackers is not None else run.tracker_ids,
            "mixture_adapt": run.adapter.state_dict() if run.adapter is not None else None}


def tasks_manifest(run: Run) -> dict:
    spec = run.spec
    return {"kind": spec.model.kind, "encoding": run.encoding, "base_model": spec.model.name_or_path,
            "tasks": {t: {"type": spec.tasks[t].type, "labels": list(d.labels),
                          "prompt": task_context(spec, t).prompt,
                          "max_length": spec.tasks[t].max_length or spec.model.max_length,
                          "options": spec.tasks[t].options,
                          "metrics": task_metrics(spec, t)}
                      for t, d in run.tasks.items()}}


def job_yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
