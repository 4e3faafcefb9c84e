"""The worker: one DeepSpeed rank, in a Ray Train worker or a torchrun process (trainer.runtime).

setup() (trainer.loop_setup) builds everything from the resolved job (data, streams, planner,
weighting, model, engine) and restores the latest version if there is one; fit() runs the
optimizer steps, handing versions to trainer.loop_versions and validation, with what acts on it,
to trainer.loop_validation. The state they share is trainer.loop_state.Run.
Each step runs its plan: so many micro-batches of each task, each one task only, each
back-propagated with its task's weight (and, by default, its share of its task's tokens in the
step: `loss_scales`); DeepSpeed steps the optimizer once, at the
accumulation boundary that closes the plan.
"""

from __future__ import annotations

import time

import torch

from trainer.collectives import all_reduce_sum, to_device
from trainer.control import HeadGuard, StopRequests, TaskGradients, agreed
from trainer.data import TaskStream
from trainer.evaluation import WAIT_AT_END_S
from trainer.job_env import receive_secrets
from trainer.loop_setup import setup
from trainer.loop_state import Run
from trainer.loop_validation import absorb_validations, all_stopped, stop_early, validate_in_loop
from trainer.loop_versions import commit_version, finish_upload, save_version
from trainer.memory import MemoryPhases, memory_key
from trainer.model import first_target, loss_items
from trainer.reporting import StepStats, quiet_libraries, say, step_line
from trainer.runtime import RayRuntime
from trainer.scratch import remove_orphans
from trainer.versions import checkpoint as ckpt
from trainer.versions import weights_only_loads


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


def fit(run: Run) -> None:
    """The optimizer steps. Ray Train hears of the run only when a version is saved: every
    ray.train.report is a barrier that waits for Ray's controller to collect it (it polls every
    2 s), so a report per step held fast steps to one per 2 s. Steps go to the console and
    TensorBoard instead."""
    spec, first = run.spec, run.step
    while run.step < spec.train.steps and not all_stopped(run):
        reasons, metrics = train_step(run, first)
        final = validate_in_loop(run, metrics, final=run.step == spec.train.steps)
        stopping = reasons["driver"] or reasons["sigterm"]
        preempted = preemption_noticed(run, reasons)
        every = spec.train.checkpoint_every
        if final or stopping or preempted or (every and run.step % every == 0):
            save_version(run, metrics)
        if stopping or preempted:  # committed now: a drained node may not live to see a later step
            finish_upload(run)
            if preempted and run.rank == 0:
                say(f"[mtl] version {ckpt.version_name(run.step)} committed before training goes on (preemption)")
        if stopping:
            stop_early(run, reasons)
            break
    finish_run(run)


def train_step(run: Run, first: int) -> tuple[dict[str, bool], dict]:
    """One optimizer step and its bookkeeping: (what asks the run to stop, agreed by every rank;
    the step's metrics). The step's one all-reduce also tells whether every rank's part of the
    version in flight is on storage, which commits it."""
    started = time.perf_counter()
    if run.step in (first, first + 1):
        run.memory.enter("step 1" if run.step == first else "steps")  # AdamW makes its moments at the first
    names = list(run.tasks)
    plan = run.planner.plan()
    weights = run.weighting.weights()
    held = run.head_guard.hold([t for t in names if not plan.get(t)]) if run.head_guard else []
    by_tokens = run.spec.train.loss_normalization == "tokens"
    stats = run_plan(run.engine, plan, run.streams, weights, names, run.device,
                     encoding=run.encoding if by_tokens else None, surgery=run.surgery, step=run.step)
    HeadGuard.restore(held)
    run.step += 1
    assert run.engine.global_steps == run.step, "plan size and DeepSpeed accumulation disagree"
    uploaded = run.upload is not None and run.upload.finished()
    per_task, flags = stats.reduce(run.device, [*run.stops.local(), float(uploaded)])
    if run.upload is not None and flags[-1] == run.world:  # every rank's part is on storage
        commit_version(run)
    losses = {t: v["loss"] for t, v in per_task.items() if v["micro_batches"]}  # each the mean over every rank
    run.weighting.end_step(losses)
    if run.mixer is not None:
        run.planner.set_rates(run.mixer.update(losses))
    for task, v in per_task.items():
        for key in run.seen[task]:
            run.seen[task][key] += v[key]
    return agreed(flags[:-1]), step_metrics(run, per_task, weights, time.perf_counter() - started)


