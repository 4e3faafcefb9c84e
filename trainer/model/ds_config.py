"""The one place DeepSpeed's numbers are derived from the job.

The JSON files in ds_configs/ hold only what a person chooses (ZeRO stage, offload,
communication knobs). Batch sizes, gradient accumulation, clipping and precision are filled
in here from the job and the world size, so they cannot disagree with the loop; a value the
file sets itself must either be "auto" or equal the derived one. The optimizer (AdamW) and
the LR schedule are built by the loop as torch objects (trainer.model.models) and handed to
DeepSpeed, so the files must not name them.
"""

from __future__ import annotations

import copy
import json

from trainer.errors import SpecError, did_you_mean

# ZeRO sizes that scale with the model; a file may leave them "auto" (fill_model_sizes).
MODEL_SIZED_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                    "stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size")

DERIVED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping")

# Knobs that pay on GPUs and cost on CPUs; "auto" takes `scaling.use_gpu`. overlap_comm runs the
# gradient reductions on a CUDA stream of their own while the backward pass goes on; a pinned
# (page-locked) host buffer lets an offloaded optimizer's copies run without staging. On CPU
# workers there is no second stream to overlap with and nothing to pin for.
DEVICE_KEYS = ("zero_optimization.overlap_comm", "zero_optimization.offload_optimizer.pin_memory",
               "zero_optimization.offload_param.pin_memory")


def read_ds_config(path: str, field: str = "deepspeed") -> dict:
    try:
        with open(path) as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise SpecError(field, f"DeepSpeed config not found: '{path}'") from None
    except json.JSONDecodeError as exc:
        raise SpecError(field, f"'{path}' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise SpecError(field, f"'{path}' must hold a JSON object")
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        raise SpecError(field, f"'{path}': zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    check_file_keys(config, path, field)
    return config


# The top-level keys DeepSpeed 0.19 reads (deepspeed/runtime/config.py and the sections it hands to
# its sub-configs); anything else in a file is a typo DeepSpeed would ignore without a word.
DEEPSPEED_KEYS = frozenset((
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "nebula", "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop",
    "quantize_training", "scheduler", "seq_parallel_communication_data_type", "sparse_attention",
    "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers", "torch_autocast",
    "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
    "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization",
))
# Precision is the job's (train.precision: one value for the loop, the model and DeepSpeed).
PRECISION_KEYS = ("fp16", "bf16", "bfloat16", "amp", "torch_autocast")


def check_file_keys(config: dict, path: str, field: str = "deepspeed") -> None:
    """Every key of a DeepSpeed file is one DeepSpeed knows, checked by DeepSpeed's own config
    models where it has them (zero_optimization); precision belongs to the job. Raises SpecError
    naming the dotted key, with the closest valid one."""
    for key in config:
        if key in PRECISION_KEYS:
            raise SpecError(field, f"'{path}' sets {key}; precision comes from train.precision (auto, fp32, bf16 "
                                   f"or fp16) so the loop, the model and DeepSpeed agree: remove it from the file")
        if key not in DEEPSPEED_KEYS:
            raise SpecError(field, f"'{path}': {key} is not a DeepSpeed setting{did_you_mean(key, DEEPSPEED_KEYS)}")
    zero = config.get("zero_optimization")
    if zero is None:
        return
    if not isinstance(zero, dict):
        raise SpecError(field, f"'{path}': zero_optimization must be an object")
    for dotted, problem in _zero_problems(zero):
        raise SpecError(field, f"'{path}': zero_optimization.{dotted}: {problem}")


def _zero_problems(zero: dict):
    """(dotted key, problem) for what DeepSpeed's ZeRO config model refuses in `zero`."""
    import pydantic
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    sized = {k: 1 for k in MODEL_SIZED_KEYS if zero.get(k) == "auto"}  # filled on the workers
    # Device knobs are filled for the workers' device (build_ds_config); any value is checked the same.
    checked = fill_device_keys({"zero_optimization": copy.deepcopy({**zero, **sized})}, False)["zero_optimization"]
    try:
        DeepSpeedZeroConfig(**checked)
    except pydantic.ValidationError as exc:
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            if err["type"] == "extra_forbidden":
                yield ".".join(loc), f"not a ZeRO setting{did_you_mean(loc[-1], _model_keys(DeepSpeedZeroConfig, loc[:-1]))}"
            else:
                yield ".".join(loc), err["msg"].removeprefix("Value error, ")


def _model_keys(model, loc: list[str]) -> list[str]:
    """Field names and aliases of the config model at `loc` inside `model`."""
    import typing

    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                      if isinstance(a, type) and hasattr(a, "model_fields")), None)
        if model is None:
            return []
    return [k for name, f in model.model_fields.items() for k in (name, f.alias) if k]


def zero_stage(config: dict | None) -> int:
    """A DeepSpeed config's ZeRO stage (0 when it names none)."""
    return (config or {}).get("zero_optimization", {}).get("stage", 0)


