"""Prepared task data is kept per node and reused only while everything it is made from is unchanged."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, job_dict, sentiment_rows, write_jsonl
from launcher.jobfile import parse_job, resolve
from trainer.data.check_encode import BadRows, CheckedTask
from trainer.data.data_cache import DataCache
from trainer.data.task_data import TaskData, _load_task, _store_task, prepare_tasks


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


def test_tasks_prepared_on_several_threads_equal_those_prepared_one_by_one(data_dir, tokenizer, monkeypatch):
    """Each thread encodes through its own copy of the tokenizer (one fast tokenizer shared by two
    threads fails with 'Already borrowed'); the result, and its order, are the job's whatever the
    order the tasks were begun in."""
    import trainer.data.task_data as task_data

    monkeypatch.setenv("MTL_DATA_CACHE", "off")
    job = job_dict(data_dir, tasks=("sentiment", "qa", "summary"))
    job["tasks"]["qa"]["options"] = {"doc_stride": 16}
    spec = spec_of(job)
    monkeypatch.setattr(task_data, "PREPARE_THREADS", 1)
    alone = prepare_tasks(spec, tokenizer, "causal")
    monkeypatch.setattr(task_data, "PREPARE_THREADS", 3)
    for start in (0, 1, 5):
        together = prepare_tasks(spec, tokenizer, "causal", start=start)
        assert list(together) == ["sentiment", "qa", "summary"]
        for task in alone:
            assert contents(together[task]) == contents(alone[task]), (task, start)


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
        from trainer.data.task_data import prepare_tasks
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
    (cache / first.cache.entry.split("/")[-1] / "checked.json").write_bytes(b'{"cut short')
    again = prepared(job, tokenizer)["sentiment"]
    assert again.cache.status == "built" and contents(again) == contents(first)
    assert prepared(job, tokenizer)["sentiment"].cache.status == "hit"

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MTL_DATA_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be a folder
    fallback = prepared(job, tokenizer)["sentiment"]
    assert fallback.cache.status == "off" and contents(fallback) == contents(first)


class RunsOnLoad:
    """A pickle that touches `marker` when it is loaded: what anyone who can write to a shared cache folder
    could drop into an entry to run code in every job that reads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_dropped_in_an_entry_is_never_run(data_dir, tokenizer, tmp_path, cache):
    job = job_dict(data_dir, tasks=("sentiment",))
    first = prepared(job, tokenizer)["sentiment"]
    entry = Path(first.cache.entry)
    marker = tmp_path / "ran"
    (entry / "checked.json").unlink(missing_ok=True)
    (entry / "checked.pkl").write_bytes(pickle.dumps(RunsOnLoad(marker)))
    assert (entry / "meta.json").exists()  # it looks like a complete entry
    again = prepared(job, tokenizer)["sentiment"]
    assert not marker.exists()
    assert again.cache.status == "built" and contents(again) == contents(first)


