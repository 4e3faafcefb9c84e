"""`mtl validate`: accepts good jobs, rejects bad jobs and bad data with messages that name the problem."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import job_dict, write_jsonl
from launcher.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_good_job_validates_and_reports_sizes(capsys, data_dir, model_dir, write_job):
    code, out = run(capsys, "validate", write_job(job_dict(data_dir, str(model_dir))))
    assert code == 0, out
    assert re.search(r"^task +type +train +validation +test +labels$", out, re.M), out
    assert re.search(r"^sentiment +classification +40 +10 +10 +negative, positive$", out, re.M), out
    assert "OK (3 tasks)" in out


def test_print_shows_resolved_job_with_overrides_and_defaults(capsys, data_dir, model_dir, write_job):
    code, out = run(capsys, "validate", write_job(job_dict(data_dir, str(model_dir))), "--print",
                    "train.steps=20", "tasks.sentiment.weight=2", "mixture.strategy=uniform")
    assert code == 0, out
    resolved = yaml.safe_load(out.split("\ntask ")[0])
    assert resolved["train"]["steps"] == 20
    assert resolved["tasks"]["sentiment"]["weight"] == 2.0
    assert resolved["mixture"]["strategy"] == "uniform"
    assert resolved["loss_weighting"]["strategy"] == "static"  # a default, filled in
    assert resolved["deepspeed"].endswith("ds_configs/zero2.json")


def test_the_default_deepspeed_config_is_found_from_any_folder(capsys, data_dir, model_dir, write_job, tmp_path,
                                                               monkeypatch):
    job = job_dict(data_dir, str(model_dir))
    job.pop("deepspeed", None)
    path = write_job(job)
    monkeypatch.chdir(tmp_path)
    code, out = run(capsys, "validate", path, "--print")
    assert code == 0, out
    assert Path(yaml.safe_load(out.split("\ntask ")[0])["deepspeed"]).is_file()


def test_a_task_named_twice_in_the_yaml_is_refused(capsys, data_dir, model_dir, write_job, tmp_path):
    text = Path(write_job(job_dict(data_dir, str(model_dir)))).read_text()
    twice = text.replace("  qa:\n", "  sentiment:\n", 1)
    (tmp_path / "twice.yaml").write_text(twice)
    code, out = run(capsys, "validate", str(tmp_path / "twice.yaml"))
    assert code == 2 and "'sentiment' appears twice in the same mapping (first on line" in out
    assert "twice.yaml\", line" in out


def test_an_s3_endpoint_that_does_not_answer_is_named_in_bounded_time(capsys, data_dir, model_dir, write_job,
                                                                      monkeypatch):
    import socket
    import time

    import trainer.versions.storage

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setattr(trainer.versions.storage, "PROBE_TIMEOUT_S", 2.0)
    job = job_dict(data_dir, str(model_dir))
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    job["storage"] = {"path": "s3://bucket/runs", "endpoint_url": endpoint, "region": "us-east-1"}
    started = time.monotonic()
    try:
        code, out = run(capsys, "validate", write_job(job))
    finally:
        silent.close()
    assert code == 2 and f"storage.path: no answer from s3://bucket/runs at {endpoint} within 2s" in out
    assert time.monotonic() - started < 30


def _break(job: dict, path: str, value) -> dict:
    job = copy.deepcopy(job)
    *parents, leaf = path.split(".")
    node = job
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        node.pop(leaf)
    else:
        node[leaf] = value
    return job


DELETE = object()

# (what is broken: dotted path, new value) -> words the error must contain
SPEC_MISTAKES = [
    ("tasks.sentiment.wieght", 2.0, ["tasks.sentiment.wieght", "unknown key", "did you mean 'weight'"]),
    ("trian", {"steps": 3}, ["trian", "unknown key", "did you mean 'train'"]),
    ("tasks", {}, ["tasks: at least one task is needed"]),
    ("tasks.sentiment.type", "clasification", ["tasks.sentiment.type", "did you mean 'classification'"]),
    ("mixture", {"strategy": "temprature"}, ["mixture.strategy", "'temprature'", "did you mean 'temperature'"]),
    ("tasks.sentiment.weight", -1, ["tasks.sentiment.weight", "greater than or equal to 0"]),
    ("model.kind", "heads", ["tasks.summary", "generation tasks need model.kind text2text"]),
    ("model.name_or_path", DELETE, ["model.name_or_path", "required field is missing"]),
    ("mixture", {"strategy": "explicit", "rates": {"sentiment": 1.0}}, ["explicit", "missing: qa, summary"]),
    ("mixture", {"strategy": "capped"}, ["mixture", "needs `cap`"]),
    ("mixture", {"adapt": {"by": "reference"}}, ["mixture.adapt", "by: reference needs `reference`"]),
    ("mixture", {"adapt": {"by": "reference", "reference": {"sentiment": 0.9, "qs": 0.5}}},
     ["mixture.adapt.reference needs a score for every task and no other: unknown qs; missing qa, summary"]),
    ("mixture", {"strategy": "bandit", "adapt": {"by": "trend"}}, ["mixture.adapt and mixture.strategy 'bandit' both "
                                                                   "move the rates: choose one"]),
    ("tasks.sentiment.lr_scale", 3.0, ["tasks.sentiment.lr_scale", "a text2text model has none", "`weight`"]),
    ("train.head_warmup_steps", 2, ["train.head_warmup_steps", "a text2text model has none"]),
    ("train", {"steps": 3, "head_warmup_steps": 3}, ["head_warmup_steps (3) must be below steps (3)"]),
    ("train.early_stopping", {"action": "drop"}, ["train.early_stopping.action", "'drop' is not one of freeze, downweight"]),
    ("train", {"validation": "task", "early_stopping": {"patience": 2}}, ["early_stopping needs validation: loop"]),
    ("tasks.sentiment.accumulation", 3, ["accumulation", "nothing is left for qa, summary"]),
    ("tasks.sentiment.prompt", "rate: {txt}", ["tasks.sentiment", "'{txt}' cannot be used", "did you mean 'text'"]),
    # the answer in the prompt: validated before, then a KeyError inside every Ray worker
    ("tasks.sentiment.prompt", "{text} is {label}", ["tasks.sentiment", "prompt: '{label}' cannot be used in a "
                                                    "classification prompt (the answer", "{task}, {text}, {text_pair}"]),
    ("tasks.qa.prompt", "{question} {answers}", ["tasks.qa", "'{answers}' cannot be used", "use {task}, {question}, {context}"]),
    ("tasks.summary.prompt", "{source} -> {target}", ["tasks.summary", "'{target}' cannot be used", "use {task}, {source}"]),
    ("tasks.sentiment.metrics", ["acuracy"], ["metric 'acuracy'", "did you mean 'accuracy'"]),
    ("tasks.qa.columns", {"qestion": "q"}, ["'qestion' is not a field", "did you mean 'question'"]),
    ("train.micro_batch_size", 0, ["train.micro_batch_size", "greater than or equal to 1"]),
    ("train.precision", "fp8", ["train.precision", "'fp8' is not one of fp32, bf16, fp16"]),
    ("name", "bad name!", ["name", "should match pattern"]),
    ("tasks.qa.options", {"doc_stride": 40}, ["tasks.qa.options.doc_stride (40)", "half of the task's max_length (64)"]),
    ("tasks.qa.options", {"doc_stride": 0}, ["tasks.qa", "options.doc_stride: Input should be greater than or equal to 1"]),
    ("tasks.qa.options", {"stride": 4}, ["tasks.qa", "options.stride: unknown option of extractive_qa tasks", "did you mean 'doc_stride'"]),
]


@pytest.mark.parametrize("path,value,words", SPEC_MISTAKES, ids=[m[0] for m in SPEC_MISTAKES])
def test_spec_mistakes_name_the_field(capsys, data_dir, model_dir, write_job, path, value, words):
    job = _break(job_dict(data_dir, str(model_dir)), path, value)
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2
    assert "Traceback" not in out
    for word in words:
        assert word in out, f"{word!r} not in:\n{out}"


def test_split_sources_are_exclusive_and_fractions_checked(capsys, data_dir, model_dir, write_job):
    job = job_dict(data_dir, str(model_dir))
    job["tasks"]["sentiment"]["data"]["path"] = str(data_dir / "sentiment" / "train.jsonl")
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2 and "tasks.sentiment.data" in out and "exactly one source" in out
    job["tasks"]["sentiment"]["data"] = {"path": str(data_dir / "sentiment" / "train.jsonl"),
                                         "split": {"validation": 0.6, "test": 0.5}}
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2 and "split fractions sum to 1.1" in out


def test_derived_splits_are_deterministic(capsys, data_dir, model_dir, write_job):
    job = job_dict(data_dir, str(model_dir))
    job["tasks"]["sentiment"]["data"] = {"path": str(data_dir / "sentiment" / "train.jsonl"),
                                         "split": {"validation": 0.25, "test": 0.25}, "seed": 3}
    code, out = run(capsys, "validate", write_job(job))
    assert code == 0, out
    assert re.search(r"^sentiment +classification +20 +10 +10 ", out, re.M), out


FILE_MISTAKES = {
    "missing data file": (lambda d, j: j["tasks"]["qa"]["data"].update(train=str(d / "nope.jsonl")),
                          ["tasks.qa.data.train", "file not found", "nope.jsonl"]),
    "missing column": (lambda d, j: j["tasks"]["sentiment"].update(columns={"text": "sentence"}),
                       ["tasks.sentiment.data.train", "column 'sentence' (field 'text') not found", "columns are: label, text"]),
    "column absent from one split": (
        lambda d, j: j["tasks"]["sentiment"]["data"].update(validation=write_jsonl(
            d / "v.jsonl", [{"sentence": "great", "label": "positive"}])),
        ["tasks.sentiment.data.validation", "v.jsonl", "column 'text'", "tasks.sentiment.columns.text"]),
    "empty split": (lambda d, j: j["tasks"]["summary"]["data"].update(test=_empty_file(d)),
                    ["tasks.summary.data.test", "empty.jsonl"]),
    "broken json line": (lambda d, j: j["tasks"]["summary"]["data"].update(train=_broken_file(d)),
                         ["tasks.summary.data.train", "broken.jsonl", "line 2: Unterminated string"]),
    "null label with bad_rows: error": (
        lambda d, j: (j["tasks"]["sentiment"].update(bad_rows="error"), j["tasks"]["sentiment"]["data"].update(
            train=write_jsonl(d / "nulls.jsonl", [{"text": "great", "label": "positive"},
                                                  {"text": "awful", "label": "negative"},
                                                  {"text": "meh", "label": None}]))),
        ["tasks.sentiment.data.train", "nulls.jsonl", "row 3: empty 'label' (column 'label' is null or blank)"]),
    "binary data file": (lambda d, j: j["tasks"]["summary"]["data"].update(
                             train=_binary_file(d)), ["tasks.summary.data.train", "is not UTF-8 text (a binary file?)"]),
    "micro-batch larger than a worker's shard": (
        lambda d, j: j["train"].update(micro_batch_size=21),
        ["train.micro_batch_size: 21 is more than the 20 train rows each worker gets of task 'sentiment' (40 rows / 2 workers)"]),
    "storage path that cannot be written": (
        lambda d, j: j.update(storage={"path": str(Path(_file(d, "plain-file", "x")) / "runs")}),
        ["storage.path: cannot write to", "plain-file/runs", "plain-file' is not a folder"]),
    "unknown extension": (lambda d, j: j["tasks"]["summary"]["data"].update(train=_file(d, "x.txt", "hi")),
                          ["tasks.summary.data.train", "cannot tell the format", "data.format"]),
    "missing deepspeed file": (lambda d, j: j.update(deepspeed=str(d / "zero9.json")),
                               ["deepspeed", "DeepSpeed config not found", "zero9.json"]),
    "deepspeed not json": (lambda d, j: j.update(deepspeed=_file(d, "ds.json", "{stage: 2")),
                           ["deepspeed", "ds.json", "not valid JSON"]),
    "deepspeed batch size disagrees": (
        lambda d, j: j.update(deepspeed=_file(d, "ds.json", json.dumps({"train_batch_size": 7}))),
        ["deepspeed", "train_batch_size is 7", "job gives 24"]),
    "deepspeed bad stage": (
        lambda d, j: j.update(deepspeed=_file(d, "ds.json", json.dumps({"zero_optimization": {"stage": 4}}))),
        ["deepspeed", "stage must be 0, 1, 2 or 3"]),
    "model folder missing": (lambda d, j: j["model"].update(name_or_path=str(d / "no-model")),
                             ["model.name_or_path", "folder not found"]),
    "model folder without weights": (
        lambda d, j: j["model"].update(name_or_path=str(shutil.copytree(
            j["model"]["name_or_path"], d / "no-weights", ignore=shutil.ignore_patterns("*.safetensors")))),
        ["model.name_or_path", "no-weights' has no weights", "model.safetensors"]),
    "max_length beyond the model's positions": (lambda d, j: j["tasks"]["qa"].update(max_length=512),
                                                ["tasks.qa.max_length: 512 is more than the model's 128 positions"]),
    "LoRA on layers the model lacks": (
        lambda d, j: j["model"].update(lora={"layers_to_transform": [1, 2, 7]}),
        ["model.lora.layers_to_transform: [2, 7] are not layers of the model (0 to 1)"]),
    "fp16 on cpu": (lambda d, j: j["train"].update(precision="fp16"), ["train.precision", "fp16 needs GPUs"]),
    "fewer rows than workers": (lambda d, j: j["scaling"].update(num_workers=41),
                                ["tasks.sentiment", "40 train rows", "num_workers=41"]),
    "single label in train": (
        lambda d, j: j["tasks"]["sentiment"]["data"].update(train=write_jsonl(
            d / "one.jsonl", [{"text": "great", "label": "positive"}] * 3)),
        ["one.jsonl", "single label 'positive'"]),
}


def test_heads_on_a_decoder_only_model_is_refused_up_front(capsys, data_dir, causal_dir, write_job):
    job = job_dict(data_dir, str(causal_dir), kind="heads", tasks=("sentiment",))
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2
    assert "model.kind: heads needs an encoder that reads the whole text (gpt2 is not one" in out
    assert "use kind: text2text" in out


def test_a_hub_id_that_does_not_resolve_is_named_before_training(capsys, data_dir, write_job, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job = job_dict(data_dir, "bert-bsae-uncased")
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2 and "model.name_or_path: 'bert-bsae-uncased' is not a local folder and the hub is offline" in out


def _file(d, name, text):
    (d / name).write_text(text)
    return str(d / name)


def _empty_file(d):
    return _file(d, "empty.jsonl", "")


def _binary_file(d):
    (d / "blob.jsonl").write_bytes(bytes(range(256)) * 8)
    return str(d / "blob.jsonl")


def _broken_file(d):
    return _file(d, "broken.jsonl", '{"source": "a", "target": "b"}\n{"source": "c", "targ\n')


@pytest.mark.parametrize("mistake", list(FILE_MISTAKES))
def test_file_mistakes_name_the_file(capsys, data_dir, model_dir, write_job, mistake):
    change, words = FILE_MISTAKES[mistake]
    job = job_dict(data_dir, str(model_dir))
    change(data_dir, job)
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2, out
    assert "Traceback" not in out
    for word in words:
        assert word in out, f"{word!r} not in:\n{out}"


def test_all_problems_are_listed_at_once(capsys, data_dir, model_dir, write_job):
    job = job_dict(data_dir, str(model_dir))
    job["tasks"]["qa"]["data"]["train"] = str(data_dir / "nope.jsonl")
    job["tasks"]["sentiment"]["columns"] = {"text": "sentence"}
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2
    assert "2 problems found" in out and "nope.jsonl" in out and "'sentence'" in out


def _bad_rows_job(data_dir, model_dir, policy):
    rows = [{"text": "great film", "label": "positive"}, {"text": "", "label": "negative"},
            {"text": "dull", "label": "neutral"}, {"text": "fine", "label": "negative"},
            {"label": "positive"}]
    job = job_dict(data_dir, str(model_dir))
    job["tasks"]["sentiment"]["data"]["validation"] = write_jsonl(data_dir / "val_bad.jsonl", rows)
    job["tasks"]["sentiment"]["bad_rows"] = policy
    qa = [{"question": "where does bob live ?", "context": "bob lives in rome .", "answers": "oslo"},
          {"question": "where does bob live ?", "context": "bob lives in rome .", "answers": "rome"}]
    job["tasks"]["qa"]["data"]["test"] = write_jsonl(data_dir / "qa_bad.jsonl", qa)
    job["tasks"]["qa"]["bad_rows"] = policy
    return job


def test_bad_rows_are_skipped_counted_and_reported(capsys, data_dir, model_dir, write_job):
    code, out = run(capsys, "validate", write_job(_bad_rows_job(data_dir, model_dir, "skip")))
    assert code == 0, out
    assert "sentiment/validation" in out and "val_bad.jsonl" in out
    assert "3 of 5 rows skipped" in out
    assert "empty 'text' (rows 2, 5)" in out
    assert "unknown label 'neutral' (rows 3)" in out
    assert "qa/test" in out and "1 of 2 rows skipped: 1 answer not in its context (rows 1)" in out


def test_bad_rows_error_policy_names_file_row_and_problem(capsys, data_dir, model_dir, write_job):
    code, out = run(capsys, "validate", write_job(_bad_rows_job(data_dir, model_dir, "error")))
    assert code == 2
    assert "tasks.sentiment.data.validation" in out and "val_bad.jsonl): row 2: empty 'text'" in out
    assert "qa_bad.jsonl): row 1: answer not in its context: 'oslo'" in out


def test_job_file_problems(capsys, tmp_path):
    code, out = run(capsys, "validate", str(tmp_path / "missing.yaml"))
    assert code == 2 and "job file not found" in out
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, out = run(capsys, "validate", str(tmp_path / "list.yaml"))
    assert code == 2 and "must be a YAML mapping" in out
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    code, out = run(capsys, "validate", str(tmp_path / "bad.yaml"))
    assert code == 2 and "not valid YAML" in out and "line 2, column 1" in out


def test_bad_override_syntax(capsys, data_dir, model_dir, write_job):
    code, out = run(capsys, "validate", write_job(job_dict(data_dir, str(model_dir))), "train.steps")
    assert code == 2 and "must look like dotted.key=value" in out


def test_hub_dataset_offline_is_a_clear_error(capsys, data_dir, model_dir, write_job):
    job = job_dict(data_dir, str(model_dir))
    job["tasks"]["sentiment"]["data"] = {"hub": "glue", "subset": "sst2"}
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2 and "tasks.sentiment.data.hub" in out and "cannot load hub dataset 'glue'/sst2" in out
    assert "The hub is unreachable (HF_HUB_OFFLINE is set)" in out and "tasks.sentiment.data.train" in out


def test_class_label_columns_train_on_their_names(capsys, data_dir, model_dir, write_job):
    """Hub datasets (and parquet written by `datasets`) store labels as ClassLabel ints; the model
    must learn the names, in the dataset's order, and the version must store them."""
    import datasets

    from launcher.jobfile import parse_job, resolve
    from trainer.data.task_data import check_task_data

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["terrible", "great", "unused"])})
    rows = {"sentence": [f"text {i}" for i in range(8)], "label": [i % 2 for i in range(8)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(data_dir / "cl.parquet"))
    job = job_dict(data_dir, str(model_dir), tasks=("sentiment",))
    job["tasks"]["sentiment"]["data"] = {"train": str(data_dir / "cl.parquet")}
    job["tasks"]["sentiment"]["columns"] = {"text": "sentence"}
    code, out = run(capsys, "validate", write_job(job))
    assert code == 0, out
    assert re.search(r"^sentiment +classification .* terrible, great, unused$", out, re.M), out
    checked = check_task_data(resolve(parse_job(job)), "sentiment")
    assert checked.labels == ("terrible", "great", "unused")
    assert [r["label"] for r in checked.splits["train"][:3]] == ["terrible", "great", "terrible"]


def test_init_from_is_checked_before_any_resource_starts(capsys, data_dir, model_dir, write_job, tmp_path):
    """A version to start from must exist, be of the job's model kind and keep each kept task's type
    (and, for heads, its labels in order: a head answers with label ids)."""
    from trainer.versions.init_from import label_problems, manifest_problems, optimizer_problems
    from trainer.spec import JobSpec

    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment", "qa"))
    job.update(storage={"path": str(tmp_path / "runs")}, init_from={"experiment": "gone", "version": "best"})
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2 and "init_from: no committed version of 'gone'" in out
    job["init_from"] = {"experiment": str(tmp_path / "nowhere")}
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2 and "is not an experiment folder" in out

    spec = JobSpec.model_validate({**job, "init_from": {"experiment": "old", "version": "step-000004"}})
    manifest = {"kind": "heads", "encoding": "heads",
                "tasks": {"sentiment": {"type": "classification", "labels": ["negative", "positive"]},
                          "qa": {"type": "generation", "labels": []}}}
    assert manifest_problems(spec, manifest) == [
        "tasks.qa: extractive_qa here, generation in old/step-000004; a new task needs a new name"]
    assert manifest_problems(spec, {**manifest, "kind": "text2text", "tasks": {}}) == [
        "init_from: old/step-000004 is a text2text model; this job's model.kind is 'heads'"]
    assert label_problems(spec, manifest, {"sentiment": ("negative", "positive"), "qa": ()}) == []
    problem, = label_problems(spec, manifest, {"sentiment": ("positive", "negative"), "qa": ()})
    assert problem.startswith("tasks.sentiment: labels ['positive', 'negative'] here, ['negative', 'positive'] in")
    assert label_problems(spec, {**manifest, "encoding": "causal"}, {"sentiment": ("positive", "negative")}) == []
    assert optimizer_problems(spec, {"tasks": {"qa": {}, "sentiment": {}}}, {"world_size": 4}, {}) == [
        "init_from.resume_optimizer: the tasks must be the version's, in order (qa, sentiment); here sentiment, qa",
        "init_from.resume_optimizer: the version was trained on 4 workers; scaling.num_workers is 2"]
    # a version whose heads had optimizer groups of their own (lr_scale, head_warmup_steps) holds another layout
    apart = {"tasks": {"sentiment": {"lr_scale": 10.0}}, "train": {}}
    assert optimizer_problems(spec, {"tasks": {"sentiment": {}, "qa": {}}}, {"world_size": 2}, apart) == [
        "init_from.resume_optimizer: the version's heads had optimizer groups of their own (tasks.<t>.lr_scale or "
        "train.head_warmup_steps) and this job's do not, or the other way round: its optimizer state has another "
        "layout"]


def test_a_decoder_that_would_generate_past_its_positions_is_refused(capsys, data_dir, causal_dir, write_job):
    # The tiny GPT-2 has 128 positions: a 120-token prompt leaves no room for 64 new tokens, which
    # once failed only at the run's first validation (an index error in the position embedding).
    job = job_dict(data_dir, str(causal_dir), tasks=("sentiment", "summary"))
    job["model"]["max_length"] = 120
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2 and "Traceback" not in out
    assert ("tasks.summary: a prompt of up to 120 tokens (max_length) and 64 generated (options.max_new_tokens) "
            "pass the model's 128 positions") in out
    assert "tasks.sentiment" not in out  # scored by ranking its labels: nothing is generated
    job["tasks"]["summary"]["options"] = {"max_new_tokens": 8}
    code, out = run(capsys, "validate", write_job(job))
    assert code == 0, out


def test_model_options_the_model_or_machine_cannot_honour_are_named(capsys, data_dir, model_dir, write_job,
                                                                    monkeypatch, tmp_path):
    import shutil

    from transformers import BertModel

    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment",))
    job["model"]["attn_implementation"] = "flash_attention_2"
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2 and "flash_attention_2 runs on GPUs only (scaling.use_gpu: true)" in out

    job["scaling"] = {"num_workers": 2, "use_gpu": True}
    job["model"]["gradient_checkpointing"] = True
    monkeypatch.setattr(BertModel, "supports_gradient_checkpointing", False)
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2 and "model.gradient_checkpointing: BertModel does not support it" in out
    assert "flash_attention_2 needs the flash-attn package" in out  # not installed on this machine
    monkeypatch.undo()

    # init: random needs the config and tokenizer only; pretrained needs the weights
    config_only = tmp_path / "config-only"
    shutil.copytree(model_dir, config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    job = job_dict(data_dir, str(config_only), "heads", tasks=("sentiment",))
    code, out = run(capsys, "validate", write_job(job))
    assert code == 2 and "has no weights" in out
    job["model"].update(init="random", attn_implementation="eager", gradient_checkpointing=True)
    code, out = run(capsys, "validate", write_job(job))
    assert code == 0, out


def test_many_tasks_are_summarised_in_counts_not_a_line_each(capsys, data_dir, model_dir, write_job):
    """Past 20 tasks the console gets counts; a table row per task would be pages for a FLAN-sized mix."""
    job = job_dict(data_dir, str(model_dir), "heads", tasks=("sentiment",))
    first = job["tasks"]["sentiment"]
    job["tasks"] = {f"t{i:02d}": json.loads(json.dumps(first)) for i in range(24)}
    del job["tasks"]["t03"]["data"]["validation"]
    code, out = run(capsys, "validate", write_job(job))
    assert code == 0, out
    assert "24 tasks: 24 classification" in out
    assert "train rows per task: 40 to 40 (median 40; 960 in all)" in out
    assert "with a validation split: 23 (the others are not evaluated during training); with a test split: 24" in out
    assert not re.search(r"^t0[0-9] ", out, re.M), out
