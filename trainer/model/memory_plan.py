"""What each rank will hold, before anything starts: the model states under the job's ZeRO stage
and offload, the activations of its largest micro-batch, and the process itself.

The parameter count comes from the model's config, built on PyTorch's meta device (no weights
are read or allocated). The model states follow DeepSpeed's own accounting
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`: parameters
and gradients in the training dtype, AdamW's two fp32 moments, an fp32 master copy where the
training dtype is 16-bit), split by what each stage partitions; tests/test_memory_plan.py
checks the two agree where DeepSpeed's estimator applies (16-bit, every parameter trained). Two
differences from the estimator are what `mtl` does on top of DeepSpeed: fp32 ZeRO-3 keeps no
master copy (trainer.model.zero3_master), and fp32 ZeRO-1/2 does (DeepSpeed clones it).

Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
Transformer Models": about (34·h + 5·a·s) bytes per token and layer at 16 bits without
recomputation, 2·h per token and layer with it (plus one layer's worth recomputed). The 5·a·s
term is the attention scores, which only eager attention keeps (sdpa and flash attention, the
default, never materialise them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2 ** 30
PROCESS_BYTES = int(0.7 * GIB)  # a worker's Python, torch, DeepSpeed and Ray before any model (measured: 0.53-0.66 GiB)


@dataclass(frozen=True)
class ModelSize:
    params: int
    trainable: int
    largest_layer: int  # the most parameters one module holds itself (what ZeRO-3 gathers at once)
    hidden: int
    layers: int
    heads: int
    vocab: int


def model_size(config, kind: str, encoding: str, lora: dict | None = None, head_labels: list[int] = ()) -> ModelSize:
    """The parameters of the model a job trains, counted on the meta device."""
    import torch

    from trainer.model.models import model_class

    cls = model_class(kind, encoding, config)
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    params = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or getattr(config, "d_model", 0))
    trainable = params
    if lora:
        trainable = lora_parameters(model, lora)
    # A head is one linear layer on the hidden states (trainer/tasks/heads.py): n labels, or a span's
    # start and end (a task without labels).
    heads = sum((hidden + 1) * (n or 2) for n in head_labels)
    return ModelSize(params=params + heads, trainable=trainable + heads, largest_layer=largest, hidden=hidden,
                     layers=int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)
                                or getattr(config, "num_layers", 0)),
                     heads=int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1),
                     vocab=int(getattr(config, "vocab_size", 0)))


def lora_parameters(model, lora: dict) -> int:
    """What LoRA trains: r·(in + out) for each targeted linear layer (of the chosen layers)."""
    import re

    targets = set(lora.get("target_modules") or ())
    layers = set(lora.get("layers_to_transform") or ())
    r = int(lora.get("r", 8))
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets or not hasattr(module, "in_features"):
            continue
        index = re.search(r"\.(\d+)\.", name)
        if layers and (index is None or int(index.group(1)) not in layers):
            continue
        total += r * (module.in_features + module.out_features)
    return total


@dataclass
class MemoryPlan:
    """Bytes per rank, by what holds them; `device` on a GPU, everything on the host on CPU."""
    size: ModelSize
    stage: int
    world: int
    dtype_bytes: int
    offload_optimizer: bool
    offload_params: bool
    on_gpu: bool
    activations: int
    host: dict[str, int] = field(default_factory=dict)
    device: dict[str, int] = field(default_factory=dict)

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())


def plan_memory(size: ModelSize, *, stage: int, world: int, precision: str, offload_optimizer: bool = False,
                offload_params: bool = False, on_gpu: bool = False, tokens: int = 0, sequence: int = 0,
                checkpointing: bool = False, eager_attention: bool = False, logit_tokens: int | None = None,
                trained_depth: float = 1.0, live_parameters: int | None = None, surgery_tasks: int = 0) -> MemoryPlan:
    """Bytes per rank. tokens: the largest micro-batch's input tokens, of sequences up to
    `sequence`; logit_tokens: the positions the vocabulary is projected for (default: all);
    trained_depth: the share of the layers gradients flow through (LoRA on the top layers only:
    the frozen ones below keep no activations); surgery_tasks: the most tasks a step holds a
    gradient of apart (loss_weighting.surgery)."""
    b = 2 if precision in ("bf16", "fp16") else 4
    p, t, w = size.params, size.trainable, max(1, world)
    activations = activation_bytes(size, tokens, sequence if eager_attention else 0, b, checkpointing,
                                   tokens if logit_tokens is None else logit_tokens, trained_depth)
    plan = MemoryPlan(size, stage, w, b, offload_optimizer, offload_params, on_gpu, activations)
    states = plan.device if on_gpu else plan.host
    optimizer_side = plan.host if offload_optimizer else states
    params_side = plan.host if offload_params else states
    share = w if stage >= 1 else 1
    params_side["parameters"] = p * b // (w if stage == 3 else 1)
    states["gradients"] = t * b // (w if stage >= 2 else 1)
    master = 4 if b == 2 or stage in (1, 2) else 0  # fp32 ZeRO-3 shares its master (trainer.model.zero3_master)
    if b == 2 and stage >= 1:  # the fp32 gradient partition the optimizer steps with (where it steps)
        optimizer_side["gradients (fp32 partition)"] = t * 4 // share
    optimizer_side["optimizer (fp32 master, AdamW moments)"] = t * (master + 8) // share
    if stage == 3:
        # What ZeRO-3 holds whole at once: up to stage3_max_live_parameters gathered (24 h² when
        # "auto", trainer.model.ds_config), and the largest module's parameters with their gradient.
        live = live_parameters if live_parameters is not None else 24 * size.hidden ** 2
        states["gathered layers"] = (live + 2 * size.largest_layer) * b
    # The optimizer step's fp32 temporaries, each the size of what it steps at once (ZeRO-3: a
    # sub-group of 12 h²; ZeRO-1/2: the rank's flat partition; no ZeRO: every parameter): AdamW's
    # square root and quotient, and under ZeRO-3 the sub-group's gradients flattened (measured
    # with torch.profiler on the 0.7B run of docs/scaling.md).
    stepped = min(12 * size.hidden ** 2 or t, t // w) if stage == 3 else t // share
    optimizer_side["optimizer step"] = (3 if stage == 3 else 2) * 4 * stepped
    states["activations"] = activations
    if surgery_tasks:  # each task's fp32 gradient, and their stack while it is reduced (gradient_surgery)
        states["gradient surgery"] = 2 * surgery_tasks * t * 4
    plan.host["process"] = PROCESS_BYTES
    return plan


def activation_bytes(size: ModelSize, tokens: int, sequence: int, b: int, checkpointing: bool,
                     logit_tokens: int, trained_depth: float = 1.0) -> int:
    if not tokens or not size.hidden:
        return 0
    h, a, s = size.hidden, size.heads, sequence  # sequence 0: no attention scores kept
    per_layer = (34 * h + 5 * a * s) * b // 2  # the paper counts 16-bit activations
    layers = max(1, round(size.layers * trained_depth))
    stored = 2 * h * b * layers + per_layer if checkpointing else per_layer * layers
    logits = 3 * size.vocab * 4  # the logits, their softmax and its gradient in fp32, per position
    return tokens * stored + logit_tokens * logits


# -- a job's plan -----------------------------------------------------------------------------------

RAY_KILL_FRACTION = 0.95  # Ray's memory monitor kills workers above 95% of a node's memory


def job_model_size(spec, config, encoding: str, head_labels: list[int]) -> ModelSize:
    """The parameters of the model `spec` (a JobSpec) trains on `config`: LoRA, and heads where it has them."""
    lora = spec.model.lora.model_dump() if spec.model.lora else None
    return model_size(config, spec.model.kind, encoding, lora, head_labels if spec.model.kind == "heads" else [])


def job_plan(spec, size: ModelSize, *, precision: str | None = None, ds_config: dict | None = None) -> MemoryPlan:
    """The plan of `spec` (a JobSpec) for a model of `size` (job_model_size), under its DeepSpeed config."""
    from trainer.model.ds_config import job_ds_config, zero_stage

    ds_config = ds_config if ds_config is not None else job_ds_config(spec)
    zero = ds_config.get("zero_optimization", {})
    offloaded = lambda key: (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    lora = spec.model.lora.model_dump() if spec.model.lora else None
    live = zero.get("stage3_max_live_parameters")
    common = dict(stage=zero_stage(ds_config), world=spec.scaling.max_workers,
                  live_parameters=live if isinstance(live, (int, float)) else None,
                  precision=precision or spec.train.precision, offload_optimizer=offloaded("offload_optimizer"),
                  offload_params=offloaded("offload_param"), on_gpu=spec.scaling.use_gpu,
                  checkpointing=spec.model.gradient_checkpointing, eager_attention=spec.model.attn_implementation == "eager",
                  trained_depth=trained_depth(lora, size.layers),
                  surgery_tasks=min(len(spec.tasks), spec.train.micro_batches_per_step)
                  if spec.loss_weighting.surgery != "none" else 0)
    plans = [plan_memory(size, **common, **task_tokens(spec, name)) for name in spec.tasks]
    return max(plans, key=lambda plan: plan.activations)  # the task whose micro-batch holds the most


# Target tokens a task type trains on when its options do not say (text2text: label words; answers).
TARGET_TOKENS = {"classification": 8, "extractive_qa": 64}


def task_tokens(spec, name: str) -> dict:
    """A task's largest micro-batch: input tokens, the sequence, and the positions scored against the
    vocabulary (text2text: a decoder projects only from the first target on; heads: none)."""
    task = spec.tasks[name]
    length = task.max_length or spec.model.max_length
    tokens = task.max_tokens or (task.micro_batch_size or spec.train.micro_batch_size) * length
    if spec.model.kind == "heads":
        logits = 0
    else:
        target = (task.options or {}).get("max_target_length") or TARGET_TOKENS.get(task.type, 32)
        logits = tokens // length * min(target, length)
    return {"tokens": tokens, "sequence": length, "logit_tokens": logits}


def trained_depth(lora: dict | None, layers: int) -> float:
    """The share of layers gradients flow through: LoRA on chosen layers stops at the lowest."""
    chosen = (lora or {}).get("layers_to_transform")
    if not chosen or not layers:
        return 1.0
    return (layers - min(chosen)) / layers


def describe(plan: MemoryPlan) -> list[str]:
    """The plan as console lines: the total per rank and what makes it up."""
    s = plan.size
    trained = "all trained" if s.trainable == s.params else f"{s.trainable / 1e6:.1f}M trained"
    head = (f"memory plan per rank (ZeRO-{plan.stage}{' + offload' if plan.offload_optimizer else ''}, "
            f"{'fp32' if plan.dtype_bytes == 4 else '16-bit'}, {plan.world} worker{'s' if plan.world > 1 else ''}; "
            f"{s.params / 1e9:.2f}B parameters, {trained}):")
    lines = [head]
    for where, parts in (("GPU", plan.device), ("host", plan.host)):
        if parts:
            items = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if v)
            lines.append(f"  {where}: {sum(parts.values()) / GIB:.2f} GiB ({items})")
    return lines
