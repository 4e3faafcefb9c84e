"""What the benchmarks share: a model and data built here (nothing from the hub), the reference
model that computes what `mtl`'s classification head does, and timing helpers.

The model has MiniLM-L6's geometry (6 layers, hidden 384, 12 heads, FFN 1536) over a small
WordPiece vocabulary, so its step cost is a small encoder's; rows are exactly `length` tokens,
so every approach pads nothing and the tokens are the same.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

HIDDEN, LAYERS, HEADS, FFN = 384, 6, 12, 1536


BASE = {"hidden": 768, "layers": 12, "heads": 12, "ffn": 3072}  # BERT-base's geometry: ~85M parameters here


def build_model(folder: Path, hidden: int = HIDDEN, layers: int = LAYERS, heads: int = HEADS, ffn: int = FFN) -> int:
    """A random BERT (MiniLM-L6-shaped unless told) and its tokenizer in `folder`; returns its parameter count."""
    from transformers import BertConfig, BertModel

    from conftest import build_tokenizer

    tok = build_tokenizer(folder)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    model = BertModel(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_rows(path: Path, rows: int, length: int, seed: int = 0) -> Path:
    """Classification rows of exactly `length` tokens with [CLS] and [SEP] (one word = one token)."""
    from conftest import words

    rng = random.Random(seed)
    vocab = [w for w in words() if w.isalpha()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for _ in range(rows):
            text = " ".join(rng.choice(vocab) for _ in range(length - 2))
            fh.write(json.dumps({"text": text, "label": rng.choice(["negative", "positive"])}) + "\n")
    return path


class ReferenceClassifier:
    """BertModel + dropout + linear on [CLS] + cross-entropy: the computation of `mtl`'s heads model."""

    def __new__(cls, model_dir: str, num_labels: int = 2):
        import torch
        from torch import nn
        from transformers import BertModel

        class Classifier(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = BertModel.from_pretrained(model_dir, add_pooling_layer=False)
                self.dropout = nn.Dropout(0.1)
                self.out = nn.Linear(self.backbone.config.hidden_size, num_labels)

            def forward(self, input_ids, attention_mask, labels):
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                logits = self.out(self.dropout(hidden[:, 0]))
                return torch.nn.functional.cross_entropy(logits.float(), labels)

        return Classifier()


def encoded_rows(model_dir: str, data: Path, length: int):
    """(input_ids, attention_mask, labels) tensors of every row."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    enc = tok([r["text"] for r in rows], truncation=True, max_length=length, padding="max_length",
              return_tensors="pt")
    labels = torch.tensor([0 if r["label"] == "negative" else 1 for r in rows])
    return enc["input_ids"], enc["attention_mask"], labels


def reference_args(description: str):
    """The arguments every reference loop takes (the model, rows and how many steps of what)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    return parser


def step_times(tb_dir: Path) -> dict[int, float]:
    """step -> the step time a `mtl train` run logged to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        out.update({e.step: e.value for e in acc.Scalars("step_time")})
    return out


def median_after_warmup(times: list[float], warmup: int = 2) -> float:
    return statistics.median(times[warmup:] if len(times) > warmup else times)


def marked(path: Path, begin: str, end: str) -> str:
    """The text between a page's `begin` and `end` markers."""
    return path.read_text().split(begin, 1)[1].split(end, 1)[0]


def put_marked(path: Path, begin: str, end: str, text: str, heading: str | None = None) -> None:
    """Put `text` between the page's markers; a page without them gets them at its end, under
    `heading`, where one is given."""
    page = path.read_text() if path.exists() else ""
    if begin not in page and heading is not None:
        page += f"\n{heading}\n\n{begin}\n{end}\n"
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}{end}{tail}")


def timed_output(cmd: list[str], env: dict, timeout: float = 1800) -> list[tuple[float, str]]:
    """Run `cmd` in the repository: (seconds since its start, line) for each line it printed, stdout
    and stderr together; a failure raises with its last lines."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.monotonic() - started, line) for line in proc.stdout]
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{''.join(line for _, line in lines[-40:])}")
    return lines
