"""Generation: summarization, abstractive QA, any source -> target text (text2text models)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from trainer.tasks import text2text
from trainer.tasks.registry import TaskContext, TaskType, register


class GenerationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_target_length: int = Field(128, ge=1, description="Target tokens kept for training.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated at evaluation.")
    num_beams: int = Field(1, ge=1, description="Beam search width at evaluation.")


def check_row(row: dict, ctx: TaskContext) -> str | None:
    return None  # required fields are checked for presence and emptiness before this


def encode(rows: list[dict], ctx: TaskContext) -> tuple[dict[str, list], int]:
    prompts = [text2text.render(ctx.prompt, {"source": r["source"]}, ctx.task) for r in rows]
    return text2text.encode_prompt_target(prompts, [r["target"] for r in rows], ctx,
                                          max_target_length=ctx.options.max_target_length)


def lead_baseline(train_rows: list[dict]):
    """The source's first sentence (lead-1), the classic summarization baseline."""
    import re

    return lambda row: re.split(r"(?<=[.!?])\s+", row["source"].strip(), maxsplit=1)[0]


GENERATION = register(TaskType(
    name="generation",
    fields=("source", "target"),
    required=("source", "target"),
    prompt_fields=("source",),
    model_kinds=("text2text",),
    default_metrics=("rouge",),
    allowed_metrics=("rouge", "exact_match"),
    default_prompt="{task}: {source}",
    check_row=check_row,
    encode=encode,
    reference=lambda row: row["target"],
    baseline=lead_baseline,
    baseline_name="first sentence of the source",
    options_model=GenerationOptions,
    description="Source text -> target text (summarization, abstractive QA); text2text models only.",
))