def build_ds_config(base: dict, *, micro_batch_size: int, micro_batches_per_step: int, world_size: int,
                    max_grad_norm: float | None, precision: str, use_gpu: bool = False,
                    field: str = "deepspeed") -> dict:
    """`base` with every derived number filled in, and the DEVICE_KEYS left "auto" set for the
    workers' device; raises if the file contradicts the job."""
    derived = {
        # DeepSpeed only uses this for bookkeeping: a task may set its own rows per micro-batch.
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": micro_batches_per_step,
        "train_batch_size": micro_batch_size * micro_batches_per_step * world_size,
        "gradient_clipping": max_grad_norm if max_grad_norm is not None else 0.0,
    }
    config = copy.deepcopy(base)
    for key, value in derived.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise SpecError(field, f"{key} is {given!r} in the DeepSpeed config but the job gives {value!r}; "
                                   f"remove it or set it to \"auto\" (it is derived from train.* and scaling.*)")
        config[key] = value
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise SpecError(field, f"'{key}' is set in the DeepSpeed config; the loop builds them from train.* "
                                   f"(lr, weight_decay, warmup_steps, lr_schedule, steps) — remove it")
    for mode in ("fp16", "bf16"):
        config.pop(mode, None)
    if precision in ("fp16", "bf16"):
        config[precision] = {"enabled": True}
    fill_device_keys(config, use_gpu)
    filled_later = {f"zero_optimization.{key}" for key in MODEL_SIZED_KEYS}  # fill_model_sizes, on the workers
    unfilled = [path for path in _auto_paths(config) if path not in filled_later]
    if unfilled:  # DeepSpeed would only refuse it on the workers, after Ray started
        raise SpecError(field, f"{unfilled[0]} is \"auto\" in the DeepSpeed config, and only these are filled in: "
                               f"{', '.join(DERIVED_KEYS + MODEL_SIZED_KEYS + DEVICE_KEYS)}; give it a value or "
                               f"remove it")
    config.setdefault("steps_per_print", 10 ** 9)  # the loop does its own logging
    if zero_stage(config) == 3:  # a version then holds whole weights (weights/), read without optimizer shards
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def fill_device_keys(config: dict, use_gpu: bool) -> dict:
    """`config` (changed in place) with each of DEVICE_KEYS it leaves "auto" set to `use_gpu`."""
    for path in DEVICE_KEYS:
        *parents, key = path.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key) == "auto":
            node[key] = use_gpu
    return config


def _auto_paths(node, prefix: str = ""):
    """Dotted paths of the values that are "auto" in a nested config."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_paths(value, f"{prefix}{key}.")
    elif node == "auto":
        yield prefix[:-1]


DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's default, which versions written before "auto" used


def fill_model_sizes(config: dict, hidden_size: int | None, keep: dict | None = None) -> dict:
    """ZeRO's model-sized knobs that the file leaves "auto", from the model's hidden size h.

    DeepSpeed's own defaults (5e8-1e9 elements) suit models of billions of parameters; on
    smaller ones they undo ZeRO-3's saving. Measured with a BERT-base-shaped model, 2 ranks
    (BENCHMARKS.md): a reduce bucket allocated up front at 5e8 elements (2 GB in fp32), every
    gathered parameter kept live from the forward to the backward (up to 1e9 of them), and
    the optimizer's flat copy and temporaries over the whole partition at once.

    - reduce_bucket_size h², stage3_prefetch_bucket_size 0.9 h², parameters under 10 h kept
      whole on every rank (stage3_param_persistence_threshold): transformers' Trainer's rule;
    - stage3_max_live_parameters and stage3_max_reuse_distance 24 h² (about two transformer
      layers): a layer's parameters are released after it runs and gathered again for its
      backward, as ZeRO-3 is described;
    - sub_group_size 12 h² (about one layer): the optimizer steps that many elements at a time.

    Without a hidden size, DeepSpeed's defaults. `keep`: values that "auto" must take instead
    (the sub-groups of the version a run resumes: its optimizer state is cut by them).
    """
    zero = config.get("zero_optimization", {})
    h2 = hidden_size * hidden_size if hidden_size else 0
    sizes = {} if not hidden_size else {
        "reduce_bucket_size": h2, "stage3_prefetch_bucket_size": int(0.9 * h2),
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_max_live_parameters": 24 * h2, "stage3_max_reuse_distance": 24 * h2, "sub_group_size": 12 * h2,
    }
    sizes.update(keep or {})
    for key in MODEL_SIZED_KEYS:
        if zero.get(key) == "auto":
            if key in sizes:
                zero[key] = sizes[key]
            else:
                del zero[key]
    return config


def job_ds_config(spec, world_size: int | None = None, base: dict | None = None) -> dict:
    """The DeepSpeed config of a job (the one place that reads the job for it).

    `base` is the file's content when the driver read it already: workers on other nodes
    get the config itself, never a path that only exists where the job was submitted.
    """
    base = base if base is not None else read_ds_config(spec.deepspeed)
    world_size = world_size or spec.scaling.max_workers
    return build_ds_config(base, micro_batch_size=spec.train.micro_batch_size,
                           micro_batches_per_step=spec.step_shape(world_size)[0], world_size=world_size,
                           max_grad_norm=spec.train.max_grad_norm, precision=spec.train.precision,
                           use_gpu=spec.scaling.use_gpu)


def offloads_optimizer(config: dict) -> bool:
    """Whether a DeepSpeed config keeps the optimizer's state and step on the host."""
    return (config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
