"""The job spec: one typed tree that a user writes as YAML, read by the driver (launcher) and the
workers alike; it lives in the worker library so that the driver depends on it, never the reverse.

Every field has a description (it is the reference the README is generated from) and is
checked here for what can be checked without touching files. Checks that read files
(data columns, DeepSpeed JSON) live in `launcher.validate`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.tasks import registry, text2text


class _Strict(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSpec(_Strict):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; null lets peft pick for the architecture."
    )
    layers_to_transform: list[int] | None = Field(
        None, description="Indices of the transformer layers to adapt (peft's option); null adapts all. Adapting "
                          "only the top layers also skips the backward pass through the layers below them.")


class ModelSpec(_Strict):
    name_or_path: str = Field(description="Hub model id or a local folder with config + weights.")
    kind: Literal["heads", "text2text"] = Field(
        "heads",
        description="heads: a shared AutoModel backbone with one head per task. "
        "text2text: one LM head (causal or seq2seq, read from the config) with instruction prompts.",
    )
    max_length: int = Field(256, ge=8, description="Longest input in tokens; longer inputs are truncated (and counted).")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters (through peft) instead of all weights.")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="pretrained: the weights in name_or_path. random: a fresh initialisation of its "
                                  "config (train.seed), nothing read but the config and tokenizer (benchmarks, tests).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="Attention kernels (transformers' attn_implementation); null: the model's default (sdpa "
                          "where it supports it). flash_attention_2 needs the flash-attn package and GPUs.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass instead of keeping them (less memory, "
                           "about a third more compute); the model must support it.")


class DataSpec(_Strict):
    """Where a task's rows come from: explicit split files, one file split by fractions, or a hub dataset."""

    train: str | None = Field(None, description="Train split file (jsonl/json/csv/tsv/parquet).")
    validation: str | None = Field(None, description="Validation split file.")
    test: str | None = Field(None, description="Test split file.")
    path: str | None = Field(None, description="One file (or a folder of files) to derive splits from.")
    split: dict[Literal["validation", "test"], float] | None = Field(
        None, description="With `path`: fractions held out, e.g. {validation: 0.1, test: 0.1}; the rest is train."
    )
    seed: int = Field(0, description="Seed of the deterministic split derivation.")
    hub: str | None = Field(None, description="Hub dataset name (e.g. glue); needs the hub at run time.")
    subset: str | None = Field(None, description="Hub dataset configuration (e.g. sst2).")
    splits: dict[Literal["train", "validation", "test"], str] | None = Field(
        None, description="With `hub`: which hub split plays each role (default: same names)."
    )
    format: Literal["jsonl", "json", "csv", "tsv", "parquet"] | None = Field(
        None, description="File format; default: from the file extension."
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many rows of each split (for smoke runs).")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        files = self.train is not None
        derived = self.path is not None
        hub = self.hub is not None
        if files + derived + hub != 1:
            raise ValueError("give exactly one source: train/validation/test files, `path` (+ `split`), or `hub`")
        if files and (self.split is not None):
            raise ValueError("`split` only goes with `path` (explicit split files are used as they are)")
        if derived:
            if self.validation or self.test:
                raise ValueError("`validation`/`test` files do not go with `path`; use `split` fractions")
            fractions = self.split or {}
            if any(not 0.0 < f < 1.0 for f in fractions.values()):
                raise ValueError(f"split fractions must be between 0 and 1, got {fractions}")
            if sum(fractions.values()) >= 1.0:
                raise ValueError(f"split fractions sum to {sum(fractions.values()):g}; nothing would be left to train on")
        if not hub and (self.subset or self.splits):
            raise ValueError("`subset`/`splits` only go with `hub`")
        return self


class TaskSpec(_Strict):
    type: str = Field(description="Task type from the registry: " + ", ".join(registry.names()) + ".")
    data: DataSpec = Field(description="Where the rows come from.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Map task fields onto file columns, e.g. {text: sentence}; default: same name."
    )
    prompt: str | None = Field(
        None, description="Instruction template over the task fields, e.g. 'sentiment: {text}' (text2text models)."
    )
    weight: float = Field(1.0, ge=0.0, description="Static loss weight (the starting point of adaptive weighting).")
    lr_scale: float = Field(1.0, gt=0.0, description="Multiplies train.lr for this task's head (heads models): a new "
                            "head may want a larger rate than the pretrained backbone. A text2text model has no "
                            "head; a task's share of its shared gradient is `weight`.")
    metrics: list[str] | None = Field(None, description="Metric names, the primary first (it ranks versions: "
                                                        "best:<task>, keep_best); default: the task type's defaults.")
    labels: list[str] | None = Field(None, description="Classification label set and order; default: inferred from train.")
    rate: float | None = Field(None, gt=0.0, description="Sampling rate under `mixture.strategy: explicit`.")
    accumulation: int | None = Field(
        None, ge=1, description="Fixed number of this task's micro-batches in every optimizer step."
    )
    micro_batch_size: int | None = Field(None, ge=1, description="Rows per micro-batch for this task (default: train.micro_batch_size).")
    max_tokens: int | None = Field(
        None, ge=8, description="Token budget per micro-batch (rows x padded length); replaces micro_batch_size."
    )
    max_length: int | None = Field(None, ge=8, description="Input length for this task (default: model.max_length).")
    bad_rows: Literal["skip", "error"] = Field("skip", description="skip (count and report) or error on bad rows.")
    options: dict[str, Any] = Field(default_factory=dict, description="Options of the task type (see its reference).")

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        registry.get(value)  # raises with a suggestion
        return value

    @model_validator(mode="after")
    def _type_checks(self) -> TaskSpec:
        task_type = registry.get(self.type)
        unknown = set(self.columns) - set(task_type.fields)
        if unknown:
            field = sorted(unknown)[0]
            raise ValueError(
                f"columns: '{field}' is not a field of {self.type} tasks"
                f"{registry.suggest(field, task_type.fields)} (fields: {', '.join(task_type.fields)})"
            )
        if self.max_tokens is not None and self.micro_batch_size is not None:
            raise ValueError("give micro_batch_size or max_tokens, not both")
        _check_options(self.type, task_type.options_model, self.options)
        if self.metrics is not None:
            for name in self.metrics:
                if name not in task_type.allowed_metrics:
                    raise ValueError(
                        f"metric '{name}' does not apply to {self.type} tasks{registry.suggest(name, task_type.allowed_metrics)}"
                        f" (choose from {', '.join(task_type.allowed_metrics)})"
                    )
        if self.prompt is not None:
            allowed = task_type.prompt_fields
            for name in sorted(text2text.template_fields(self.prompt) - set(allowed) - {"task"}):
                answer = " (the answer the model learns to give)" if name in task_type.fields else ""
                raise ValueError(f"prompt: '{{{name}}}' cannot be used in a {self.type} prompt{answer}"
                                 f"{registry.suggest(name, allowed) if not answer else ''}; use "
                                 + ", ".join("{" + f + "}" for f in ("task", *allowed)))
        if self.labels is not None and self.type != "classification":
            raise ValueError("`labels` only applies to classification tasks")
        return self

    def column(self, field: str) -> str:
        """The file column that holds `field`."""
        return self.columns.get(field, field)


def _check_options(type_name: str, model: type[BaseModel], options: dict[str, Any]) -> None:
    """The task type's options, reported under `options.<key>` with the valid keys."""
    valid = list(model.model_fields)
    for key in options:
        if key not in valid:
            raise ValueError(f"options.{key}: unknown option of {type_name} tasks{registry.suggest(key, valid)}"
                             f" (options: {', '.join(valid) or 'none'})")
    try:
        model.model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"options.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class AdaptSpec(_Strict):
    by: Literal["trend", "reference"] = Field(
        "trend", description="trend: a task whose primary validation metric still gains (more than min_delta since "
        "the last validation) gets more micro-batches, one that gains no more gets fewer. reference: a task below "
        "its `reference` score gets more, one that reached it gets fewer.")
    reference: dict[str, float] | None = Field(
        None, description="by: reference — task -> the primary metric it should reach (e.g. its single-task run's).")
    factor: float = Field(1.5, gt=1.0, description="At each validation a lagging task's rate is multiplied by it, "
                                                   "a saturated task's divided by it.")
    min_scale: float = Field(0.25, gt=0.0, le=1.0, description="Lowest multiple of a task's starting rate.")
    max_scale: float = Field(4.0, ge=1.0, description="Highest multiple of a task's starting rate.")
    min_delta: float = Field(0.0, ge=0.0, description="trend: a gain of this much or less is no gain; reference: "
                                                      "a gap of this much or less counts as reached.")

    @model_validator(mode="after")
    def _reference(self) -> AdaptSpec:
        if self.by == "reference" and not self.reference:
            raise ValueError("by: reference needs `reference` (task -> score of its primary metric)")
        return self


class MixtureSpec(_Strict):
    strategy: Literal["proportional", "capped", "temperature", "uniform", "explicit", "bandit"] | None = Field(
        None,
        description="How tasks share the micro-batches of a step: proportional to train size, capped-proportional "
        "(sizes capped at `cap`), temperature (size^(1/T)), uniform, explicit `rates`, or bandit: online, from "
        "each task's training loss (EXP3 in the style of ODM, Albalak et al. 2023), starting uniform. Unset: "
        "uniform for a text2text model, temperature for a heads model (what the quality benchmark "
        "supports for each kind, BENCHMARKS.md).",
    )
    temperature: float = Field(2.0, gt=0.0, description="T of the temperature strategy (1 = proportional).")
    draw: Literal["even", "random"] = Field(
        "even", description="How a step's micro-batches are dealt from the rates: even (each task's count stays "
        "within about one micro-batch of its rate times the micro-batches so far; the seed sets the order) or "
        "random (each step drawn independently: a small task can go unseen for many steps).")
    cap: int | None = Field(None, ge=1, description="K of the capped strategy, in train rows.")
    smoothing: float = Field(0.9, ge=0.0, lt=1.0, description="bandit: how much of each task's reward estimate a "
                             "step keeps (ODM's 0.9); the rest is the step's importance-weighted reward.")
    rates: dict[str, float] | None = Field(None, description="Task -> rate for `explicit` (normalised; or tasks.<t>.rate).")
    adapt: AdaptSpec | None = Field(
        None, description="Rebalance the rates from validation (every train.eval_every steps), within bounds; every "
                          "change is logged, saved with the version and resumed. null: the rates stay as drawn.")

    @model_validator(mode="after")
    def _strategy_args(self) -> MixtureSpec:
        if self.strategy == "capped" and self.cap is None:
            raise ValueError("strategy 'capped' needs `cap` (rows per task counted at most)")
        if self.rates is not None:
            if self.strategy != "explicit":
                raise ValueError("`rates` only goes with strategy 'explicit'")
            bad = {k: v for k, v in self.rates.items() if not v > 0}
            if bad:
                raise ValueError(f"rates must be > 0, got {bad}")
        return self


class WeightingSpec(_Strict):
    strategy: Literal["static", "uncertainty", "dwa", "famo"] = Field(
        "static",
        description="static: tasks.<t>.weight. uncertainty: learned log-variances (Kendall et al. 2018). "
        "dwa: dynamic weight averaging (Liu et al. 2019) from the loss ratios of the last two windows. "
        "famo: fast adaptive multitask optimization (Liu et al. 2023): every task's loss falls at a balanced "
        "log rate, learned from the losses alone. Each is multiplied by tasks.<t>.weight.",
    )
    temperature: float = Field(2.0, gt=0.0, description="DWA softmax temperature.")
    window: int = Field(10, ge=1, description="DWA: optimizer steps per loss-averaging window.")
    lr: float = Field(1e-2, gt=0.0, description="Uncertainty: learning rate of the log-variances.")
    famo_lr: float = Field(0.025, gt=0.0, description="FAMO: Adam's learning rate for the task logits (the paper's).")
    famo_decay: float = Field(0.01, ge=0.0, description="FAMO: weight decay of the task logits (the paper's gamma).")
    surgery: Literal["none", "pcgrad"] = Field(
        "none", description="pcgrad (Yu et al. 2020): where two tasks' gradients on the shared parameters of a "
        "step conflict (a negative dot product), each loses its component along the other before they are "
        "summed. Holds each task's gradient of the step on every rank (one copy per task in the step): ZeRO "
        "stages 0-1, bf16 or fp32.")


class EarlyStoppingSpec(_Strict):
    patience: int = Field(3, ge=1, description="Validations in a row without a gain in a task's primary metric "
                                               "before the task stops.")
    min_delta: float = Field(0.0, ge=0.0, description="A gain of this much or less does not count.")
    action: Literal["freeze", "downweight"] = Field(
        "freeze", description="What stopping does: freeze (no more micro-batches) or downweight (its sampling rate "
        "times `factor`; a task with a fixed accumulation is frozen). The run ends when every task has stopped.")
    factor: float = Field(0.25, gt=0.0, lt=1.0, description="downweight: the multiplier of a stopped task's rate.")


class TrainSpec(_Strict):
    steps: int = Field(200, ge=1, description="Optimizer steps in total (raise it to train a finished run further).")
    micro_batch_size: int = Field(8, ge=1, description="Rows per micro-batch (per worker) unless a task sets its own.")
    micro_batches_per_step: int = Field(
        4, ge=1, description="Micro-batches per optimizer step per worker (DeepSpeed gradient_accumulation_steps). "
                             "An elastic run counts it at its most workers and keeps the global batch: on fewer, "
                             "each worker takes proportionally more (every size must divide it evenly)."
    )
    lr: float = Field(5e-5, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from 0 to `lr`.")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="After warm-up: linear or cosine decay to 0 at `steps`, or constant.")
    head_warmup_steps: int = Field(0, ge=0, description="Heads models: train only the task heads for the first N "
                                   "steps (the backbone's rate is 0), then everything, the backbone on the schedule "
                                   "of the steps left (LP-FT, Kumar et al. 2022: random heads do not distort the "
                                   "pretrained features first).")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping; null disables it.")
    loss_normalization: Literal["tokens", "micro_batch"] = Field(
        "tokens", description="tokens: a task's loss in a step is the mean over all its target tokens (rows, for "
        "a head) in the step's micro-batches on every rank, so a micro-batch of long answers counts for more than "
        "one of short ones; each task keeps its share of the step. micro_batch: the mean of its micro-batches' own "
        "means, each counting alike (what versions written before this field trained with).")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="Training precision; auto: bf16 where the hardware computes it natively (Ampere+ "
                            "GPUs, CPUs with AMX/AVX512-BF16), else fp32.")
    eval_every: int = Field(50, ge=0, description="Evaluate every N steps (0: only at the end).")
    validation: Literal["loop", "task"] = Field(
        "loop", description="loop: every eval_every steps, in the training loop (every rank waits). task: each "
        "committed version is validated by a Ray task beside the run (validation_cpus / validation_gpus) while "
        "training goes on; eval_every is then unused. Early stopping and mixture.adapt need loop.")
    validation_cpus: float = Field(0.0, ge=0.0, description="train.validation: task — CPUs its Ray task reserves "
                                   "(0: it shares the CPUs the workers hold; a run waits for its last validation, "
                                   "so a reservation the cluster cannot add beside the workers would stall it).")
    validation_gpus: float = Field(0.0, ge=0.0, description="train.validation: task — GPUs its Ray task reserves.")
    checkpoint_every: int = Field(50, ge=0, description="Write a version every N steps (0: only at the end).")
    keep_last: int | None = Field(None, ge=1, description="Keep only the N newest versions (null keeps all).")
    keep_best: bool = Field(True, description="With keep_last: also keep each task's best version and the best overall (by validation).")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the latest version after a failure (-1: no limit).")
    stop_grace_s: float = Field(
        120.0, gt=0.0, description="On Ctrl-C or SIGTERM (driver or worker), how long the run may take to write a "
                                   "version at the current step before it is stopped at once.")
    seed: int = Field(0, description="Seed of sampling, data order, initialisation and dropout.")
    log_every: int = Field(1, ge=1, description="Print a step line every N steps (TensorBoard gets every step).")
    eval_batch_size: int | None = Field(None, ge=1, description="Rows per evaluation batch (default: micro_batch_size).")
    length_grouping: bool = Field(True, description="Group examples of similar length into micro-batches.")
    pool_micro_batches: int = Field(50, ge=1, description="Micro-batches per length-sorting pool.")
    early_stopping: EarlyStoppingSpec | None = Field(
        None, description="Per-task early stopping on the validation split (every eval_every steps): a task that "
                          "stopped improving is frozen while the others go on, its best version kept (keep_best); "
                          "when every task has stopped, the run writes a version and ends. null: off.")

    @model_validator(mode="after")
    def _warmup(self) -> TrainSpec:
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.head_warmup_steps >= self.steps and self.head_warmup_steps > 0:
            raise ValueError(f"head_warmup_steps ({self.head_warmup_steps}) must be below steps ({self.steps}): the "
                             "backbone would never train")
        if self.early_stopping is not None and not self.eval_every:
            raise ValueError("early_stopping needs eval_every (validations during the run to compare)")
        if self.early_stopping is not None and self.validation == "task":
            raise ValueError("early_stopping needs validation: loop (it acts on each validation as the run goes)")
        return self


class ScalingSpec(_Strict):
    num_workers: int | tuple[int, int] = Field(
        2, description="Ray Train workers (one DeepSpeed rank each), or [min, max] for an elastic run: it starts with "
                       "as many as the cluster holds (at least min), goes on with fewer after a node is lost and grows "
                       "back when nodes return, each time from the latest version and with the same global batch "
                       "(see train.micro_batches_per_step).")
    resize_check_s: float = Field(
        60.0, gt=0.0, description="Elastic runs: how often Ray looks for room for more workers. Growing restarts the "
                                  "workers from the latest version (what was trained after it is done again).")
    use_gpu: bool = Field(False, description="Train on GPUs (NCCL): each worker reserves `gpus_per_worker` GPUs.")
    gpus_per_worker: float = Field(1.0, gt=0.0, description="GPUs reserved per worker with use_gpu: 1, one GPU per "
                                   "rank (more GPUs: more workers).")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per worker; CPU workers run that many torch threads.")
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        "pack", description="Ray placement of the workers: pack onto few nodes, spread over nodes when possible, "
                            "or strict_spread (every worker on its own node).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type the workers need (e.g. A100, H100).")
    wait_for_nodes_s: float = Field(
        60.0, ge=0.0, description="How long to wait for nodes that can hold the workers to join a cluster before "
                                  "giving up with what was asked and what the cluster has (0: do not wait).")
    collective_timeout_s: float = Field(
        1800.0, ge=60.0, description="How long a collective (all-reduce, barrier) waits for the slowest rank before "
                                     "the run fails: longer than the slowest thing one rank does while the others "
                                     "wait (a node's first tokenization, a universal-checkpoint conversion, a large "
                                     "final upload).")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value):
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"scaling.num_workers: a number of workers or [min, max], got {value}")
            low, high = value
            if not 1 <= low <= high:
                raise ValueError(f"scaling.num_workers: [min, max] needs 1 <= min <= max, got [{low}, {high}]")
            return (low, high) if low < high else low
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"scaling.num_workers must be at least 1, got {value}")
        return value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    @property
    def sizes(self) -> range:
        """Every number of workers the run may have."""
        return range(self.min_workers, self.max_workers + 1)

    @model_validator(mode="after")
    def _gpu_fields(self) -> ScalingSpec:
        if not self.use_gpu:  # by value: a resolved job written out and read back has every field set
            if self.gpus_per_worker != 1.0:
                raise ValueError("scaling.gpus_per_worker needs scaling.use_gpu: true")
            if self.accelerator_type:
                raise ValueError("scaling.accelerator_type needs scaling.use_gpu: true")
        elif self.gpus_per_worker != 1.0:
            # DeepSpeed puts the model on the device of the worker's local rank while the batches and
            # collectives use the GPU Ray gave it: with 2 per worker the model lands on another
            # worker's GPU, with 0.5 two ranks share one and NCCL refuses them.
            raise ValueError(f"scaling.gpus_per_worker: {self.gpus_per_worker:g} is not supported; each worker "
                             f"trains on one GPU (1): for more GPUs use more workers (scaling.num_workers)")
        return self


