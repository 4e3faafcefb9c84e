"""What one rank's run holds while it trains (trainer.loop and its parts read and update it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.control import BanditMixer, EarlyStopping, HeadGuard, MixtureAdapter, StopRequests, TaskGradients
from trainer.data import StepPlanner, TaskData, TaskStream
from trainer.evaluation import BackgroundValidation
from trainer.memory import MemoryPhases
from trainer.trackers import Trackers
from trainer.versions import Storage
from trainer.versions import checkpoint as ckpt


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
    version_scores: dict = field(default_factory=dict)  # version -> its own validation scores (trainer.versions.version_registry)
    train_s: float = 0.0  # the optimizer steps' wall time so far, over resumes (a run's cost, for mtl baselines)
    early: EarlyStopping | None = None  # per-task early stopping (train.early_stopping)
    adapter: MixtureAdapter | None = None  # validation-driven rates (mixture.adapt)
    mixer: BanditMixer | None = None  # rates from the training losses (mixture.strategy: bandit)
    background: BackgroundValidation | None = None  # rank 0's validation tasks (train.validation: task)
    last_eval: dict = field(default_factory=dict)
    trackers: Trackers | None = None  # rank 0's TensorBoard / W&B / MLflow (tracking.to)
    tracker_ids: dict = field(default_factory=dict)  # the W&B / MLflow runs a resumed run continues
    stops: StopRequests | None = None  # set by train_loop_per_worker before fit
    upload: ckpt.Upload | None = None  # this rank's part of the version in flight
    blocked_s: float = 0.0  # how long the version in flight kept training waiting
    recent_step_s: list = field(default_factory=list)  # the last steps' times, for the ETA
    init_from: dict | None = None  # what the run started from, with the tasks' scores then (trainer.versions.init_from)
    ds_base: dict | None = None  # the job's DeepSpeed file as the driver read it (each version records it)
    memory: MemoryPhases | None = None  # this rank's peak memory per phase (trainer.memory)
    base: dict | None = None  # LoRA on pretrained weights: the base its versions name (trainer.versions.base_model)
    head_guard: HeadGuard | None = None  # heads of tasks a step does not train stay put (trainer.control.head_guard)
    surgery: TaskGradients | None = None  # per-task gradients for loss_weighting.surgery (trainer.control.gradient_surgery)


class WorkerStopped(RuntimeError):
    """A worker got SIGTERM: the version at this step is written; Ray Train restarts the group from it."""
