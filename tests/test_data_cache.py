"""Prepared task data is kept per node and reused only while everything it is made from is unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, job_dict, sentiment_rows, write_jsonl
from launcher.jobfile import parse_job, resolve
from trainer.task_data import prepare_tasks


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MTL_DATA_CACHE", str(folder))
    return folder


def spec_of(job: dict):
    return resolve(parse_job(job))


def prepared(job: dict, tokenizer, splits=("train", "validation")):
    return prepare_tasks(spec_of(job), tokenizer, "heads", splits=splits)


def contents(data) -> dict:
    return {"labels": data.labels, "rows": data.checked.splits,
            "bad": {s: dict(b.reasons) for s, b in data.checked.bad.items()},
            "encoded": {s: (e.rows, e.truncated, e.features.to_dict()) for s, e in data.encoded.items()}}


def test_a_second_preparation_reads_the_cache_and_equals_the_first(data_dir, tokenizer, cache):
    job = job_dict(data_dir, tasks=("sentiment", "qa"))
    job["tasks"]["qa"]["options"] = {"doc_stride": 16}
    first = prepared(job, tokenizer)
    assert {t: d.cache.status for t, d in first.items()} == {"sentiment": "built", "qa": "built"}
    second = prepared(job, tokenizer)
    assert {t: d.cache.status for t, d in second.items()} == {"sentiment": "hit", "qa": "hit"}
    for task in first:
        assert contents(second[task]) == contents(first[task])
    # Settings that do not reach the rows (how often a task is drawn, its metrics) keep the entry.
    job["tasks"]["sentiment"].update(weight=3.0, metrics=["macro_f1"])
    assert prepared(job, tokenizer)["sentiment"].cache.status == "hit"
    entries = sorted(p.name.split("-")[0] for p in cache.iterdir() if p.is_dir())
    assert entries == ["qa", "sentiment"]


@pytest.mark.parametrize("change", ["file content", "prompt", "max_length", "splits", "tokenizer"])
def test_anything_the_rows_are_made_from_makes_a_new_entry(data_dir, tokenizer, tmp_path, cache, change):
    job = job_dict(data_dir, tasks=("sentiment",))
    before = prepared(job, tokenizer)["sentiment"]
    splits = ("train", "validation")
    if change == "file content":  # same size, same second: only the content tells
        path = data_dir / "sentiment" / "train.jsonl"
        text = path.read_text()
        stat = os.stat(path)
        first = "positive" if text.index('"positive"') < text.index('"negative"') else "negative"
        path.write_text(text.replace(first, {"positive": "negative", "negative": "positive"}[first], 1))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif change == "prompt":
        job["tasks"]["sentiment"]["prompt"] = "Text: {text}"
    elif change == "max_length":
        job["model"]["max_length"] = 16
    elif change == "splits":
        splits = ("train", "test")
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path, model_max_length=7)
    after = prepared(job, tokenizer, splits)["sentiment"]
    assert after.cache.status == "built" and after.cache.entry != before.cache.entry
    if change == "file content":
        assert after.checked.splits["train"] != before.checked.splits["train"]


def test_off_prepares_every_time_and_writes_nothing(data_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    job = job_dict(data_dir, tasks=("sentiment",))
    assert prepared(job, tokenizer)["sentiment"].cache.status == "off"
    assert prepared(job, tokenizer)["sentiment"].cache.status == "off"
    assert not (tmp_path / "xdg").exists()


def test_a_data_error_is_raised_every_time_and_nothing_is_cached(data_dir, tokenizer, cache):
    write_jsonl(data_dir / "sentiment" / "train.jsonl", [{"text": "great", "label": "positive"}, {"text": "dull", "label": "negative"}, {"text": "x"}])
    job = job_dict(data_dir, tasks=("sentiment",))
    job["tasks"]["sentiment"]["bad_rows"] = "error"
    for _ in range(2):
        with pytest.raises(Exception, match="row 3"):
            prepared(job, tokenizer)
    assert not [p for p in cache.iterdir() if p.is_dir()]


def test_ranks_starting_together_prepare_once(data_dir, tokenizer_dir, tmp_path, cache):
    """Two processes on one node ask for the same task at once: one prepares it, the other waits and reads it."""
    import random

    write_jsonl(data_dir / "sentiment" / "train.jsonl", sentiment_rows(3000, random.Random(1)))
    job = job_dict(data_dir, tasks=("sentiment",))
    (tmp_path / "job.json").write_text(json.dumps(job))
    script = textwrap.dedent(f"""
        import json, sys
        from transformers import AutoTokenizer
        from launcher.jobfile import parse_job, resolve
        from trainer.task_data import prepare_tasks
        spec = resolve(parse_job(json.load(open({str(tmp_path / 'job.json')!r}))))
        tok = AutoTokenizer.from_pretrained({str(tokenizer_dir)!r})
        data = prepare_tasks(spec, tok, "heads", splits=("train",))["sentiment"]
        print(data.cache.status, len(data.encoded["train"].features))
    """)
    env = {**os.environ, "MTL_DATA_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[0] for o in outs) == ["built", "hit"]
    assert outs[0][1] == outs[1][1] == "3000"


def test_a_broken_entry_is_prepared_anew_and_an_unusable_folder_only_costs_the_reuse(data_dir, tokenizer, tmp_path,
                                                                                      cache, monkeypatch):
    job = job_dict(data_dir, tasks=("sentiment",))
    first = prepared(job, tokenizer)["sentiment"]
    (cache / first.cache.entry.split("/")[-1] / "checked.pkl").write_bytes(b"cut short")
    again = prepared(job, tokenizer)["sentiment"]
    assert again.cache.status == "built" and contents(again) == contents(first)
    assert prepared(job, tokenizer)["sentiment"].cache.status == "hit"

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MTL_DATA_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be a folder
    fallback = prepared(job, tokenizer)["sentiment"]
    assert fallback.cache.status == "off" and contents(fallback) == contents(first)
