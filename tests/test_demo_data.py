"""The demo data converters, on small inputs in the real packages' formats."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))  # the demo's data preparation is a script, not part of the package
from demo_data import aclsum_rows, quoref_rows, sentiment_rows, split_rows
from trainer.tasks.extractive_qa import normalize_answers


def test_sentiment_scores_become_labels_and_neutral_is_left_out():
    tsv = "1\t2.5\tA moving film .\n2\t-1.2\tDull .\n3\t0.0\tFine .\nbroken line\n"
    assert sentiment_rows(tsv) == [{"text": "A moving film .", "label": "positive"},
                                   {"text": "Dull .", "label": "negative"}]


def test_quoref_examples_become_squad_rows_found_in_context():
    task = {"examples": [
        {"input": "Passage: Ann met Bo in Rome. Bo left.\nQuestion: Who left?", "target": ["Bo."]},
        {"input": "Passage: Ann sang.\nQuestion: Who danced?", "target": ["Carl."]},  # not in passage
        {"input": "no question here", "target": ["x"]},
    ]}
    rows = quoref_rows(task)
    assert rows == [{"question": "Who left?", "context": "Ann met Bo in Rome. Bo left.",
                     "answers": {"text": ["Bo"], "answer_start": [8]}}]
    assert normalize_answers(rows[0]["answers"], rows[0]["context"])[1] is None


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
