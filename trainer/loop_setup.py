"""A rank's start: data, streams, planner, weighting, model and engine from the resolved job, and
the latest version restored when there is one (trainer.loop runs the steps)."""

from __future__ import annotations

import random

import numpy as np
import torch

from trainer.control import (
    BanditMixer,
    EarlyStopping,
    HeadGuard,
    MixtureAdapter,
    TaskGradients,
    UncertaintyWeighting,
    build_weighting,
    surgery_problem,
)
from trainer.data import (
    StepPlanner,
    TaskData,
    TaskStream,
    data_signature,
    mixture_rates,
    prepare_tasks,
    primary_metric,
    task_metrics,
    usable_cores,
)
from trainer.errors import UserError
from trainer.evaluation import BackgroundValidation
from trainer.loop_state import Run
from trainer.loop_validation import all_stopped, evaluate_all, scores_from_evals
from trainer.loop_versions import optimizer_layout, resumed_layout, saved_layout
from trainer.memory import MemoryPhases, return_freed_memory, spare_host_bytes
from trainer.model import (
    HeadSpec,
    agreed_precision,
    build_model,
    fill_model_sizes,
    group_lr_factors,
    heads_apart,
    hidden_size,
    job_ds_config,
    load_model_files,
    offloads_optimizer,
    param_groups,
    share_master_partitions,
    zero_stage,
)
from trainer.reporting import CONSOLE_TASKS, flat_hparams, say
from trainer.scratch import scratch
from trainer.trackers import open_trackers
from trainer.versions import (
    BASE_FILE,
    DeferredWrites,
    Storage,
    adapters_only,
    agreed_versions,
    base_record,
    load_init_optimizer,
    load_init_weights,
    load_resized,
    open_storage,
    require_base,
    require_same_data,
    require_shared_storage,
    worker_filesystem,
)
from trainer.versions import checkpoint as ckpt

TRAIN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")


def setup(spec, runtime, ds_base: dict | None = None, memory: MemoryPhases | None = None) -> Run:
    """This rank's run, ready for its first step: its data, its engine, and the latest version
    restored when the experiment has one."""
    rank, world = runtime.rank, runtime.world
    device = runtime.device()
    memory = memory or MemoryPhases(rank, device)
    memory.enter("data")
    prepare_process(spec, runtime, device)
    base_config, tokenizer, encoding = load_model_files(spec.model.name_or_path, spec.model.kind)
    tasks = prepare_tasks(spec, tokenizer, encoding, start=runtime.local_rank,
                          processes=preparing_cores(spec, runtime))
    say_data_cache(rank, tasks)
    require_same_data(data_signature(tasks), rank)
    streams = build_streams(spec, tasks, tokenizer, rank, world)
    planner = build_planner(spec, tasks, world)
    static = {t: s.weight for t, s in spec.tasks.items()}
    options = spec.loss_weighting
    weighting = build_weighting(options.strategy, static, temperature=options.temperature, window=options.window,
                                famo_lr=options.famo_lr, famo_decay=options.famo_decay)
    precision, warning = agreed_precision(spec.train.precision, device)
    if warning and rank == 0:
        say(f"[mtl] warning: {warning}")
    spec.train.precision = precision  # what the run trains in, as its versions record it
    storage = experiment_storage(spec, runtime)
    require_shared_storage(storage, rank, spec.storage.path)
    versions = agreed_versions(ckpt.committed_versions(storage) if rank == 0 else None)
    ds_config = job_ds_config(spec, world, base=ds_base)
    fill_model_sizes(ds_config, hidden_size(base_config), keep=resumed_layout(storage, versions, zero_stage(ds_config)))
    memory.enter("build")
    model, started_from = build_job_model(spec, tasks, encoding, weighting, ds_config, fresh=not versions, rank=rank)
    engine = start_engine(spec, model, ds_config, runtime, memory)
    # Dropout differs per rank (as it would on separate machines) but is reproducible.
    seed_everything(spec.train.seed * 1000 + rank + 1)
    run = Run(spec, rank, world, device, tokenizer, encoding, tasks, streams, planner, weighting, engine, storage,
              runtime, seen={t: {"examples": 0, "real_tokens": 0, "padded_tokens": 0} for t in tasks},
              ds_base=ds_base, memory=memory,
              base=base_record(spec.model.name_or_path) if adapters_only(spec) else None,
              head_guard=HeadGuard(engine.module.heads) if len(engine.module.heads) else None)
    add_controllers(run)
    resume_or_start(run, started_from)
    return run


