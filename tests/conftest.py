"""Shared fixtures: a tiny tokenizer built from a word list, tiny data files for three task
types, and a job writer. Nothing here touches the network."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml

from tests.support.tiny import (BAD, CITIES, FILLER, GOOD, NAMES, build_tokenizer, qa_rows,  # noqa: F401
                                save_tiny_bert, save_tiny_causal, save_tiny_seq2seq, sentiment_rows, summary_rows,
                                words, write_jsonl)

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_var, "1")



@pytest.fixture(autouse=True, scope="session")
def data_cache_for_the_session(tmp_path_factory):
    """Prepared task data goes to a folder of this session (workers inherit it), not the user's cache."""
    if "MTL_DATA_CACHE" not in os.environ:
        os.environ["MTL_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)





@pytest.fixture
def data_dir(tmp_path) -> Path:
    """sentiment/, qa/, summary/ with train/validation/test jsonl files."""
    rng = random.Random(0)
    makers = {"sentiment": (sentiment_rows, 40), "qa": (qa_rows, 24), "summary": (summary_rows, 16)}
    for task, (make, n) in makers.items():
        for split, size in (("train", n), ("validation", max(4, n // 4)), ("test", max(4, n // 4))):
            write_jsonl(tmp_path / "data" / task / f"{split}.jsonl", make(size, rng))
    return tmp_path / "data"


def job_dict(data: Path, model: str = "/nonexistent-model", kind: str = "text2text",
             tasks=("sentiment", "qa", "summary")) -> dict:
    types = {"sentiment": "classification", "qa": "extractive_qa", "summary": "generation"}
    return {
        "name": "tiny",
        "model": {"name_or_path": model, "kind": kind, "max_length": 64},
        "tasks": {t: {"type": types[t], "data": {s: str(data / t / f"{s}.jsonl") for s in
                                                 ("train", "validation", "test")}} for t in tasks},
        "train": {"steps": 4, "micro_batch_size": 4, "micro_batches_per_step": 3},
        "deepspeed": str(REPO / "ds_configs" / "zero2.json"),
        "scaling": {"num_workers": 2},
    }


@pytest.fixture
def write_job(tmp_path):
    def write(job: dict, name: str = "job.yaml") -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(job, sort_keys=False))
        return str(path)
    return write


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random BERT (config + weights + tokenizer) built from a config, never downloaded."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), tokenizer_dir)


@pytest.fixture(scope="session")
def seq2seq_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random BERT-to-BERT encoder-decoder (the shape of the demo's model)."""
    return save_tiny_seq2seq(tmp_path_factory.mktemp("tiny-seq2seq"), tokenizer_dir)


@pytest.fixture(scope="session")
def causal_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random GPT-2 sharing the test tokenizer ([SEP] doubles as end of text)."""
    return save_tiny_causal(tmp_path_factory.mktemp("tiny-causal"), tokenizer_dir)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto) on a free loopback port, with a bucket `mtl-test`."""
    from tests.support.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        server.create_bucket("mtl-test")
        yield server
    finally:
        server.stop()