def test_an_entry_is_plain_json_that_loads_back_exactly(data_dir, tokenizer, cache):
    """A hit is the data the build made, types included: the label set stays a tuple, the skipped-row
    counts stay a Counter (reports call most_common on it)."""
    for split, extra in (("train", [{"text": " ", "label": "positive"}, {"text": "dull"}]),
                         ("validation", [{"text": "great", "label": "neutral"}])):
        path = data_dir / "sentiment" / f"{split}.jsonl"
        path.write_text(path.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    job = job_dict(data_dir, tasks=("sentiment", "qa"))
    job["model"]["max_length"] = 16  # some rows are cut: the truncated counts are stored too
    first = prepared(job, tokenizer)
    second = prepared(job, tokenizer)
    for task, built in first.items():
        hit = second[task]
        assert (built.cache.status, hit.cache.status) == ("built", "hit")
        entry = Path(hit.cache.entry)
        assert not list(entry.glob("*.pkl"))
        assert json.loads((entry / "checked.json").read_text())
        assert isinstance(hit.labels, tuple) and isinstance(hit.checked.labels, tuple)
        assert (hit.name, hit.type, hit.labels) == (built.name, built.type, built.labels)
        assert (hit.checked.name, hit.checked.type, hit.checked.labels) == (
            built.checked.name, built.checked.type, built.checked.labels)
        assert hit.checked.splits == built.checked.splits
        assert hit.checked.bad.keys() == built.checked.bad.keys()
        for split, bad in built.checked.bad.items():
            again = hit.checked.bad[split]
            assert isinstance(again, BadRows) and isinstance(again.reasons, Counter)
            assert (again.origin, again.total, again.rows) == (bad.origin, bad.total, bad.rows)
            assert again.reasons == bad.reasons and list(again.reasons) == list(bad.reasons)
            assert again.summary() == bad.summary()
        assert {s: (e.rows, e.truncated) for s, e in hit.encoded.items()} == {
            s: (e.rows, e.truncated) for s, e in built.encoded.items()}
        assert contents(hit) == contents(built)
    sentiment = second["sentiment"].checked.bad
    assert sentiment["train"].count == 2 and sentiment["validation"].count == 1
    assert any(e.truncated for d in second.values() for e in d.encoded.values())


def test_data_json_cannot_hold_only_costs_the_reuse(tmp_path):
    rows = {"train": [{"text": b"raw bytes", "label": "a", "__row__": 1}]}  # a binary column mapped to a field
    checked = CheckedTask("t", "classification", ("a", "b"), rows, {})
    data = TaskData("t", "classification", ("a", "b"), checked)
    got, use = DataCache(tmp_path / "cache").get_or_build("t", "key", lambda: data, store=_store_task, load=_load_task)
    assert got is data and use.status == "off"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # no entry, and no half-written one


def test_the_cache_key_covers_the_data_code_and_every_task_type_file():
    """Wherever the data package and the task types live, a change to the code that makes rows or
    features makes a new entry: the key reads each of these files."""
    from trainer.data.task_data import code_files
    from trainer.tasks import registry

    files = {str(Path(f).relative_to(REPO)) for f in code_files(registry.get("extractive_qa"))}
    expected = {f"trainer/data/{m}.py" for m in ("read_data", "check_encode", "task_data", "data_cache")}
    expected |= {f"trainer/tasks/{m}.py" for m in ("registry", "text2text", "heads", "extractive_qa", "classification")}
    assert expected <= files


def test_a_large_split_is_encoded_on_several_processes_into_the_same_features(tokenizer, monkeypatch):
    """Past PARALLEL_MIN_ROWS rows a split is encoded by forked processes, chunk by chunk; the
    features, their order and the truncation count are those of one process."""
    import dataclasses
    import os
    import random

    import trainer.data.check_encode as check_encode
    from trainer.data.check_encode import encode_split
    from trainer.tasks import registry
    from trainer.tasks.registry import TaskContext

    classification = registry.get("classification")

    def encode_and_say_where(rows, ctx):
        feats, cut = classification.encode(rows, ctx)
        return {**feats, "pid": [os.getpid()] * len(feats["input_ids"])}, cut

    task_type = dataclasses.replace(classification, encode=encode_and_say_where)
    rows = [{**r, "__row__": i + 1} for i, r in enumerate(sentiment_rows(300, random.Random(0)))]
    ctx = TaskContext("s", tokenizer, "heads", 12, classification.default_prompt, ("negative", "positive"),
                      classification.options_model.model_validate({}))
    alone = encode_split(rows, task_type, ctx, chunk=16, processes=1)
    monkeypatch.setattr(check_encode, "PARALLEL_MIN_ROWS", 100)
    together = encode_split(rows, task_type, ctx, chunk=16, processes=2)
    assert set(alone.features["pid"]) == {os.getpid()}
    assert len(set(together.features["pid"])) == 2 and os.getpid() not in together.features["pid"]
    assert together.truncated == alone.truncated > 0 and together.rows == alone.rows == 300
    assert together.features.remove_columns("pid").to_dict() == alone.features.remove_columns("pid").to_dict()


def test_files_read_directly_hold_what_datasets_builder_reads(tmp_path, monkeypatch):
    """JSON Lines and Parquet files are read by pyarrow itself (the builder's set-up cost 25 ms a
    file); the rows are the builder's, and what pyarrow cannot read (a JSON array document) still
    goes through the builder."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    import trainer.data.read_data as read_data
    from conftest import qa_rows

    rows = qa_rows(20, random.Random(0))
    rows[3]["note"], rows[5]["note"] = "naïve café ✓", None
    jsonl = write_jsonl(tmp_path / "qa.jsonl", rows)
    parquet = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    array = tmp_path / "qa.json"
    array.write_text(json.dumps(rows))
    direct = {p: read_data.read_file(str(p), None, "f").to_list() for p in (jsonl, parquet, array)}
    assert read_data.read_directly([str(array)], "json") is None
    monkeypatch.setattr(read_data, "read_directly", lambda files, builder: None)
    for path, got in direct.items():
        assert got == read_data.read_file(str(path), None, "f").to_list(), path
    assert direct[jsonl][3]["note"] == "naïve café ✓" and direct[jsonl][0]["__row__"] == 1


def test_encoded_columns_become_the_dataset_from_dict_makes_without_hashing_them():
    import datasets

    from trainer.data.check_encode import dataset_from_columns

    columns = {"input_ids": [[101, 7, 8, 102], [101, 9, 102]], "attention_mask": [[1, 1, 1, 1], [1, 1, 1]],
               "labels": [1, 0], "example_id": [1, 2], "length": [4, 3],
               "offsets": [[[0, 0], [0, 3]], [[0, 0], [4, 9]]], "text": ["a b", "c"]}
    ours, theirs = dataset_from_columns(columns), datasets.Dataset.from_dict(columns)
    assert ours.features == theirs.features and ours.data.schema == theirs.data.schema
    assert ours.to_dict() == theirs.to_dict()
    assert ours._fingerprint != dataset_from_columns(columns)._fingerprint  # its own, not a hash of the values


def test_the_token_sample_ranks_compare_covers_every_sampled_row():
    """data_signature's sample of token ids (what ranks on different nodes must agree on) reads all
    32 rows it picks: hashed as a datasets Column, only the first few were compared."""
    import datasets

    from trainer.data.task_data import token_sample

    rows = [[2, i % 50 + 5, 3] for i in range(300)]
    features = datasets.Dataset.from_dict({"input_ids": rows, "length": [3] * 300})
    late = [list(r) for r in rows]
    late[20 * 300 // 32][1] = 99  # the 21st sampled row
    assert token_sample(datasets.Dataset.from_dict({"input_ids": late})) != token_sample(features)
    unsampled = [list(r) for r in rows]
    unsampled[1][1] = 99
    assert token_sample(datasets.Dataset.from_dict({"input_ids": unsampled})) == token_sample(features)
    # rows picked out of a larger table (an indices mapping) are sampled as a table of those rows
    picked = datasets.Dataset.from_dict({"input_ids": rows + rows}).select(range(300, 600))
    assert token_sample(picked) == token_sample(features)


def test_a_task_stream_reads_its_lengths_through_any_row_selection():
    import datasets

    from trainer.data import TaskStream, column_array

    features = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in range(1, 41)],
                                           "length": list(range(1, 41))}).select(range(39, -1, -2))
    assert column_array(features, "length").tolist() == list(range(40, 0, -2))
    stream = TaskStream("t", features, rank=0, world=1, seed=0, pad_id=0, micro_batch_size=4)
    assert stream.lengths.tolist() == list(range(40, 0, -2))


def test_a_file_several_tasks_name_is_read_once(data_dir, tokenizer, monkeypatch, cache):
    """Collections put many prompts over one dataset: preparing (and validating) such a job reads
    each shared file once, and every task gets its own rows from it."""
    import trainer.data.read_data as read_data
    from launcher.validate import validate_job

    reads = Counter()
    real = read_data._read_file
    monkeypatch.setattr(read_data, "_read_file", lambda path, fmt, field: reads.update([path]) or real(path, fmt, field))
    job = job_dict(data_dir, tasks=("sentiment",))
    shared = job["tasks"]["sentiment"]["data"]
    job["tasks"]["asked"] = {"type": "classification", "data": dict(shared),
                             "prompt": "Is this positive or negative? {text}"}
    alone = prepare_tasks(spec_of(job_dict(data_dir, tasks=("sentiment",))), tokenizer, "heads", splits=("train",))
    reads.clear()
    both = prepare_tasks(spec_of(job), tokenizer, "heads", splits=("train",))
    assert set(reads.values()) == {1} and len(reads) == 3, reads  # train, validation, test: once each
    assert both["sentiment"].checked.splits == alone["sentiment"].checked.splits == both["asked"].checked.splits
    assert read_data._shared is None  # nothing kept after the job's tasks are had

    reads.clear()
    report = validate_job(spec_of(job), check_files=True)
    assert set(reads.values()) == {1} and len(reads) == 3, reads
    assert set(report.tasks) == {"sentiment", "asked"}


def test_a_shared_file_that_cannot_be_read_is_named_by_each_task(data_dir, tmp_path):
    from launcher.validate import validate_job

    job = job_dict(data_dir, tasks=("sentiment",))
    job["tasks"]["sentiment"]["data"]["train"] = str(tmp_path / "gone.jsonl")
    job["tasks"]["asked"] = {"type": "classification", "data": dict(job["tasks"]["sentiment"]["data"])}
    errors = validate_job(spec_of(job), check_files=True).errors
    assert any("tasks.sentiment.data.train" in e and "gone.jsonl" in e for e in errors), errors
    assert any("tasks.asked.data.train" in e and "gone.jsonl" in e for e in errors), errors


def test_a_file_rewritten_between_two_reads_is_not_taken_for_the_first(tmp_path):
    from trainer.data.read_data import read_key

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n')
    first = read_key(str(path), None)
    path.write_text('{"text": "a longer row", "label": "x"}\n')
    assert read_key(str(path), None) != first
    assert read_key(str(tmp_path / "." / "rows.jsonl"), None) == read_key(str(path), None)
