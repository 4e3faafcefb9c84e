"""Mistakes a new user makes in a first hour, each answered by `mtl validate` with one line that
names the field, file or row (and, for a typo, the closest valid name)."""

from __future__ import annotations

import json

import pytest

from conftest import job_dict, write_jsonl
from launcher.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_float_scores_as_labels_are_refused_as_not_classes(capsys, data_dir, model_dir, write_job):
    job = job_dict(data_dir, str(model_dir))
    rows = [{"text": f"the film was great {i}", "label": round(0.1 * i + 0.05, 2)} for i in range(40)]
    job["tasks"]["sentiment"]["data"]["train"] = write_jsonl(data_dir / "scores.jsonl", rows)
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2
    assert "tasks.sentiment.data.train" in out and "scores.jsonl" in out
    assert "40 distinct labels in 40 train rows" in out and "scores or ids, not classes" in out


def test_a_split_that_loses_most_of_its_rows_is_a_warning(capsys, data_dir, model_dir, write_job):
    job = job_dict(data_dir, str(model_dir))
    rows = [{"text": "the film was great", "label": label} for label in ("positive", "meh", "so-so", "ok")]
    job["tasks"]["sentiment"]["data"]["validation"] = write_jsonl(data_dir / "val.jsonl", rows)
    code, out = run(capsys, "validate", write_job(job))
    assert code == 0, out
    line = next(x for x in out.splitlines() if "sentiment/validation" in x)
    assert line.strip().startswith("warning:") and "3 of 4 rows skipped" in line and "most of the split" in line


def test_a_huge_row_is_named_and_encoded_without_tokenizing_all_of_it(capsys, data_dir, model_dir, write_job,
                                                                      tokenizer):
    from trainer.tasks import text2text
    from trainer.tasks.registry import TaskContext

    job = job_dict(data_dir, str(model_dir))
    huge = "the film was great and very funny . " * 60_000  # ~2 MB in one row
    rows = [{"text": "the film was dull", "label": "negative"}, {"text": huge, "label": "positive"}] * 20
    job["tasks"]["sentiment"]["data"]["train"] = write_jsonl(data_dir / "huge.jsonl", rows)
    code, out = run(capsys, "validate", write_job(job))
    assert code == 0, out
    line = next(x for x in out.splitlines() if "far longer than max_length" in x)
    assert "sentiment/train: 20 rows" in line and "(64 tokens)" in line and f"{len(huge) + len('positive'):,} characters" in line  # text and label

    # The clipped prompt encodes to exactly what truncating the whole one gives.
    ctx = TaskContext(task="t", tokenizer=tokenizer, max_length=64, encoding="causal", prompt="{text}")
    prompt = "summary of the day : " + huge + " it rained ."
    clipped = text2text.clip_chars(prompt, ctx.max_length, text2text.PROMPT_TAIL)
    assert len(clipped) < 3000
    whole = tokenizer(prompt)["input_ids"]
    assert tokenizer(clipped)["input_ids"][:40] == whole[:40]
    assert tokenizer(clipped)["input_ids"][-text2text.PROMPT_TAIL:] == whole[-text2text.PROMPT_TAIL:]
    features, truncated = text2text.encode_prompt_target([prompt], ["positive"], ctx, max_target_length=4)
    assert truncated == 1 and len(features["input_ids"][0]) == 64


def test_every_weight_zero_is_refused(capsys, data_dir, model_dir, write_job):
    code, out = run(capsys, "validate", write_job(job_dict(data_dir, str(model_dir))), "tasks.sentiment.weight=0",
                    "tasks.qa.weight=0", "tasks.summary.weight=0")
    assert code == 2 and "every task's weight is 0" in out and "nothing would train" in out


def test_an_override_of_a_task_in_the_wrong_case_suggests_the_task(capsys, data_dir, model_dir, write_job):
    code, out = run(capsys, "validate", write_job(job_dict(data_dir, str(model_dir))), "tasks.Sentiment.weight=2")
    assert code == 2
    assert "override tasks.Sentiment" in out and "has no task 'Sentiment' (did you mean 'sentiment'?)" in out
    assert "required field is missing" not in out


@pytest.mark.parametrize("config, words", [
    ({"zero_optimisation": {"stage": 2}}, ["zero_optimisation is not a DeepSpeed setting",
                                            "(did you mean 'zero_optimization'?)"]),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}},
     ["zero_optimization.overlap_com: not a ZeRO setting (did you mean 'overlap_comm'?)"]),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"devic": "cpu"}}},
     ["zero_optimization.offload_optimizer.devic: not a ZeRO setting (did you mean 'device'?)"]),
    ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
     ["sets bf16; precision comes from train.precision", "remove it from the file"]),
])
def test_deepspeed_file_keys_are_checked_with_deepspeed_own_models(capsys, data_dir, model_dir, write_job, tmp_path,
                                                                   config, words):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    code, out = run(capsys, "validate", write_job(job_dict(data_dir, str(model_dir))), f"deepspeed={path}",
                    "--schema-only")
    assert code == 2, out
    assert "deepspeed:" in out and str(path) in out
    for word in words:
        assert word in out


def test_an_unknown_deepspeed_name_lists_the_shipped_ones(capsys, data_dir, model_dir, write_job):
    code, out = run(capsys, "validate", write_job(job_dict(data_dir, str(model_dir))), "deepspeed=zero4")
    assert code == 2
    assert "deepspeed: 'zero4' is neither a shipped config (zero0, zero1, zero2, zero2_offload, zero3, " \
           "zero3_offload) nor a file" in out


def test_a_model_path_that_is_a_file_is_named_a_file(capsys, data_dir, model_dir, write_job):
    code, out = run(capsys, "validate", write_job(job_dict(data_dir, str(model_dir / "config.json"))))
    assert code == 2 and "model.name_or_path:" in out and "config.json' is a file" in out


def test_data_on_object_storage_is_refused_by_field_not_mangled(capsys, data_dir, model_dir, write_job):
    code, out = run(capsys, "validate", write_job(job_dict(data_dir, str(model_dir))),
                    "tasks.qa.data.train=s3://bucket/qa/train.jsonl")
    assert code == 2
    assert "tasks.qa.data.train: 's3://bucket/qa/train.jsonl'" in out and "copy it from object storage" in out
    assert "s3:/bucket" not in out
