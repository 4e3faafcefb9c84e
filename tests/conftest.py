"""Shared fixtures: a tiny tokenizer built from a word list, tiny data files for three task
types, and a job writer. Nothing here touches the network."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_var, "1")



@pytest.fixture(autouse=True, scope="session")
def data_cache_for_the_session(tmp_path_factory):
    """Prepared task data goes to a folder of this session (workers inherit it), not the user's cache."""
    if "MTL_DATA_CACHE" not in os.environ:
        os.environ["MTL_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield


REPO = Path(__file__).resolve().parent.parent
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito"]
GOOD = ["great", "wonderful", "moving", "funny", "brilliant", "charming"]
BAD = ["awful", "boring", "dull", "clumsy", "tedious", "bland"]
FILLER = ["the", "film", "movie", "was", "and", "very", "quite", "plot", "story", "acting", "a", "an",
          "lives", "in", "where", "does", "live", "who", "?", ".", ",", "summary", "of", "day", "it",
          "rained", "sun", "shone", "people", "walked", "home", "news", "today", "report", "said"]


def words() -> list[str]:
    return sorted(set(NAMES + CITIES + GOOD + BAD + FILLER + ["positive", "negative"]))


def build_tokenizer(folder: Path):
    """A BERT WordPiece tokenizer over our word list (fast, with offsets), saved to `folder`."""
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789:;-")
    vocab = special + words() + [c for c in chars if c not in words()] + ["##" + c for c in chars]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))})
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def sentiment_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        adjectives = [rng.choice(GOOD if label == "positive" else BAD) for _ in range(rng.randint(1, 4))]
        filler = [rng.choice(FILLER[:12]) for _ in range(rng.randint(1, 12))]
        rows.append({"text": " ".join(["the", "film", "was", *adjectives, *filler]), "label": label})
    return rows


def qa_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        people = rng.sample(NAMES, k=rng.randint(2, 6))
        facts = [f"{p} lives in {rng.choice(CITIES)} ." for p in people]
        filler = " ".join(rng.choice(FILLER[:12]) for _ in range(rng.randint(0, 20)))
        context = " ".join(facts) + (" " + filler if filler else "")
        who = rng.choice(people)
        city = next(f.split()[-2] for f in facts if f.startswith(who + " "))
        start = context.index(f"{who} lives in {city}") + len(f"{who} lives in ")
        rows.append({"question": f"where does {who} live ?", "context": context,
                     "answers": {"text": [city], "answer_start": [start]}})
    return rows


def summary_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(FILLER[12:]) for _ in range(rng.randint(3, 8))) + " ." for _ in range(3)]
        rows.append({"source": " ".join(sentences), "target": sentences[0]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


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
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _tiny_bert_config(tok, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **extra)


@pytest.fixture(scope="session")
def seq2seq_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random BERT-to-BERT encoder-decoder (the shape of the demo's model)."""
    import torch
    from transformers import AutoTokenizer, EncoderDecoderConfig, EncoderDecoderModel

    folder = tmp_path_factory.mktemp("tiny-seq2seq")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        _tiny_bert_config(tok), _tiny_bert_config(tok, is_decoder=True, add_cross_attention=True))
    model = EncoderDecoderModel(config)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def causal_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random GPT-2 sharing the test tokenizer ([SEP] doubles as end of text)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-causal")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


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