def preemption_noticed(run: Run, reasons: dict[str, bool]) -> bool:
    """Whether a node's preemption notice arrived at this step (one version per notice)."""
    if not reasons["preemption"] or run.stops.preemption_seen:
        return False
    run.stops.preemption_seen = True
    if run.rank == 0:
        say(f"[mtl] a node of this run is being preempted: writing a version at step {run.step}")
    return True


def finish_run(run: Run) -> None:
    """After the last step: the last version on storage, the last validation tasks, the trackers."""
    finish_upload(run)
    if run.background is not None:
        absorb_validations(run, run.background.finished(WAIT_AT_END_S))
        if run.background.pending:
            say(f"[mtl] warning: validation of {', '.join(run.background.pending)} still running after "
                f"{WAIT_AT_END_S:.0f}s; the run ends without it (mtl eval --split validation scores it)")
    if run.trackers is not None:
        run.trackers.close()
    say(run.memory.line())


def run_plan(engine, plan: dict[str, int], streams: dict[str, TaskStream], weights: dict[str, float],
             tasks: list[str], device, *, encoding: str | None = None, surgery: TaskGradients | None = None,
             step: int = 0) -> StepStats:
    """One optimizer step: the plan's micro-batches, each of one task, each with its task's weight.

    With `encoding` (train.loss_normalization: tokens), each task's loss in the step is the mean over
    all its items (target tokens, or rows for a head; trainer.model.loss_items) in its micro-batches
    on every rank, as if they were one batch; without it, the mean of its micro-batches' own means.
    Either way a task's share of the step is its share of the micro-batches (see `loss_scales`).
    With `surgery` (loss_weighting.surgery), each task's gradient is kept apart and DeepSpeed gets
    their combination at the end (trainer.control.gradient_surgery); `step` is the run's step so far.
    """
    batches = [(task, with_first_target(streams[task].next_batch())) for task, count in plan.items()
               for _ in range(count)]
    items = [loss_items(host, encoding) if encoding else 1 for _, host in batches]
    scales = loss_scales([task for task, _ in batches], items, tasks, device) if encoding else None
    stats = StepStats(tasks)
    for i, (task, host) in enumerate(batches):
        forward = engine if surgery is None else engine.module  # DeepSpeed sees only the combination
        loss, weighted = forward(task, to_device(host, device), weight=weights[task], touch_heads=i == 0)
        weighted = weighted * scales[i] if scales is not None else weighted
        if surgery is None:
            engine.backward(weighted)  # DeepSpeed divides by gradient_accumulation_steps, its all-reduce by the world
            engine.step()  # steps the optimizer only at the boundary that ends this plan
        else:
            surgery.add(task, weighted / len(batches))
        stats.add(task, loss, host, items[i])  # no read back from the device until the step's end (StepStats)
    if surgery is not None:
        surgery.apply(engine, len(batches), step, device)
    return stats


def loss_scales(batch_tasks: list[str], items: list[int], tasks: list[str], device) -> torch.Tensor:
    """Each micro-batch's factor on its mean loss: its items × its task's micro-batches / its task's
    items, both counted over every rank.

    DeepSpeed averages the scaled losses over the step's N micro-batches (every rank's), so a task
    with n of them and I items contributes (n / N) · Σ item losses / I: the mean over its items, at
    the share its micro-batches have (transformers' `num_items_in_batch`, per task). One all-reduce
    of 2 numbers per task, before the first backward; the result stays on the device (the host does
    not wait for it)."""
    index = [tasks.index(t) for t in batch_tasks]
    local = torch.zeros(2, len(tasks), dtype=torch.float64)
    for i, n in zip(index, items):
        local[:, i] += torch.tensor([1.0, n], dtype=torch.float64)
    totals = all_reduce_sum(local, device, to_host=False)
    per_item = totals[0] / totals[1].clamp(min=1.0)
    return (torch.tensor(items, dtype=torch.float64, device=totals.device)
            * per_item[torch.tensor(index, device=totals.device)]).float()


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
    if run.surgery is not None and run.surgery.conflicts is not None:
        metrics["surgery/conflicts"] = int(run.surgery.conflicts)  # pairs of tasks projected apart this step
    if run.rank == 0:
        if run.step % run.spec.train.log_every == 0 or run.step == run.spec.train.steps:
            eta = (run.spec.train.steps - run.step) * sum(run.recent_step_s) / len(run.recent_step_s)
            say(step_line(run.step, run.spec.train.steps, per_task, lr, seconds, metrics["tokens_per_s"],
                          grad_norm=metrics["grad_norm"], eta_s=eta))
        run.trackers.scalars({k: v for k, v in metrics.items() if k != "step"}, run.step)
    return metrics
