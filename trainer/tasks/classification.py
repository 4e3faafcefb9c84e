"""Classification of one text or a text pair into a label set inferred from train."""

from __future__ import annotations

from trainer.tasks import text2text
from trainer.tasks.heads import ClassificationHead
from trainer.tasks.registry import TaskContext, TaskType, register


def label_text(value) -> str:
    """Labels are compared as text, so 1, '1' and 1.0 from different files agree."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def check_row(row: dict, ctx: TaskContext) -> str | None:
    row["label"] = label_text(row["label"])
    if ctx.labels and row["label"] not in ctx.label2id:
        return f"unknown label '{row['label']}' (train labels: {', '.join(ctx.labels)})"
    return None


def encode(rows: list[dict], ctx: TaskContext) -> tuple[dict[str, list], int]:
    label_ids = [ctx.label2id[r["label"]] for r in rows]
    if ctx.encoding == "heads":
        has_pair = any(r.get("text_pair") for r in rows)
        pairs = [r.get("text_pair") or "" for r in rows] if has_pair else None
        features, truncated = text2text.heads_encode_text([r["text"] for r in rows], pairs, ctx)
        features["labels"] = label_ids
        return features, truncated
    # text2text: the target is the label word; rank classification scores every label at eval.
    prompts = [text2text.render(ctx.prompt, _prompt_row(r), ctx.task) for r in rows]
    features, truncated = text2text.encode_prompt_target(prompts, [r["label"] for r in rows], ctx, max_target_length=32)
    features["label_id"] = label_ids
    return features, truncated


def decode(logits, batch: dict, rows_by_id: dict, ctx: TaskContext) -> list[tuple]:
    probs = logits.float().softmax(-1)
    score, index = probs.max(-1)
    return [(int(i), float(s), ctx.labels[int(k)])
            for i, s, k in zip(batch["example_id"].tolist(), score.tolist(), index.tolist())]


def majority_baseline(train_rows: list[dict]):
    from collections import Counter

    label = Counter(r["label"] for r in train_rows).most_common(1)[0][0]
    return lambda row: label


def _prompt_row(row: dict) -> dict:
    return {"text": row["text"], "text_pair": row.get("text_pair") or ""}


CLASSIFICATION = register(TaskType(
    name="classification",
    fields=("text", "text_pair", "label"),
    required=("text", "label"),
    prompt_fields=("text", "text_pair"),
    model_kinds=("heads", "text2text"),
    default_metrics=("accuracy", "macro_f1"),
    allowed_metrics=("accuracy", "macro_f1"),
    default_prompt="{task}: {text}",
    check_row=check_row,
    encode=encode,
    reference=lambda row: row["label"],
    make_head=ClassificationHead,
    decode=decode,
    text2text_eval="rank",
    baseline=majority_baseline,
    baseline_name="majority class",
    has_labels=True,
    description="One text (or a text pair) -> one label. heads: a linear head on the first token; "
                "text2text: the label word is the target, scored by rank classification.",
))