def prepare_process(spec, runtime, device: torch.device) -> None:
    """What this process needs before any work: its threads, its placement said, the elastic shape."""
    if device.type == "cpu":
        # The worker reserved cpus_per_worker; more threads would fight the other ranks.
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
        skip_inference_comm_op()
    say_placement(runtime, device)
    if spec.scaling.elastic and runtime.rank == 0:
        per_step = spec.step_shape(runtime.world)[0]
        say(f"[mtl] elastic run on {runtime.world} workers (scaling.num_workers {list(spec.scaling.num_workers)}): "
            f"{per_step} micro-batches each per step, {per_step * runtime.world} in all")


def build_job_model(spec, tasks: dict[str, TaskData], encoding: str, weighting, ds_config: dict, *, fresh: bool,
                    rank: int) -> tuple[object, dict | None]:
    """The job's model, and (for a fresh run with `init_from`) what it started from: a run with
    versions resumes from its own instead."""
    torch.manual_seed(spec.train.seed)  # identical initial heads on every rank
    model = build_model(kind=spec.model.kind, encoding=encoding, name_or_path=spec.model.name_or_path,
                        heads=[HeadSpec(t, spec.tasks[t].type, len(d.labels)) for t, d in tasks.items()],
                        loss_weighting=weighting if isinstance(weighting, UncertaintyWeighting) else None,
                        lora=spec.model.lora.model_dump() if spec.model.lora else None, ds_config=ds_config,
                        init=spec.model.init, attn_implementation=spec.model.attn_implementation,
                        gradient_checkpointing=spec.model.gradient_checkpointing)
    if rank == 0:
        say_model_options(spec.model)
    started_from = None
    if spec.init_from is not None and fresh:
        started_from = load_init_weights(model, spec, {t: d.labels for t, d in tasks.items()})
    return model, started_from


def start_engine(spec, model, ds_config: dict, runtime, memory: MemoryPhases):
    """The DeepSpeed engine over `model`: AdamW (each head at its task's lr_scale, the backbone still
    during a head warm-up), the job's schedule, and versions written after the step that made them."""
    import deepspeed

    train = spec.train
    scales = {t: task.lr_scale for t, task in spec.tasks.items()}
    groups = param_groups(model, weight_decay=train.weight_decay, weighting_lr=spec.loss_weighting.lr, lr=train.lr,
                          head_lr_scales=scales if heads_apart(scales, train.head_warmup_steps) else None)
    optimizer = job_optimizer(groups, train.lr, host_adam=spec.scaling.use_gpu and offloads_optimizer(ds_config))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, group_lr_factors(
        groups, train.lr_schedule, train.warmup_steps, train.steps, train.head_warmup_steps))
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
    return engine


def job_optimizer(groups: list[dict], lr: float, *, host_adam: bool):
    """AdamW over `groups`. GPU workers whose optimizer is offloaded step it on the host, where
    DeepSpeed's CPU Adam (vectorised C++, built once per node on first use) is several times faster
    than torch's; CPU workers keep torch's AdamW, which needs no build and computes the same (both
    give the same losses to ~1e-6)."""
    if host_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def add_controllers(run: Run) -> None:
    """What the job asks to steer the run between steps: gradient surgery, early stopping, mixture
    adaptation (from validation, or online by a bandit), validation by a task beside the run."""
    spec = run.spec
    if spec.loss_weighting.surgery != "none":
        problem = surgery_problem(spec.loss_weighting.surgery, run.engine.zero_optimization_stage(),
                                  spec.train.precision)
        if problem:
            raise UserError(problem)
        run.surgery = TaskGradients(run.engine.module, seed=spec.train.seed, world=run.world)
    if spec.train.early_stopping is not None:
        run.early = EarlyStopping(list(run.tasks), spec.train.early_stopping.patience,
                                  spec.train.early_stopping.min_delta)
    if spec.mixture.adapt is not None:
        run.adapter = MixtureAdapter(**spec.mixture.adapt.model_dump())
    if spec.mixture.strategy == "bandit" and run.planner.free:
        run.mixer = BanditMixer(run.planner.free, smoothing=spec.mixture.smoothing)
    if spec.train.validation == "task" and run.rank == 0:
        run.background = BackgroundValidation(spec)


