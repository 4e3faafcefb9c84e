"""Loading what a model folder (or hub id) provides: tokenizer, config, and the input layout."""

from __future__ import annotations

from trainer.errors import UserError, first_line
from trainer.task_data import model_encoding


def load_tokenizer_and_encoding(name_or_path: str, kind: str):
    """(tokenizer, encoding) where encoding is heads | causal | seq2seq, read from the model config."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path: cannot load '{name_or_path}': {first_line(exc)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"model.name_or_path: '{name_or_path}' has no fast tokenizer (tokenizer.json); "
                        "extractive QA offsets need one")
    # Encoders tokenize without truncation first to count what is cut; the tokenizer's own
    # "longer than the maximum" warning would then fire for inputs that we truncate ourselves.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    encoding = model_encoding(kind, bool(getattr(config, "is_encoder_decoder", False)))
    if encoding == "causal" and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only tokenizers often ship without a pad token
    return tokenizer, encoding
