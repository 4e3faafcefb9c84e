"""How long training waits for a version, over its full write time, on local and S3 storage.

    .venv/bin/python benchmarks/checkpoint_stall.py [--hidden 512 --layers 6 --steps 20 --every 5]

Trains a random BERT-style model (built from a config; nothing from the hub) with `mtl train`
(2 Ray Train workers, ZeRO-2, one classification task) twice: storage in a local folder, then in
a bucket on a real S3-compatible server (moto, `make s3-server`) on loopback. Every version line
says `training waited W of T` (W: the local write, plus any wait for the previous upload; T: W
plus the background upload). The stall is sum(W) / sum(T) over the periodic versions; the final
version is left out (the run's end waits for its upload by design) and shown apart.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SAVED = re.compile(r"saved version step-(\d+) \(training waited ([\d.]+)s of ([\d.]+)s\)")


def build_model(folder: Path, hidden: int, layers: int) -> int:
    from transformers import BertConfig, BertModel

    from conftest import build_tokenizer

    tok = build_tokenizer(folder)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                        max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    model = BertModel(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_data(folder: Path) -> dict:
    from conftest import sentiment_rows, write_jsonl

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    return {"train": write_jsonl(folder / "train.jsonl", sentiment_rows(400, rng)),
            "validation": write_jsonl(folder / "validation.jsonl", sentiment_rows(16, rng))}


def run(job: dict, workdir: Path, env: dict) -> list[tuple[int, float, float]]:
    import yaml

    path = workdir / f"{job['name']}.yaml"
    path.write_text(yaml.safe_dump(job))
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"mtl train failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return [(int(s), float(w), float(t)) for s, w, t in SAVED.findall(out.stdout + out.stderr)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()

    from support.s3_server import ENV, S3Server

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    with tempfile.TemporaryDirectory(prefix="mtl-bench-") as tmp:
        work = Path(tmp)
        params = build_model(work / "model", args.hidden, args.layers)
        data = write_data(work / "data")
        job = {"model": {"name_or_path": str(work / "model"), "kind": "heads", "max_length": 64},
               "tasks": {"sentiment": {"type": "classification", "data": data}},
               "train": {"steps": args.steps, "checkpoint_every": args.every, "eval_every": 0,
                         "micro_batch_size": 8, "micro_batches_per_step": 1, "precision": "fp32"},
               "deepspeed": str(REPO / "ds_configs" / "zero2.json"),
               "scaling": {"num_workers": 2, "cpus_per_worker": 1}}
        server = S3Server(work / "moto.log")
        try:
            server.create_bucket("bench")
            results = {
                "local": run({**job, "name": "stall-local", "storage": {"path": str(work / "runs")}}, work, env),
                "s3": run({**job, "name": "stall-s3", "storage": {
                    "path": "s3://bench/runs", "endpoint_url": server.endpoint, "region": "us-east-1"}},
                    work, {**env, **ENV}),
            }
        finally:
            server.stop()
    version_mb = params * 4 * 3 / 1e6  # fp32 weights + two Adam moments
    print(f"model: {params / 1e6:.1f}M parameters, about {version_mb:.0f} MB per version; "
          f"{args.steps} steps, a version every {args.every}; 2 workers, ZeRO-2, fp32")
    print(f"{'storage':<8}{'versions':>9}{'waited s':>10}{'written s':>11}{'stall':>8}{'final: waited/written':>24}")
    for name, saved in results.items():
        periodic = [v for v in saved if v[0] != args.steps]
        final = [v for v in saved if v[0] == args.steps]
        waited, written = sum(v[1] for v in periodic), sum(v[2] for v in periodic)
        end = f"{final[0][1]:.2f}/{final[0][2]:.2f}" if final else "-"
        print(f"{name:<8}{len(periodic):>9}{waited:>10.2f}{written:>11.2f}{waited / written:>8.2f}{end:>24}")


if __name__ == "__main__":
    main()