class StorageSpec(_Strict):
    path: str = Field("./runs", description="Local/NFS folder or s3://bucket/prefix for versions and metrics.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (e.g. http://127.0.0.1:9000).")
    region: str | None = Field(None, description="S3 region.")
    lease_ttl_s: float = Field(60.0, ge=3.0, description="One run per experiment: a run's driver renews its lease "
                               "on storage every ttl/4; a lease unrenewed this long (a killed driver) is taken over.")


class ServeSpec(_Strict):
    """What one request to `mtl serve` may cost: checked before it waits for a batch."""

    max_new_tokens: int = Field(256, ge=1, description="Most tokens a request may ask to generate "
                                "(`options.max_new_tokens`); over it: 422. The tasks' own settings are not capped.")
    max_beams: int = Field(4, ge=1, description="Widest beam search a request may ask for (`options.num_beams`); "
                                                "over it: 422.")
    timeout_s: float = Field(60.0, gt=0, description="A request not answered in this time gets 504, and its "
                                                     "generation stops: the replica is free again.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body; larger: 413, refused on "
                                "Content-Length before it is read, or as soon as a body without one grows past it.")
    max_inputs: int = Field(64, ge=1, description="Rows in one request; more: 413.")
    max_input_chars: int = Field(20_000, ge=1, description="Characters in one field of a row; more: 413.")


