"""Driver side of a training run: Ray (embedded or a cluster), storage, and the TorchTrainer.

`train()` is what `mtl train` runs on the user's machine and what `mtl submit` runs on the
cluster's head node: validate, write the resolved job next to the versions, build the Ray
Train objects from the job, fit, and summarise.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import uuid
from contextlib import contextmanager

from launcher.addresses import require_listening
from launcher.console import plain_ray_logging, tidy_worker_output
from launcher.jobfile import dump_job
from launcher.lease import Lease
from launcher.resources import PLACEMENT_STRATEGIES, require_resources, worker_bundle
from launcher.validate import require_valid
from launcher.versions import resume_point
from trainer.errors import RunStopped, UserError, first_line
from trainer.job_env import is_secret, secrets_for_workers
from trainer.memory import read_notes
from trainer.model import read_ds_config
from trainer.spec import JobSpec
from trainer.versions import Storage, init_from, open_storage

# Environment the workers need: offline flags and the DeepSpeed op cache travel with the job.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TORCH_EXTENSIONS_DIR",
                 "HF_HOME", "TOKENIZERS_PARALLELISM", "MTL_SCRATCH_DIR", "MTL_DATA_CACHE", "MTL_STORAGE_PROBE_WAIT_S",
                 # How long Ray Train's controller waits for a worker group to start (a restart after a
                 # lost node waits for the node's death to be noticed first).
                 "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
RAY_TRAIN_POLL_S = "0.5"
TRACKER_ENV_PREFIXES = ("WANDB_", "MLFLOW_")  # their settings, for rank 0's trackers (trainer.trackers)


def train(spec: JobSpec, *, address: str | None = None, on_change: str = "refuse", force: bool = False) -> dict:
    """on_change: what to do when the job differs from the version it would resume from in anything
    that shapes training — "refuse" (list the differences), "new" (a fresh experiment under the first
    free `<name>-N`), or "allow" (continue with the changes). See launcher.drift."""
    storage = open_storage(spec.storage)
    # An elastic run learns its size when Ray starts it: its workers say what a resize does.
    spec = prepare(spec, storage, on_change, workers=None if spec.scaling.elastic else spec.scaling.num_workers,
                   machine=address is None and not os.environ.get("RAY_ADDRESS"),  # embedded: workers run here
                   force=force)
    run_id = uuid.uuid4().hex  # names this run's lease on storage and its stop request in Ray's key-value store
    with Lease(storage, spec.name, run_id, spec.storage.lease_ttl_s):  # one run per experiment (launcher.lease)
        return _train_holding_the_lease(spec, storage, run_id, address)


def prepare(spec: JobSpec, storage: Storage, on_change: str, workers: int | None, *, machine: bool = False,
            force: bool = False) -> JobSpec:
    """What a driver does before it starts the workers (here and in launcher.torchrun): validate the
    job (machine: its memory plan must fit this machine, unless force), find the version it resumes
    from on `workers` (None: not known yet) and compare the job with that version's (on_change), and
    pin init_from. Returns the job to run."""
    for line in require_valid(spec, machine=machine, force=force).notes:  # data sizes and skipped bad rows: never dropped silently
        print(f"[mtl] {line}", file=sys.stderr)
    resume_from, resized = resume_point(storage, spec.name, spec.train, workers)
    if resume_from:
        spec, resume_from = check_drift(spec, storage, resume_from, on_change)
    if resume_from:
        print(f"[mtl] '{spec.name}' resumes from {resume_from} in {storage.describe(spec.name)}", file=sys.stderr)
        if resized:
            print(f"[mtl] {resized}", file=sys.stderr)
    elif spec.init_from is not None:
        spec = init_from.pinned(spec)  # latest / best / a tag: the same version on every rank and restart
        print(f"[mtl] '{spec.name}' starts from {spec.init_from.experiment}/{spec.init_from.version}", file=sys.stderr)
    return spec


def _train_holding_the_lease(spec: JobSpec, storage: Storage, run_id: str, address: str | None) -> dict:
    from ray.train import FailureConfig, LoggingConfig, RunConfig

    from trainer.control import clear_stop
    from trainer.loop import train_loop_per_worker

    storage.write_text(f"{spec.name}/job.yaml", dump_job(spec))
    with ray_session(address, use_gpu=spec.scaling.use_gpu) as started_here:
        # An embedded Ray has all the nodes it will ever have; a cluster may still be adding some.
        embedded = started_here and address is None
        require_resources(spec.scaling, wait_s=0.0 if embedded else spec.scaling.wait_for_nodes_s)
        trainer = _stoppable_trainer()(
            train_loop_per_worker,
            # The DeepSpeed file is read here: workers on other nodes need its content, not its path.
            train_loop_config={"job": spec.model_dump(mode="json"), "ds_config": read_ds_config(spec.deepspeed),
                               "run_id": run_id, "secrets": secrets_for_workers()},
            torch_config=torch_config(spec.scaling),
            scaling_config=scaling_config(spec.scaling),
            run_config=RunConfig(name=spec.name, storage_path=storage.ray_path, storage_filesystem=storage.fs,
                                 # No checkpoint_config: Ray is told metrics only; the versions, their
                                 # record and their retention live on storage (trainer.versions.checkpoint).
                                 failure_config=FailureConfig(max_failures=spec.train.max_failures),
                                 logging_config=LoggingConfig(log_level="WARNING")),
        )
        try:
            with stop_on_signals(run_id, spec.train.stop_grace_s) as asked, workers_user_errors(), \
                    memory_kills_named(run_id, spec.scaling.max_workers):
                result = trainer.fit()
        finally:
            clear_memory_notes(run_id, spec.scaling.max_workers)
        clear_stop(run_id)
    if asked:
        latest = (storage.read_json(f"{spec.name}/registry.json") or {}).get("latest")
        raise RunStopped(f"stopped by {asked[0].name}" + (f" at {latest}; run the same command to resume from it"
                                                          if latest else "; no version was written"),
                         128 + asked[0].value)
    return summarize(spec, storage, result)


@contextmanager
def workers_user_errors():
    """A mistake the workers found (a bad row, a file missing on their node) is raised here as the
    UserError it was, with its own message, instead of inside Ray's failure report."""
    from ray.train import TrainingFailedError

    try:
        yield
    except TrainingFailedError as exc:
        for failure in getattr(exc, "worker_failures", {}).values():
            cause = getattr(failure, "_base_exc", failure)  # Ray wraps it with its traceback's text
            if isinstance(cause, UserError):
                raise cause from None
        raise


