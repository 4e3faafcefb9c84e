"""Tiny, real assets built from configs and word lists, never downloaded: a WordPiece tokenizer,
data for three task types and small random models. The tests' fixtures and scripts/gpu_check.py
build from these."""

from __future__ import annotations

import json
import random
from pathlib import Path

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


def tiny_bert_config(tok, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **extra)


def save_tiny_bert(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny random BERT (config + weights + tokenizer) in `folder`."""
    import torch
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    BertModel(tiny_bert_config(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_seq2seq(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny random BERT-to-BERT encoder-decoder (the shape of the demo's model) in `folder`."""
    import torch
    from transformers import AutoTokenizer, EncoderDecoderConfig, EncoderDecoderModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        tiny_bert_config(tok), tiny_bert_config(tok, is_decoder=True, add_cross_attention=True))
    model = EncoderDecoderModel(config)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_causal(folder: Path, tokenizer_dir: Path, *, n_embd: int = 32, n_layer: int = 2, n_head: int = 2,
                     n_positions: int = 128) -> Path:
    """A random GPT-2 sharing the test tokenizer ([SEP] doubles as end of text), tiny unless sized."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
                        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