TRACKERS = ("tensorboard", "wandb", "mlflow")


class TrackingSpec(_Strict):
    to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"], description="Where the run's hyper-parameters, losses, loss weights, rates and per-task "
        "validation metrics go; each is off unless named (`tracking: [tensorboard, wandb]` is short for this). "
        "`mtl report` draws from TensorBoard's.")
    wandb_project: str | None = Field(None, description="W&B project (default: $WANDB_PROJECT, else 'mtl').")
    wandb_mode: Literal["online", "offline"] | None = Field(
        None, description="W&B mode (default: $WANDB_MODE, else online); offline keeps the run for `wandb sync`.")
    wandb_dir: str | None = Field(None, description="Folder of W&B's files (default: $WANDB_DIR, else beside the "
                                                    "experiment on local storage, else the worker's folder).")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a file "
                                                     "store `mlruns` beside the experiments on local storage).")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment (default: the job's name).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"to": value} if isinstance(value, list) else value

    @field_validator("to")
    @classmethod
    def _once_each(cls, to: list[str]) -> list[str]:
        return list(dict.fromkeys(to))


class InitFromSpec(_Strict):
    experiment: str = Field(description="The experiment to start from: a name on this job's storage, or an "
                            "experiment folder / URI (./runs/demo, s3://bucket/runs/demo).")
    version: str = Field("latest", description="Its version: latest, best, best:TASK, a tag or step-N "
                         "(resolved once, when the run starts).")
    resume_optimizer: bool = Field(False, description="Also continue the version's optimizer state (Adam moments); "
                                   "needs the same tasks in the same order, model and number of workers. The "
                                   "learning-rate schedule and the step count start afresh.")


def task_name_problem(name: object) -> str | None:
    """Why `name` cannot name a task, or None. A task's name becomes a file name (a version's
    heads/<task>.safetensors, an export's), so it holds letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        return f"task name {name!r} must be letters, digits, '_' or '-'"
    return None


# mixture.strategy when a job leaves it unset, per model.kind. An LM trained one task a step learns a
# task from the steps it gets, and by size a small task that generates long text got too few of them
# (it ended below the base model); uniform rates kept every task above it on two mixes at the same
# average (BENCHMARKS.md, "Quality"). A heads model has no such evidence against the usual size^(1/2).
DEFAULT_MIXTURE = {"text2text": "uniform", "heads": "temperature"}


class JobSpec(_Strict):
    name: str = Field(description="Experiment name; running the same name again resumes it.", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: ModelSpec
    tasks: dict[str, TaskSpec] = Field(description="Task name -> task; names are used in logs, folders and routing.")
    mixture: MixtureSpec = Field(default_factory=MixtureSpec)
    loss_weighting: WeightingSpec = Field(default_factory=WeightingSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    deepspeed: str = Field("zero2", description="DeepSpeed JSON (a path, or a shipped name: zero0 … zero3_offload); "
                           "batch numbers, clipping and precision are filled in from the job.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec, description="Limits of `mtl serve` for this job's versions "
                             "(each `mtl serve --max-...` flag overrides one).")
    init_from: InitFromSpec | None = Field(
        None, description="Start a new run from a version's weights (a fresh optimizer): tasks it knows keep their "
        "heads (or prompts), new tasks get new heads; old tasks' validation metrics are reported before and "
        "after. A run that already has versions resumes from its own.")

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
        if not tasks:
            raise ValueError("at least one task is needed")
        for name in tasks:
            if problem := task_name_problem(name):
                raise ValueError(problem)
        return tasks

    @model_validator(mode="after")
    def _default_mixture(self) -> JobSpec:
        if self.mixture.strategy is None:
            self.mixture.strategy = DEFAULT_MIXTURE[self.model.kind]
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        for name, task in self.tasks.items():
            task_type = registry.get(task.type)
            if self.model.kind not in task_type.model_kinds:
                raise ValueError(
                    f"tasks.{name}: {task.type} tasks need model.kind "
                    f"{' or '.join(task_type.model_kinds)}, but model.kind is '{self.model.kind}'"
                )
        for name, task in self.tasks.items():
            stride = task.options.get("doc_stride")
            length = task.max_length or self.model.max_length
            if task.type == "extractive_qa" and stride and stride * 2 > length:
                raise ValueError(f"tasks.{name}.options.doc_stride ({stride}) must be at most half of the task's "
                                 f"max_length ({length}): consecutive windows overlap by it")
        if self.model.kind == "text2text":
            scaled = [f"tasks.{n}.lr_scale" for n, t in self.tasks.items() if t.lr_scale != 1.0]
            if scaled:
                raise ValueError(f"{', '.join(scaled)}: lr_scale sets the rate of a task's head, and a text2text "
                                 "model has none; a task's share of the shared gradient is its `weight`")
            if self.train.head_warmup_steps:
                raise ValueError("train.head_warmup_steps trains the task heads alone first, and a text2text model "
                                 "has none (model.kind heads has one per task)")
        if self.model.attn_implementation == "flash_attention_2" and not self.scaling.use_gpu:
            raise ValueError("model.attn_implementation: flash_attention_2 runs on GPUs only (scaling.use_gpu: true); "
                             "use sdpa or eager on CPUs")
        if self.tasks and all(task.weight == 0 for task in self.tasks.values()):
            raise ValueError(f"every task's weight is 0 ({', '.join(f'tasks.{n}.weight' for n in self.tasks)}): "
                             "the loss would be 0 and nothing would train; give at least one task a weight > 0")
        if self.mixture.strategy == "explicit":
            rates = self.explicit_rates()
            missing = [t for t in self.tasks if t not in rates and self.tasks[t].accumulation is None]
            if missing:
                raise ValueError(f"mixture 'explicit' needs a rate for every task; missing: {', '.join(missing)}")
        adapt = self.mixture.adapt
        if adapt is not None and self.mixture.strategy == "bandit":
            raise ValueError("mixture.adapt and mixture.strategy 'bandit' both move the rates: choose one")
        if adapt is not None:
            if not self.train.eval_every or self.train.validation == "task":
                raise ValueError("mixture.adapt needs train.eval_every and train.validation: loop (validations "
                                 "in the loop to adapt from)")
            if all(t.accumulation for t in self.tasks.values()):
                raise ValueError("mixture.adapt needs tasks without a fixed `accumulation` (it moves sampling rates)")
            if adapt.by == "reference":
                unknown = [t for t in adapt.reference if t not in self.tasks]
                missing = [t for t in self.tasks if t not in adapt.reference]
                if unknown or missing:
                    raise ValueError("mixture.adapt.reference needs a score for every task and no other: "
                                     + "; ".join(x for x in (f"unknown {', '.join(unknown)}" if unknown else "",
                                                             f"missing {', '.join(missing)}" if missing else "") if x))
        if self.mixture.rates:
            for t in self.mixture.rates:
                if t not in self.tasks:
                    raise ValueError(f"mixture.rates: unknown task '{t}'{registry.suggest(t, list(self.tasks))}")
        fixed = sum(t.accumulation or 0 for t in self.tasks.values())
        free = [n for n, t in self.tasks.items() if t.accumulation is None]
        if free and fixed >= self.train.micro_batches_per_step:
            raise ValueError(
                f"tasks with a fixed `accumulation` take {fixed} micro-batches but train.micro_batches_per_step is "
                f"{self.train.micro_batches_per_step}: nothing is left for {', '.join(free)}"
            )
        if not free and fixed != self.train.micro_batches_per_step:
            # Every task is fixed: the step size follows from them. Keep one source of truth.
            if "micro_batches_per_step" in self.train.model_fields_set:
                raise ValueError(
                    f"every task has a fixed `accumulation` (together {fixed}) but train.micro_batches_per_step "
                    f"is {self.train.micro_batches_per_step}; leave it out or make them agree")
            self.train.micro_batches_per_step = fixed
        self._elastic_fits()
        return self

    def _elastic_fits(self) -> None:
        scaling = self.scaling
        if not scaling.elastic:
            return
        if self.train.max_failures == 0:
            raise ValueError(f"scaling.num_workers {list(scaling.num_workers)} goes on after a lost node by restarting "
                             "the workers from the latest version, which train.max_failures: 0 forbids; set it "
                             "(e.g. 3, or -1 for no limit)")
        counts = {"train.micro_batches_per_step": self.train.micro_batches_per_step}
        counts.update({f"tasks.{n}.accumulation": t.accumulation for n, t in self.tasks.items() if t.accumulation})
        for field, count in counts.items():
            uneven = [w for w in scaling.sizes if count * scaling.max_workers % w]
            if uneven:
                total = count * scaling.max_workers
                raise ValueError(
                    f"{field}: {count} per worker at {scaling.max_workers} workers is {total} micro-batches per step, "
                    f"which {', '.join(map(str, uneven))} workers cannot share evenly; an elastic run keeps that "
                    f"total on every size in {list(scaling.num_workers)} (e.g. {field}: "
                    f"{_evenly_shared(count, scaling)})")

    def step_shape(self, world: int) -> tuple[int, dict[str, int]]:
        """(micro-batches per step, fixed accumulation per task) of one worker among `world`: the job's
        own, or, in an elastic run, its counts at the most workers spread over `world` (the same global batch)."""
        fixed = {t: s.accumulation for t, s in self.tasks.items() if s.accumulation}
        if not self.scaling.elastic:
            return self.train.micro_batches_per_step, fixed
        if world not in self.scaling.sizes:
            raise ValueError(f"{world} workers is outside scaling.num_workers {list(self.scaling.num_workers)}")
        scale = self.scaling.max_workers
        return (self.train.micro_batches_per_step * scale // world, {t: n * scale // world for t, n in fixed.items()})

    def explicit_rates(self) -> dict[str, float]:
        """Task -> rate from `mixture.rates`, falling back to `tasks.<t>.rate`."""
        rates = {t: spec.rate for t, spec in self.tasks.items() if spec.rate is not None}
        rates.update(self.mixture.rates or {})
        return rates


def _evenly_shared(count: int, scaling: ScalingSpec) -> int:
    """The smallest per-worker count from `count` up whose total every size shares evenly."""
    return next(c for c in range(count, count * 1000) if all(c * scaling.max_workers % w == 0 for w in scaling.sizes))