@contextmanager
def memory_kills_named(run_id: str, world: int):
    """Ray's memory monitor kills a rank without a word from it, and its report is a page about
    Ray's own workers. Here it is one line: which rank, in which phase, at how much memory, and what
    to change (the ranks note their phase as they go: trainer.memory)."""
    from ray.train import TrainingFailedError

    try:
        yield
    except TrainingFailedError as exc:
        if not killed_for_memory(exc):
            raise
        from trainer.runtime import kv_get

        raise UserError(memory_kill_message(read_notes(kv_get, run_id, world), str(exc))) from None


def killed_for_memory(exc: BaseException) -> bool:
    from ray.exceptions import OutOfMemoryError

    failures = list(getattr(exc, "worker_failures", {}).values()) or [exc]
    return any(isinstance(getattr(f, "_base_exc", f), OutOfMemoryError) or "running low on memory" in str(f)
               for f in failures)


RAY_TOP_USERS = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+ray::RayTrainWorker", re.M)  # Ray's "Top 10 memory users"


def memory_kill_message(notes: dict[int, dict], ray_report: str = "") -> str:
    """One line from the ranks' notes (trainer.memory) and Ray's report of the kill, whose table of
    the largest processes gives each rank's memory when it was killed."""
    if not notes:
        return ("a worker was killed for memory before it started training (Ray's memory monitor); "
                "`mtl validate JOB` prints the memory plan")
    at_kill = {int(pid): float(gb) for pid, gb in RAY_TOP_USERS.findall(ray_report)}
    rank, note = max(notes.items(), key=lambda item: (at_kill.get(item[1].get("pid"), 0.0),
                                                      item[1].get("resident_gib", 0.0)))
    phase = note.get("phase", "?")

    def figure(r: int, n: dict) -> str:
        killed = at_kill.get(n.get("pid"))
        return (f"rank {r} {killed:.1f} GB when killed" if killed is not None else
                f"rank {r} {n.get('resident_gib', 0.0):.1f} GiB at its last note")
    figures = ", ".join(figure(r, n) for r, n in sorted(notes.items()))
    return (f"killed for memory (Ray's memory monitor) during {phase}: {figures}. "
            f"{MEMORY_ADVICE.get(phase, MEMORY_ADVICE['steps'])}; `mtl validate JOB` prints the memory plan")


