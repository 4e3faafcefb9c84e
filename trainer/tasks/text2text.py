"""Prompt + target encoding shared by every task type on a text2text model.

causal (decoder-only): input = prompt tokens + target tokens + EOS; the loss sees only the
target (prompt positions are labelled -100). seq2seq: the encoder reads the prompt, the
decoder is trained on the target. Over-long prompts keep their first tokens and their last
`PROMPT_TAIL` tokens, so both the instruction and a trailing cue ("Answer:") survive.
"""

from __future__ import annotations

import string

from trainer.tasks.registry import TaskContext

PROMPT_TAIL = 16
IGNORE_INDEX = -100
# No token of a real vocabulary spans more characters than this, so a text cut to
# CHARS_PER_TOKEN_BOUND characters per token it may keep still holds every token that survives
# truncation: a 19 MB row is tokenized in milliseconds instead of minutes, with the same result.
CHARS_PER_TOKEN_BOUND = 32


def render(template: str, row: dict, task: str) -> str:
    return template.format(task=task, **row)


def template_fields(template: str) -> set[str]:
    """Placeholder names in a prompt template ('{text}' -> {'text'})."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def clip_chars(text: str, max_tokens: int, tail_tokens: int = 0) -> str:
    """`text` without the characters that truncation to `max_tokens` (keeping the last
    `tail_tokens`) would drop anyway; short texts are returned as they are."""
    head, tail = (max_tokens - tail_tokens) * CHARS_PER_TOKEN_BOUND, tail_tokens * CHARS_PER_TOKEN_BOUND
    if len(text) <= head + tail + CHARS_PER_TOKEN_BOUND:
        return text
    return text[:head] + " " + (text[-tail:] if tail else "")


def _cut(ids: list[int], limit: int) -> list[int]:
    if len(ids) <= limit:
        return ids
    tail = min(PROMPT_TAIL, limit // 2)
    return ids[: limit - tail] + ids[len(ids) - tail:]


def encode_prompt_target(prompts: list[str], targets: list[str], ctx: TaskContext,
                         max_target_length: int) -> tuple[dict[str, list], int]:
    tok = ctx.tokenizer
    prompts = [clip_chars(p, ctx.max_length, PROMPT_TAIL) for p in prompts]
    if ctx.encoding == "seq2seq":
        enc = tok(prompts, truncation=False)
        ids = enc["input_ids"]
        truncated = sum(len(x) > ctx.max_length for x in ids)
        # Keep the closing special token (EOS/SEP) that the tokenizer put last.
        ids = [x if len(x) <= ctx.max_length else _cut(x[:-1], ctx.max_length - 1) + x[-1:] for x in ids]
        labels = tok(text_target=targets, max_length=max_target_length, truncation=True)["input_ids"]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels}, truncated

    if ctx.encoding != "causal":
        raise ValueError(f"encode_prompt_target: unknown encoding {ctx.encoding!r}")
    prompt_ids = tok(prompts, add_special_tokens=True)["input_ids"]
    # The target continues the prompt's text: byte-level BPE vocabularies (GPT-2, Llama) spell a
    # word after a space differently from a word glued to the previous one.
    targets = [t if p.endswith((" ", "\n")) else " " + t for p, t in zip(prompts, targets)]
    target_ids = tok(targets, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    features: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_length": []}
    truncated = 0
    for p, t in zip(prompt_ids, target_ids):
        t = t[: max_target_length - 1] + ([eos] if eos is not None else [])
        room = max(ctx.max_length - len(t), 1)
        if len(p) > room:
            truncated += 1
            p = _cut(p, room)
        features["input_ids"].append(p + t)
        features["attention_mask"].append([1] * (len(p) + len(t)))
        features["labels"].append([IGNORE_INDEX] * len(p) + t)
        features["prompt_length"].append(len(p))
    return features, truncated


def heads_encode_text(texts: list[str], pairs: list[str] | None, ctx: TaskContext) -> tuple[dict[str, list], int]:
    """Encoder input for a heads model; counts rows that did not fit `max_length`."""
    tok = ctx.tokenizer
    texts = [clip_chars(t, ctx.max_length) for t in texts]
    pairs = None if pairs is None else [clip_chars(p, ctx.max_length) for p in pairs]
    args = (texts,) if pairs is None else (texts, pairs)
    enc = dict(tok(*args, truncation=False))
    too_long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > ctx.max_length]
    if too_long:
        # Re-encode only the rows that did not fit, with the tokenizer's own truncation.
        sub = tok(*[[a[i] for i in too_long] for a in args], truncation=True, max_length=ctx.max_length)
        for key in enc:
            for j, i in enumerate(too_long):
                enc[key][i] = sub[key][j]
    return enc, len(too_long)
