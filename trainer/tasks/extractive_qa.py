"""Extractive QA in SQuAD form: an answer is a span of its context.

Long contexts are split into overlapping windows (`doc_stride`); every window keeps the
character offsets of its context tokens (None elsewhere) and the id of its example, so a
predicted token span maps back to the exact text of the context.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainer.tasks import text2text
from trainer.tasks.heads import SpanHead
from trainer.tasks.registry import TaskContext, TaskType, register


class QAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    doc_stride: int | None = Field(None, ge=1, description="Tokens shared by consecutive windows of a long context "
                                                          "(default: a quarter of max_length).")
    max_answer_length: int = Field(30, ge=1, description="Longest answer span (tokens) considered at prediction.")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated at evaluation (text2text models).")


def _locate(text: str, context: str, start: int | None) -> tuple[str, int] | None:
    """The answer's (text, start) in context: at `start` if it is there, else its first occurrence."""
    candidates = [text, text.strip(), text.strip().rstrip(".")]
    for cand in candidates:
        if cand and start is not None and context[start:start + len(cand)] == cand:
            return cand, start
    for cand in candidates:
        pos = context.find(cand) if cand else -1
        if pos >= 0:
            return cand, pos
    return None


def normalize_answers(answers, context: str) -> tuple[dict, str | None]:
    """SQuAD answers from a string, a list of strings, or {text, answer_start} (lists or scalars)."""
    if isinstance(answers, str):
        texts, starts = [answers], [None]
    elif isinstance(answers, dict):
        texts = answers.get("text")
        starts = answers.get("answer_start")
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        starts = [starts] if isinstance(starts, int) else list(starts or [None] * len(texts))
        if len(starts) != len(texts):
            return {}, "answers.text and answers.answer_start differ in length"
    elif isinstance(answers, list):
        texts, starts = [str(a) for a in answers], [None] * len(answers)
    else:
        return {}, f"answers must be text, a list or {{text, answer_start}}, got {type(answers).__name__}"
    out = {"text": [], "answer_start": []}
    for text, start in zip(texts, starts):
        found = _locate(str(text), context, start)
        if found is None:
            return {}, f"answer not in its context: '{str(text)[:60]}'"
        out["text"].append(found[0])
        out["answer_start"].append(found[1])
    if not out["text"]:
        return {}, "no answer given"
    return out, None


def check_row(row: dict, ctx: TaskContext) -> str | None:
    row["answers"], problem = normalize_answers(row["answers"], row["context"])
    return problem


def encode(rows: list[dict], ctx: TaskContext) -> tuple[dict[str, list], int]:
    if ctx.encoding != "heads":
        prompts = [text2text.render(ctx.prompt, {"question": r["question"], "context": r["context"]}, ctx.task)
                   for r in rows]
        return text2text.encode_prompt_target(prompts, [r["answers"]["text"][0] for r in rows], ctx,
                                               max_target_length=64)
    tok = ctx.tokenizer
    enc = tok([r["question"].lstrip() for r in rows], [r["context"] for r in rows],
              truncation="only_second", max_length=ctx.max_length,
              stride=ctx.options.doc_stride or ctx.max_length // 4,
              return_overflowing_tokens=True, return_offsets_mapping=True)
    sample_map = enc["overflow_to_sample_mapping"]
    features: dict[str, list] = {k: list(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    features.update(start_positions=[], end_positions=[], offset_mapping=[], example_id=[])
    for i, offsets in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        row = rows[sample_map[i]]
        start_char = row["answers"]["answer_start"][0]
        end_char = start_char + len(row["answers"]["text"][0])
        ctx_tokens = [j for j, s in enumerate(seq) if s == 1]
        first, last = ctx_tokens[0], ctx_tokens[-1]
        if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
            start_tok = next(j for j in ctx_tokens if offsets[j][1] > start_char)
            end_tok = next(j for j in reversed(ctx_tokens) if offsets[j][0] < end_char)
        else:
            start_tok = end_tok = 0  # the answer is not in this window: point at [CLS]
        features["start_positions"].append(start_tok)
        features["end_positions"].append(end_tok)
        features["offset_mapping"].append([list(o) if s == 1 else None for o, s in zip(offsets, seq)])
        features["example_id"].append(row["__row__"])
    windows = [0] * len(rows)
    for s in sample_map:
        windows[s] += 1
    return features, sum(w > 1 for w in windows)


def decode(logits, batch: dict, rows_by_id: dict, ctx: TaskContext) -> list[tuple]:
    """The best span of each window whose tokens lie in the context, as text of the context."""
    out = []
    max_len = ctx.options.max_answer_length
    for f, (ids, offsets) in enumerate(zip(batch["example_id"].tolist(), batch["offset_mapping"])):
        start_logits, end_logits = logits[f, :, 0], logits[f, :, 1]
        n = len(offsets)
        valid = torch.tensor([o is not None for o in offsets] + [False] * (logits.shape[1] - n))
        scores = start_logits[:, None] + end_logits[None, :]
        allowed = valid[:, None] & valid[None, :]
        allowed &= torch.ones_like(allowed).triu() & ~torch.ones_like(allowed).triu(max_len)
        scores = scores.masked_fill(~allowed, float("-inf"))
        best = int(scores.argmax())
        s, e = divmod(best, scores.shape[1])
        if not torch.isfinite(scores[s, e]):
            out.append((ids, float("-inf"), ""))
            continue
        context = rows_by_id[ids]["context"]
        out.append((ids, float(scores[s, e]), context[offsets[s][0]:offsets[e][1]]))
    return out


def first_name_baseline(train_rows: list[dict]):
    """The first capitalised word of the context that the question does not mention."""
    def predict(row: dict) -> str:
        asked = set(row["question"].lower().split())
        words = [w.strip(".,;:!?\"'()") for w in row["context"].split()]
        return next((w for w in words[1:] if w[:1].isupper() and w.lower() not in asked), words[0] if words else "")
    return predict


EXTRACTIVE_QA = register(TaskType(
    name="extractive_qa",
    fields=("question", "context", "answers"),
    required=("question", "context", "answers"),
    prompt_fields=("question", "context"),
    model_kinds=("heads", "text2text"),
    default_metrics=("exact_match", "f1"),
    allowed_metrics=("exact_match", "f1"),
    default_prompt="{task}: question: {question} context: {context}",
    check_row=check_row,
    encode=encode,
    reference=lambda row: row["answers"]["text"],
    make_head=SpanHead,
    decode=decode,
    baseline=first_name_baseline,
    baseline_name="first capitalised word not in the question",
    options_model=QAOptions,
    description="SQuAD-style span extraction. heads: start/end logits over context windows; "
                "text2text: the answer text is the target.",
))