# What lowers a rank's memory in each phase (trainer.memory's phase names).
MEMORY_ADVICE = {
    "data": "Preparing data took it: fewer rows per task (data.limit) or more memory per worker",
    "build": "Building the model took it: deepspeed: zero3 builds it partitioned across the workers",
    "engine init": "The model states took it: a higher ZeRO stage (zero2, zero3), offload (zero3_offload), "
                   "bf16, or more workers to share them",
    "start": "The model states took it: a higher ZeRO stage (zero2, zero3), offload (zero3_offload), "
             "bf16, or more workers to share them",
    "step 1": "The first step took it (AdamW's moments and the activations): a higher ZeRO stage or offload, "
              "smaller micro_batch_size or max_length, or model.gradient_checkpointing: true",
    "steps": "Training took it: smaller micro_batch_size or max_length, model.gradient_checkpointing: true, "
             "a higher ZeRO stage or offload",
    "version": "Writing a version took it: the version's copies of each rank's state; more memory per worker, "
               "or a higher ZeRO stage so each rank holds less",
}


def clear_memory_notes(run_id: str, world: int) -> None:
    from trainer.memory import memory_key
    from trainer.runtime import kv_del

    for rank in range(world):
        try:
            kv_del(memory_key(run_id, rank))
        except Exception:  # Ray already gone: nothing left to clear
            return


