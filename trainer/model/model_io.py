"""Loading what a model folder (or hub id) provides: tokenizer, config, and the input layout."""

from __future__ import annotations

import os

from trainer.data import model_encoding
from trainer.errors import UserError, first_line


def load_tokenizer_and_encoding(name_or_path: str, kind: str):
    """(tokenizer, encoding) where encoding is heads | causal | seq2seq, read from the model config."""
    _, tokenizer, encoding = load_model_files(name_or_path, kind)
    return tokenizer, encoding


def load_config(name_or_path: str, kind: str):
    """(config, encoding) of a model folder or hub id, without its tokenizer, or a UserError naming it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load '{name_or_path}': {first_line(exc)}") from None
    return config, model_encoding(kind, bool(getattr(config, "is_encoder_decoder", False)))


def load_model_files(name_or_path: str, kind: str):
    """(config, tokenizer, encoding) of a model folder or hub id, or a UserError naming it."""
    from transformers import AutoTokenizer

    config, encoding = load_config(name_or_path, kind)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load '{name_or_path}': {first_line(exc)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"model.name_or_path: '{name_or_path}' has no fast tokenizer (tokenizer.json); "
                        "extractive QA offsets need one")
    # Encoders tokenize without truncation first to count what is cut; the tokenizer's own
    # "longer than the maximum" warning would then fire for inputs that we truncate ourselves.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    if encoding == "causal" and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only tokenizers often ship without a pad token
    return config, tokenizer, encoding


# What from_pretrained reads a model's weights from (one file, or the index of a sharded one).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model(name_or_path: str, kind: str, max_lengths: dict[str, int],
                lora_layers: list[int] | None = None, generated: dict[str, tuple[int, int]] | None = None,
                *, init: str = "pretrained", attn_implementation: str | None = None,
                gradient_checkpointing: bool = False) -> list[str]:
    """What the workers would only find out after Ray started: the config or tokenizer does not
    load, a local folder has no weights, a `max_length` (keyed by the job field that sets it)
    is beyond the model's positions, a decoder-only model would generate past them (`generated`:
    task field -> prompt length, new tokens), LoRA names layers the model lacks, or heads are put
    on a model without a bidirectional encoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        config, tokenizer, encoding = load_model_files(name_or_path, kind)
    except UserError as exc:
        return [str(exc)]
    problems = model_class_problems(config, kind, encoding, attn_implementation, gradient_checkpointing)
    if init == "pretrained" and os.path.isdir(name_or_path) and \
            not any(os.path.exists(os.path.join(name_or_path, f)) for f in WEIGHT_FILES):
        problems.append(f"model.name_or_path: '{name_or_path}' has no weights (none of {', '.join(WEIGHT_FILES)})")
    limit = position_limit(config, tokenizer)
    for field, length in max_lengths.items():
        if limit is not None and length > limit:
            problems.append(f"{field}: {length} is more than the model's {limit} positions")
    causal = kind == "text2text" and not config.is_encoder_decoder  # the answer follows the prompt's positions
    for field, (length, new_tokens) in (generated or {}).items():
        if causal and limit is not None and length <= limit < length + new_tokens:
            problems.append(f"{field}: a prompt of up to {length} tokens (max_length) and {new_tokens} generated "
                            f"(options.max_new_tokens) pass the model's {limit} positions: evaluation would fail; "
                            f"lower one so they fit")
    depth = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    beyond = [i for i in lora_layers or () if depth and not 0 <= i < depth]
    if beyond:
        problems.append(f"model.lora.layers_to_transform: {beyond} are not layers of the model (0 to {depth - 1})")
    if kind == "heads" and (config.is_encoder_decoder or config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        problems.append(f"model.kind: heads needs an encoder that reads the whole text ({config.model_type} is not "
                        "one: its first token, which a head reads, sees nothing after it); use kind: text2text")
    return problems


def model_class_problems(config, kind: str, encoding: str, attn_implementation: str | None,
                         gradient_checkpointing: bool) -> list[str]:
    """What the model's class cannot do of model.attn_implementation / model.gradient_checkpointing."""
    import importlib.util

    from trainer.model.models import model_class

    if not attn_implementation and not gradient_checkpointing:
        return []
    cls = model_class(kind, encoding, config)
    if cls is None:
        return []  # a class transformers does not map: it says so itself when it loads
    problems = []
    if gradient_checkpointing and not getattr(cls, "supports_gradient_checkpointing", False):
        problems.append(f"model.gradient_checkpointing: {cls.__name__} does not support it")
    if attn_implementation == "sdpa" and not getattr(cls, "_supports_sdpa", False):
        problems.append(f"model.attn_implementation: {cls.__name__} has no sdpa attention; use eager")
    if attn_implementation == "flash_attention_2":
        if not getattr(cls, "_supports_flash_attn", False):
            problems.append(f"model.attn_implementation: {cls.__name__} has no flash_attention_2; use sdpa or eager")
        elif importlib.util.find_spec("flash_attn") is None:
            problems.append("model.attn_implementation: flash_attention_2 needs the flash-attn package, which is "
                            "not installed here (pip install flash-attn); or use sdpa")
    return problems


def position_limit(config, tokenizer) -> int | None:
    """The longest input the model takes, when it has a limit (absolute position embeddings)."""
    limits = [getattr(config, a) for a in ("max_position_embeddings", "n_positions") if getattr(config, a, None)]
    if limits and 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        limits.append(tokenizer.model_max_length)  # RoBERTa: 514 embeddings, 512 usable
    return min(limits) if limits else None
