"""Seconds to read, check and encode one task's rows in a fresh process, with the node's data
cache (trainer.data.data_cache) in `--cache`: the first run prepares and stores, a second one reads.

    benchmarks/data_prep.py --model DIR --data FILE --cache DIR [--processes N]
    # prints: prepared <status> <seconds> <rows>
"""

from __future__ import annotations

import argparse
import os
import time

import common  # noqa: F401  (puts the repository on the path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder with a tokenizer")
    parser.add_argument("--data", required=True, help="a classification jsonl file (text, label)")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--processes", type=int, default=None, help="encoding processes (default: all cores)")
    args = parser.parse_args()
    os.environ["MTL_DATA_CACHE"] = args.cache
    started = time.perf_counter()
    from transformers import AutoTokenizer

    from launcher.jobfile import parse_job, resolve
    from trainer.data import prepare_tasks

    spec = resolve(parse_job({"name": "prep", "model": {"name_or_path": args.model, "kind": "heads", "max_length": 128},
                              "tasks": {"cls": {"type": "classification", "data": {"train": args.data}}}}))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ready = time.perf_counter()
    data = prepare_tasks(spec, tokenizer, "heads", splits=("train",), processes=args.processes)["cls"]
    done = time.perf_counter()
    print(f"prepared {data.cache.status} {done - ready:.3f} {len(data.encoded['train'].features)} "
          f"(imports and tokenizer {ready - started:.1f}s)")


if __name__ == "__main__":
    main()