@contextmanager
def stop_on_signals(run_id: str, grace_s: float):
    """The first Ctrl-C or SIGTERM asks the workers to write a version at their next step and end
    (trainer.control.stopping); a second one, or the grace running out, stops at once (KeyboardInterrupt).
    Yields the list the first signal is appended to."""
    asked: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield asked
        return
    # After the grace, a SIGINT to ourselves ends the wait as a second Ctrl-C would.
    deadline = threading.Timer(grace_s, lambda: os.kill(os.getpid(), signal.SIGINT))
    deadline.daemon = True

    from trainer.control import request_stop

    def ask() -> None:
        try:
            request_stop(run_id)
        except Exception as exc:  # Ray itself going down (a Ctrl-C reaches its processes too)
            print(f"[mtl] could not ask the workers to stop: {exc}", file=sys.stderr, flush=True)

    def handle(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signal.Signals(signum))
        print(f"[mtl] {asked[0].name}: writing a version at the next step, then stopping (up to {grace_s:g}s; "
              f"Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        deadline.start()
        # Asked from a thread: with the local raylet gone (Ctrl-C in a terminal signals it too), Ray's
        # key-value put never returns, and a handler blocked in it would ignore every later signal.
        threading.Thread(target=ask, name="mtl-request-stop", daemon=True).start()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        deadline.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stoppable_trainer():
    from ray.train.torch import TorchTrainer

    class StoppableTrainer(TorchTrainer):
        """Ray Train's fit() makes Ctrl-C abort the run at once (its own SIGINT handler, set inside
        fit); stop_on_signals lets the workers write a version first, so Ray's is not installed."""

        def _register_sigint_handler(self, controller) -> None:
            return None

    return StoppableTrainer


def check_drift(spec: JobSpec, storage: Storage, version: str, on_change: str) -> tuple[JobSpec, str | None]:
    """(the spec to run, the version it resumes from) after comparing the job with the version's."""
    import yaml

    from launcher.drift import schedule_note, training_differences
    from trainer.model import job_heads_apart
    from trainer.versions import DS_FILE

    old_job = yaml.safe_load(storage.read_text(f"{spec.name}/{version}/job.yaml") or "{}") or {}
    new_job = spec.model_dump(mode="json")
    changes = training_differences(old_job, new_job, storage.read_json(f"{spec.name}/{version}/{DS_FILE}"),
                                   read_ds_config(spec.deepspeed))
    if changes and on_change == "refuse":
        raise UserError(f"'{spec.name}' would resume from {version}, but the job differs from the one it was "
                        f"trained with in what shapes training:\n" + "\n".join(f"  - {c}" for c in changes)
                        + "\n  Run with --new for a fresh experiment under a new name, or --allow-changes to "
                          "continue this one with the changes from the next step on.")
    if changes and on_change == "new":
        taken = set(storage.list_dirs())
        fresh = next(f"{spec.name}-{i}" for i in range(2, 10_000) if f"{spec.name}-{i}" not in taken)
        print(f"[mtl] the job differs from {spec.name}/{version}; starting a new experiment '{fresh}'",
              file=sys.stderr)
        spec = spec.model_copy(update={"name": fresh})
        return spec, None
    if changes and job_heads_apart(old_job) != job_heads_apart(new_job):
        raise UserError(f"'{spec.name}' cannot continue from {version} with these changes: tasks.<t>.lr_scale or "
                        "train.head_warmup_steps now give the heads optimizer groups of their own (or no longer "
                        "do), and the version's optimizer state has the other layout. Run with --new, or keep "
                        "those settings as they were (any lr_scale other than 1, or a head warm-up, on both sides).")
    for change in changes:
        print(f"[mtl] continuing with a change: {change}", file=sys.stderr)
    state = storage.read_json(f"{spec.name}/{version}/trainer_state.json") or {}
    note = schedule_note(old_job.get("train", {}), new_job["train"], int(state.get("step", 0)))
    if note:
        print(f"[mtl] {note}", file=sys.stderr)
    return spec, version


def torch_config(scaling):
    """Ray Train's process group for the job: NCCL on GPUs, gloo on CPUs, with the job's timeout
    (DeepSpeed joins the group Ray made, so this is every collective's timeout)."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if scaling.use_gpu else "gloo", timeout_s=int(scaling.collective_timeout_s))


def scaling_config(scaling):
    """Ray Train's ScalingConfig for the job's `scaling` block."""
    from ray.train import ScalingConfig

    resources = {k: v for k, v in worker_bundle(scaling).items() if not k.startswith("accelerator_type:")}
    # [min, max]: Ray starts with what the cluster holds, restarts smaller after a lost node (a
    # failure, within train.max_failures) and larger when nodes return (every resize_check_s).
    elastic = {"elastic_resize_monitor_interval_s": scaling.resize_check_s} if scaling.elastic else {}
    return ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
                         placement_strategy=PLACEMENT_STRATEGIES[scaling.placement],
                         accelerator_type=scaling.accelerator_type, **elastic)


def worker_env(use_gpu: bool) -> dict[str, str]:
    # Secrets never: Ray shows every runtime_env (trainer.job_env says how they reach the workers).
    env = {k: v for k, v in os.environ.items() if (k in FORWARDED_ENV or k.startswith(TRACKER_ENV_PREFIXES)
                                                   or k == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") and not is_secret(k)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray Train turns print() into log records; dill (under datasets) prints while it captures
    # stdout, and those records would flood the console with bytecode dumps.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    if not use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than have DeepSpeed warn that it guessed
    # Ray Train's controller collects each report and notices the end of a run at this interval
    # (2 s by default): every version's report and every run's end waited for it.
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", RAY_TRAIN_POLL_S)
    return env


@contextmanager
def ray_session(address: str | None = None, **kwargs):
    """Ray for the block: this process's own connection if it has one (left as it was), else a
    new one (init_ray), shut down after. Yields whether it was started here."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        init_ray(address, **kwargs)
    try:
        yield started_here
    finally:
        if started_here:
            ray.shutdown()


def init_ray(address: str | None = None, *, use_gpu: bool = False, **kwargs) -> None:
    """Join a cluster (address) or start an embedded local Ray, with the workers' environment."""
    import ray

    if not sys.stdout.isatty():  # Ray colours the worker prefixes; colour codes in a log file are noise
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    env = worker_env(use_gpu)
    for key in submitted_job_env():  # Ray refuses a driver env var that the submitted job already sets
        env.pop(key, None)
    if address is None and not os.environ.get("RAY_ADDRESS"):  # an embedded Ray, started here
        # The dashboard serves Ray's state API, which Ray Train's cleanup polls; keep it on loopback.
        kwargs.setdefault("dashboard_host", "127.0.0.1")
        if kwargs.get("include_dashboard") is not False:
            # Ray Train's placement-group cleaner asks the state API without an address, which looks
            # for every Ray on this machine and fails with a traceback when there are two (two runs,
            # a run beside `mtl serve`). Told this Ray's dashboard, it asks this one.
            port = kwargs.setdefault("dashboard_port", dashboard_port(kwargs["dashboard_host"]))
            env.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
        # Ray starts one idle worker per CPU for the first driver. None of them can run this job's
        # actors (their runtime_env differs), and on a small machine starting them takes CPU from
        # the run's own start (time to first step 25.3-26.2 s -> 24.6-24.9 s on 2 CPUs).
        kwargs["_system_config"] = {"prestart_worker_first_driver": False, **kwargs.get("_system_config", {})}
        # Ray Train's preemption watcher follows node drains, which a cluster's autoscaler sends; an
        # embedded Ray is one node that nothing drains (a machine going away sends SIGTERM, handled
        # by trainer.control.stopping). Its actor started beside the workers and took their CPU.
        env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    plain_ray_logging()
    where = address or os.environ.get("RAY_ADDRESS")  # what ray.init joins; None: it starts one
    if where:
        require_listening(where)
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
    except (ConnectionError, ValueError) as exc:  # an address Ray cannot read, or a cluster that fails to answer
        if not where:
            raise
        raise UserError(f"cannot join the Ray cluster at {where}: {first_line(exc)} (a driver needs the cluster's "
                        "GCS address, HEAD:6379, reachable from here; `ray status --address HEAD:6379` checks it)"
                        ) from None
    tidy_worker_output()


def dashboard_port(host: str) -> int:
    """Ray's usual dashboard port (8265) when it is free here, else a free one."""
    import socket

    from launcher.local_cluster import free_port
    from launcher.ray_auth import DEFAULT_DASHBOARD_PORT

    with socket.socket() as probe:
        try:
            probe.bind((host, DEFAULT_DASHBOARD_PORT))
            return DEFAULT_DASHBOARD_PORT
        except OSError:
            return free_port()


def submitted_job_env() -> set[str]:
    """The env var names of the Jobs API submission this driver runs in (none when run by hand)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    runtime_env = json.loads(raw).get("runtime_env") or {}
    return set((runtime_env.get("env_vars") or {}).keys())


def summarize(spec: JobSpec, storage: Storage, result) -> dict:
    registry = storage.read_json(f"{spec.name}/registry.json") or {}
    print(f"[mtl] run '{spec.name}' finished at {registry.get('latest', '?')}; versions in "
          f"{storage.describe(spec.name)}", file=sys.stderr)
    return {"registry": registry, "metrics": result.metrics if result is not None else {}}
