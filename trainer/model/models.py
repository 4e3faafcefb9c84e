"""Building the trained model: a shared backbone with per-task heads, or one LM for all tasks.

Both kinds are wrapped in `MultiTaskModel`, whose forward(task, batch, weight) returns the
task's loss and the weighted loss to back-propagate. The weighting happens inside forward so
that learned weights (uncertainty) are parameters DeepSpeed optimises, partitions and saves.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from trainer.data import IGNORE_INDEX
from trainer.errors import UserError
from trainer.model.ds_config import zero_stage
from trainer.tasks import registry

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SURROGATE = "__gradient__"  # forward's task for the surrogate loss of a gradient (see MultiTaskModel._surrogate)


@dataclass(frozen=True)
class HeadSpec:
    task: str
    type: str
    num_labels: int


def unwrapped(module: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the module itself when there is none)."""
    return getattr(module, "get_base_model", lambda: module)()


def forward_accepts(module: nn.Module, name: str) -> bool:
    """Whether a transformers model's forward takes argument `name`."""
    return name in inspect.signature(unwrapped(module).forward).parameters


class MultiTaskModel(nn.Module):
    def __init__(self, *, backbone: nn.Module | None = None, heads: dict[str, nn.Module] | None = None,
                 lm: nn.Module | None = None, loss_weighting: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads or {})
        self.lm = lm
        self.loss_weighting = loss_weighting
        self._encoder_inputs = [k for k in ENCODER_INPUTS if backbone is not None and forward_accepts(backbone, k)]
        self._keeps_logits = (lm is not None and not unwrapped(lm).config.is_encoder_decoder
                              and forward_accepts(lm, "logits_to_keep"))

    def _encode(self, batch: dict) -> torch.Tensor:
        return self.backbone(**{k: batch[k] for k in self._encoder_inputs if k in batch}).last_hidden_state

    def head_outputs(self, task: str, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.heads[task](self._encode(batch), batch)

    def forward(self, task: str, batch: dict, weight: float = 1.0,
                touch_heads: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(the task's loss, the loss to back-propagate). `touch_heads`: whether every other head
        joins the backward with a zero gradient; a step needs it in its first micro-batch only
        (see `_touch_other_heads`)."""
        if task == SURROGATE:
            return (self._surrogate(batch["gradient"]),) * 2
        if self.lm is not None:
            loss = self._lm_loss(batch)
            weighted = self._weighted(task, loss, weight)
        else:
            hidden = self._encode(batch)
            loss, _ = self.heads[task](hidden, batch)
            weighted = self._weighted(task, loss, weight)
            if touch_heads:
                weighted = weighted + self._touch_other_heads(task, hidden, batch)
        return loss, weighted

    def _surrogate(self, gradient: list[torch.Tensor]) -> torch.Tensor:
        """Σ_p ⟨p, G_p⟩ over the trainable parameters: a loss whose gradient is `gradient`, one
        computed outside DeepSpeed (trainer.control.gradient_surgery), for DeepSpeed to apply."""
        params = [p for p in self.parameters() if p.requires_grad]
        return sum((p * g.to(p.dtype)).sum() for p, g in zip(params, gradient, strict=True))

    def _lm_loss(self, batch: dict) -> torch.Tensor:
        """The LM's mean loss over the target tokens.

        A decoder computes the vocabulary logits only from the first target position on: a
        prompt's logits are never scored, and projecting them onto a large vocabulary (and back,
        in the backward pass) is a large share of a small model's work when targets are short
        (measured on the demo's 135M model: see docs/demo.md). Seq2seq models and
        decoders without `logits_to_keep` compute the loss in full.
        """
        labels = batch["labels"]
        if not self._keeps_logits:
            return self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        targets = labels[:, 1:]  # position t predicts token t + 1
        first = batch.get("first_target")  # found on the host (trainer.loop): reading it here would wait for the device
        if first is None:
            first = first_target(labels)
        logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         logits_to_keep=labels.shape[1] - first).logits  # positions first .. end
        return nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets[:, first:].flatten(),
                                           ignore_index=IGNORE_INDEX)

    def _weighted(self, task: str, loss: torch.Tensor, weight: float) -> torch.Tensor:
        return self.loss_weighting(task, loss) if self.loss_weighting is not None else loss * weight

    def _touch_other_heads(self, task: str, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """A zero that depends on every other head, so their gradients are zeros, never stale.

        Under ZeRO-3 a parameter that takes no part in a backward keeps the gradient of the
        last micro-batch that used it, and each optimizer step applies that gradient again
        (measured: an unused head kept moving, and resumed runs diverged from uninterrupted
        ones). Heads see one token of one row here. Once per step is enough: every ZeRO stage
        overwrites a gradient with its first micro-batch's (ZeRO-3 copies at micro-step 0, the
        others start from None) and adds later ones, so a head absent from a later micro-batch
        adds nothing. Every micro-batch, it was 2-3% of a step at 256 tasks (py-spy of
        benchmarks/many_tasks.py), and grows with the tasks.
        """
        probe = hidden[:1, :1].detach()
        mask = batch["attention_mask"][:1, :1]
        zero = hidden.new_zeros(())
        for name, head in self.heads.items():
            if name != task:
                zero = zero + 0.0 * head(probe, {"attention_mask": mask})[1].sum()
        return zero


def _auto_class(kind: str, encoding: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if kind == "heads":
        return AutoModel
    return AutoModelForSeq2SeqLM if encoding == "seq2seq" else AutoModelForCausalLM


def first_target(labels: torch.Tensor) -> int:
    """The first column of `labels[:, 1:]` that holds a target token (a decoder's first scored position)."""
    return int((labels[:, 1:] != IGNORE_INDEX).any(0).int().argmax())


def loss_items(batch: dict, encoding: str) -> int:
    """How many items the task's loss of a host micro-batch averages: its scored target tokens for an
    LM (a decoder scores position t against token t + 1, so never the first column), its rows for a head."""
    labels = batch.get("labels")
    if encoding == "heads" or labels is None or labels.dim() != 2:
        return int(batch["attention_mask"].shape[0])
    scored = labels if encoding == "seq2seq" else labels[:, 1:]
    return int((scored != IGNORE_INDEX).sum())


def model_class(kind: str, encoding: str, config):
    """The transformers class build_model makes for `config` (None when the auto class has no mapping for it)."""
    try:
        return _auto_class(kind, encoding)._model_mapping[type(config)]
    except KeyError:
        return None


def build_model(*, kind: str, encoding: str, name_or_path: str, heads: list[HeadSpec],
                loss_weighting: nn.Module | None = None, lora: dict | None = None,
                ds_config: dict | None = None, init: str = "pretrained", attn_implementation: str | None = None,
                gradient_checkpointing: bool = False) -> MultiTaskModel:
    """The model to train: pretrained weights from `name_or_path` (or, `init: random`, a fresh
    initialisation of its config from the caller's seed), new heads.

    Weights load in fp32 whatever dtype the checkpoint was stored in (transformers 5 defaults
    to dtype="auto", so a bf16 hub checkpoint would come back bf16): `train.precision: fp32`
    must train in fp32, and for bf16/fp16 DeepSpeed casts the model itself while its
    optimizer keeps fp32 master weights. New heads are built in the same fp32.

    With `ds_config` at ZeRO-3 (every rank calls this together), the pretrained model is
    built already partitioned (see zero3_construction), in the training dtype, and the parts
    built whole are cast to it here.
    """
    rng = torch.random.get_rng_state()
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with zero3_construction(ds_config):
        if init == "random":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name_or_path, **options)
            base = _auto_class(kind, encoding).from_config(config, dtype=torch.float32, **options)
        else:
            base = _auto_class(kind, encoding).from_pretrained(name_or_path, dtype=torch.float32, **options)
    if gradient_checkpointing:
        # Not reentrant: it needs no input that requires grad (frozen embeddings under LoRA).
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # New heads start from the caller's seed whatever the base's build drew from the generator
    # (weights a checkpoint lacks are drawn at random), so `mtl eval --compare untrained`
    # rebuilds them equal whether the run was partitioned or not.
    torch.random.set_rng_state(rng)
    model = _assemble(kind, base, heads, loss_weighting, lora)
    dtype = zero3_dtype(ds_config)
    if dtype is not None:
        # zero.Init made the pretrained partitions in the training dtype, and DeepSpeed casts a
        # model only when none of it is partitioned yet: the parts built whole follow here.
        for p in model.parameters():
            if not is_partitioned(p):
                p.data = p.data.to(dtype)
    return model


def zero3_dtype(ds_config: dict | None) -> torch.dtype | None:
    """The half dtype a ZeRO-3 config trains in (None: fp32, or not ZeRO-3)."""
    if zero_stage(ds_config) != 3:
        return None
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds_config.get(key, {}).get("enabled"):
            return dtype
    return None


@contextmanager
def zero3_construction(ds_config: dict | None):
    """Under ZeRO-3, let transformers build the pretrained model inside `deepspeed.zero.Init`.

    Each parameter is partitioned across the ranks as it is created and rank 0 alone reads
    the checkpoint (into CPU memory), handing each rank its part, so no rank holds the whole
    model's parameters. It goes through transformers (HfDeepSpeedConfig), which initialises
    and loads the partitioned weights; a model built inside zero.Init by hand keeps weights
    that were never initialised. New heads and LoRA adapters are small: they are built whole
    and DeepSpeed partitions them when the engine is made.
    """
    if zero_stage(ds_config) != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    deepspeed.init_distributed()  # zero.Init reads the world size from DeepSpeed's comm layer (it wraps the
    # process group Ray Train made); without it, it checks the batch sizes against a world of one
    alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()  # later models in this process (evaluation) are built whole
        del alive


def hidden_size(config) -> int | None:
    """A transformers config's model width (an encoder-decoder pair: its decoder's), or None."""
    size = getattr(config, "hidden_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(decoder=True), "hidden_size", None)
    return int(size) if size else None


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether a parameter is a ZeRO-3 partition (its full shape is then `ds_shape`)."""
    return hasattr(p, "ds_shape")


def build_model_from_config(*, kind: str, encoding: str, config, heads: list[HeadSpec],
                            loss_weighting: nn.Module | None = None, lora: dict | None = None) -> MultiTaskModel:
    """The same skeleton from a saved config, for loading a version's weights into."""
    return _assemble(kind, _auto_class(kind, encoding).from_config(config), heads, loss_weighting, lora)


def _assemble(kind: str, base: nn.Module, heads: list[HeadSpec], loss_weighting, lora) -> MultiTaskModel:
    if kind != "heads":
        return MultiTaskModel(lm=_with_lora(base, lora) if lora else base, loss_weighting=loss_weighting)
    modules = {}
    for h in heads:
        make = registry.get(h.type).make_head
        if make is None:
            raise UserError(f"tasks.{h.task}: {h.type} tasks have no head for model.kind heads")
        modules[h.task] = make(base.config.hidden_size, h.num_labels)
    backbone = _with_lora(base, lora) if lora else base
    return MultiTaskModel(backbone=backbone, heads=modules, loss_weighting=loss_weighting)


def model_config(model: MultiTaskModel):
    """The transformers config of the backbone or LM (saved with every version)."""
    return unwrapped(model.lm if model.lm is not None else model.backbone).config


def _with_lora(model: nn.Module, lora: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora.get("target_modules"), layers_to_transform=lora.get("layers_to_transform"))
    return get_peft_model(model, config)


def param_groups(model: MultiTaskModel, *, weight_decay: float, weighting_lr: float, lr: float | None = None,
                 head_lr_scales: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: decayed matrices, undecayed biases/norms, and the loss weights at their own lr.

    With `head_lr_scales` (task -> multiplier of `lr`; see `heads_apart`) each task's head has
    groups of its own, marked `role: head` (the others `role: backbone`), so that its rate and the
    backbone's can differ: the layout of the optimizer's state differs too, so it is only chosen
    when a job asks for it."""
    apart = head_lr_scales is not None
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("loss_weighting."):
            key = ("weights",)
        else:
            decayed = len(p.ds_shape if is_partitioned(p) else p.shape) >= 2  # a ZeRO-3 partition is flat
            task = name.split(".")[1] if apart and name.startswith("heads.") else None
            key = ("head", task, decayed) if task is not None else ("backbone", decayed)
        groups.setdefault(key, []).append(p)
    out = []
    for decayed in (True, False):
        if groups.get(("backbone", decayed)):
            out.append({"params": groups[("backbone", decayed)], "weight_decay": weight_decay if decayed else 0.0,
                        **({"role": "backbone"} if apart else {})})
    for task in head_lr_scales or {}:
        for decayed in (True, False):
            if groups.get(("head", task, decayed)):
                out.append({"params": groups[("head", task, decayed)], "weight_decay": weight_decay if decayed else 0.0,
                            "lr": lr * head_lr_scales[task], "role": "head"})
    if groups.get(("weights",)):
        out.append({"params": groups[("weights",)], "weight_decay": 0.0, "lr": weighting_lr})
    return out


def heads_apart(lr_scales: dict[str, float], head_warmup_steps: int) -> bool:
    """Whether a job's heads get optimizer groups of their own (see param_groups)."""
    return head_warmup_steps > 0 or any(scale != 1.0 for scale in lr_scales.values())


def job_heads_apart(job: dict) -> bool:
    """heads_apart of a job as a version's job.yaml holds it (one written before these fields
    existed had neither)."""
    scales = {t: float(task.get("lr_scale", 1.0)) for t, task in (job.get("tasks") or {}).items()}
    return heads_apart(scales, int((job.get("train") or {}).get("head_warmup_steps", 0)))


def group_lr_factors(groups: list[dict], schedule: str, warmup_steps: int, total_steps: int,
                     head_warmup_steps: int = 0) -> list:
    """LambdaLR's factor of each group: the job's schedule; during a head warm-up the backbone's is 0,
    then it follows the same schedule over the steps left."""
    shared = lr_factor(schedule, warmup_steps, total_steps)
    if not head_warmup_steps:
        return [shared] * len(groups)
    later = lr_factor(schedule, warmup_steps, total_steps - head_warmup_steps)

    def backbone(step: int) -> float:
        return 0.0 if step < head_warmup_steps else later(step - head_warmup_steps)

    return [backbone if g.get("role") == "backbone" else shared for g in groups]


def lr_factor(schedule: str, warmup_steps: int, total_steps: int):
    """LambdaLR factor: linear warm-up to 1, then linear/cosine decay to 0 at total_steps, or constant."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress
    return factor