def resume_or_start(run: Run, started_from: dict | None) -> None:
    """The latest version restored (or `init_from`'s optimizer state), the trackers opened, and for
    a run started from another run's version, the tasks' scores before it trained."""
    spec, engine = run.spec, run.engine
    job_groups = [{k: g[k] for k in ("initial_lr", "weight_decay")} for g in engine.optimizer.param_groups]
    if restore_latest(run):
        follow_job_hyperparameters(engine, job_groups)
    elif started_from is not None and spec.init_from.resume_optimizer:
        load_init_optimizer(engine, spec, run.rank)
        follow_job_hyperparameters(engine, job_groups)
    if run.rank == 0:
        run.trackers = open_trackers(spec, run.storage, run.tracker_ids)
        metrics = [f"validation/{t}/{primary_metric(task_metrics(spec, t))}" for t in run.tasks]
        run.trackers.hparams(flat_hparams(spec.model_dump(mode="json", exclude={"storage", "tracking"})), metrics)
    if started_from is None:
        return
    if run.rank == 0:
        say(f"[mtl] started from {started_from['experiment']}/{started_from['version']} (weights"
            f"{', optimizer state' if spec.init_from.resume_optimizer else '; a fresh optimizer'}): kept "
            f"{', '.join(started_from['kept']) or 'no task'}"
            + "".join(f"; {what} {', '.join(started_from[what])}" for what in ("added", "dropped")
                      if started_from[what]))
    evaluate_all(run, "validation")  # the tasks' scores before this run: forgetting is measured against them
    run.init_from = {**started_from, "before": run.last_eval.get("tasks", {}),
                     "primary": run.last_eval.get("primary", {})}


def preparing_cores(spec, runtime) -> int:
    """Processes a rank may encode a large split on: the CPUs its node's workers reserved (while one
    rank prepares a task, the others wait for its cache entry), no more than the node has."""
    reserved = int(spec.scaling.cpus_per_worker * runtime.local_world)
    return max(1, min(reserved, usable_cores()))


def say_data_cache(rank: int, tasks: dict[str, TaskData]) -> None:
    """How each rank had its data: prepared (and cached for the node), or read from that cache."""
    had = {name: d.cache for name, d in tasks.items() if d.cache is not None}
    if len(had) <= CONSOLE_TASKS:
        parts = [f"{name} {'read from the node cache' if use.status == 'hit' else 'prepared'} in {use.seconds:.1f}s"
                 for name, use in had.items()]
        say(f"[mtl] rank {rank} data: {', '.join(parts)}")
    elif had:
        read = sum(use.status == "hit" for use in had.values())
        slowest = max(had, key=lambda name: had[name].seconds)
        say(f"[mtl] rank {rank} data: {len(had)} tasks, {read} read from the node cache, {len(had) - read} prepared "
            f"(the longest, {slowest}, in {had[slowest].seconds:.1f}s)")
    cut = [f"{name} {e.truncated} of {e.rows} {split}" for name, d in tasks.items()
           for split, e in d.encoded.items() if e.truncated]
    if rank == 0 and cut:
        shown = "; ".join(cut[:CONSOLE_TASKS]) + (f"; and {len(cut) - CONSOLE_TASKS} more" if len(cut) > CONSOLE_TASKS
                                                  else "")
        say(f"[mtl] rows longer than their task's max_length are truncated: {shown} "
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
    return StepPlanner(list(spec.tasks), rates, fixed, per_step, spec.train.seed, draw=spec.mixture.draw)


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
    """Continue from the latest committed version on storage, if there is one (see trainer.versions.checkpoint);
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
                                run.rank, run.streams, trained_only=run.base is not None)
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
    if run.mixer is not None and state.get("mixture_bandit"):
        run.mixer.load_state_dict(state["mixture_bandit"])
        run.planner.set_rates(run.mixer.rates())
    if run.rank == 0:
        say(f"[mtl] resumed from {ckpt.version_name(run.step)} (step {run.step} of {run.spec.train.steps})")
        if run.step >= run.spec.train.steps:
            say(f"[mtl] '{run.spec.name}' already reached train.steps={run.spec.train.steps}; "
                f"raise train.steps to train further")
        elif all_stopped(run):
            say(f"[mtl] '{run.spec.name}': every task had stopped early; nothing is left to train")
    return True
