"""The GPU check in one go: the worker loop on this machine's GPUs under torchrun (no Ray needed),
then one table.

    scripts/gpu_check.sh            # on a GPU machine: NCCL, bf16, ZeRO-2 and ZeRO-3, ~5 minutes
    scripts/gpu_check.sh --dry      # anywhere: the same checks on the CPU (gloo, fp32, tiny models)

Each row is a real run of `python -m launcher.torchrun` on tiny random models built here from
configs (nothing is downloaded): ZeRO-2 with classification and QA heads; the same name resumed;
the version scored on its test split as `mtl eval` does; ZeRO-3 with one LM and instructions,
generation included; and a throughput measurement of a ~125M-parameter GPT-2 under ZeRO-2 whose
model FLOP utilisation is 6 × parameters × tokens/s over the GPUs' dense bf16 peak. `--dry` checks
the check's own wiring on a machine without a GPU (it is run by the tests). The exit status is 0
only when every row passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.tiny import (FILLER, build_tokenizer, qa_rows, save_tiny_bert, save_tiny_causal,  # noqa: E402
                                save_tiny_seq2seq, sentiment_rows, summary_rows, write_jsonl)

# Dense bf16 peaks (TFLOP/s) by device name, for the MFU column; another GPU shows TFLOP/s alone.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
STEP_LINE = re.compile(r"\[mtl\] step (\d+)/\d+ \|.*\| ([\d.]+)s \| (\d+) tok/s")


@dataclass
class Row:
    check: str
    ok: bool
    seconds: float
    detail: str


def build_assets(root: Path, *, mfu_size: dict) -> dict[str, Path]:
    """Tokenizer, data for three task types (plus long rows for throughput) and three models."""
    rng = random.Random(0)
    tok = root / "tokenizer"
    build_tokenizer(tok)
    for task, make, n in (("sentiment", sentiment_rows, 64), ("qa", qa_rows, 48), ("summary", summary_rows, 32)):
        for split, size in (("train", n), ("validation", 16), ("test", 16)):
            write_jsonl(root / "data" / task / f"{split}.jsonl", make(size, rng))
    long_rows = [{"source": " ".join(rng.choice(FILLER) for _ in range(900)), "target": "the news today ."}
                 for _ in range(256)]
    for split in ("train", "validation"):
        write_jsonl(root / "data" / "long" / f"{split}.jsonl", long_rows if split == "train" else long_rows[:8])
    return {"bert": save_tiny_bert(root / "bert", tok), "seq2seq": save_tiny_seq2seq(root / "seq2seq", tok),
            "causal": save_tiny_causal(root / "causal", tok, **mfu_size)}


def job(root: Path, name: str, model: Path, kind: str, tasks: dict, *, gpus: int, dry: bool, **train) -> Path:
    data = root / "data"
    types = {"sentiment": "classification", "qa": "extractive_qa", "summary": "generation", "long": "generation"}
    spec = {
        "name": name,
        "model": {"name_or_path": str(model), "kind": kind, "max_length": 64},
        "tasks": {t: {"type": types[t], "data": {s: str(data / t / f"{s}.jsonl")
                                                 for s in ("train", "validation", "test") if (data / t / f"{s}.jsonl").exists()},
                      **extra} for t, extra in tasks.items()},
        "train": {"micro_batch_size": 4, "micro_batches_per_step": 2, "lr": 1e-3, "checkpoint_every": 0,
                  "eval_every": 0, "precision": "fp32" if dry else "bf16", **train},
        "deepspeed": "zero2",
        "scaling": {"num_workers": gpus, "use_gpu": not dry},
        "storage": {"path": str(root / "runs")},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def torchrun(path: Path, procs: int, *overrides: str, timeout: float = 300) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "launcher.torchrun", str(path), *overrides]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout:g}s\n{exc.stdout or ''}{exc.stderr or ''}"
    return done.returncode, done.stdout + done.stderr


def timed(check: str, body) -> Row:
    started = time.perf_counter()
    try:
        ok, detail = body()
    except Exception as exc:  # a check that breaks is a failed row, and the others still run
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return Row(check, ok, time.perf_counter() - started, detail)


def failure(output: str) -> str:
    """What went wrong, in a line: the run's own error (with its first item), else the last error line."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("mtl torchrun:"):
            return " ".join(x.strip() for x in lines[i:i + 2])[:200]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:200]


def run_checks(root: Path, *, dry: bool) -> list[Row]:
    import torch

    gpus = 2 if dry else max(1, min(2, torch.cuda.device_count()))
    size = {} if dry else {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}
    models = build_assets(root, mfu_size=size)
    rows, state = [], {}
    heads = job(root, "heads", models["bert"], "heads", {"sentiment": {}, "qa": {"options": {"doc_stride": 16}}},
                gpus=gpus, dry=dry, steps=4, checkpoint_every=2, eval_every=4)

    def zero2_heads():
        code, out = torchrun(heads, gpus)
        state["heads"] = out
        committed = (root / "runs" / "heads" / "step-000004" / "COMMITTED").exists()
        evals = re.findall(r"eval validation step 4 (\w+): (\w+) ([\d.]+)", out)
        ok = code == 0 and committed and len(evals) == 2
        return ok, ", ".join(f"{t} {m} {v}" for t, m, v in evals) if ok else failure(out)

    def resume():
        code, out = torchrun(heads, gpus, "train.steps=6")
        trained = json.loads((root / "runs" / "heads" / "step-000006" / "trainer_state.json").read_text())
        ok = code == 0 and "resumed from step-000004" in out and trained["world_size"] == gpus
        return ok, f"step-000004 -> step-000006 on {trained['world_size']} ranks" if ok else failure(out)

    def evaluate():
        from launcher.evaluate import evaluate_version
        from launcher.jobfile import load_job

        report = evaluate_version(load_job(str(heads), []), split="test", baselines=False)
        scores = {t: r["metrics"] for t, r in report["results"].items()}
        ok = report["version"] == "step-000006" and 0.0 <= scores["sentiment"]["accuracy"] <= 1.0
        return ok, f"{report['version']} test: sentiment accuracy {scores['sentiment']['accuracy']:.3f}"

    def zero3_text2text():
        lm = job(root, "lm", models["seq2seq"], "text2text",
                 {"sentiment": {"prompt": "{text} positive or negative ?"},
                  "summary": {"prompt": "{source} summary :", "options": {"max_new_tokens": 8}}},
                 gpus=gpus, dry=dry, steps=3, eval_every=3)
        spec = yaml.safe_load(lm.read_text())
        spec["deepspeed"] = "zero3"
        lm.write_text(yaml.safe_dump(spec, sort_keys=False))
        code, out = torchrun(lm, gpus)
        evals = re.findall(r"eval validation step 3 (\w+): (\w+) ([\d.]+)", out)
        ok = code == 0 and (root / "runs" / "lm" / "step-000003" / "COMMITTED").exists() and \
            {t for t, _, _ in evals} == {"sentiment", "summary"}
        return ok, ", ".join(f"{t} {m} {v}" for t, m, v in evals) if ok else failure(out)

    def throughput():
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(models["causal"])
        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        steps = 4 if dry else 12
        length = config.n_positions - 8  # rows of 900 words fill every position but the 8 generated at validation
        long = job(root, "mfu", models["causal"], "text2text",
                   {"long": {"prompt": "{source}", "options": {"max_new_tokens": 8}}},
                   gpus=gpus, dry=dry, steps=steps, micro_batch_size=2 if dry else 8)
        code, out = torchrun(long, gpus, f"model.max_length={length}", timeout=420)
        lines = [(int(s), float(t), int(k)) for s, t, k in STEP_LINE.findall(out)]
        timed_steps = [k for s, _, k in lines if s > min(2, steps - 1)]  # the first steps warm up
        if code or not timed_steps:
            return False, failure(out)
        tokens_s = sum(timed_steps) / len(timed_steps)  # every rank's tokens: the lines sum them
        tflops = 6 * params * tokens_s / 1e12
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        mfu = f", MFU {100 * tflops / (peak * gpus):.1f}% of {gpus}x{peak:g}" if peak and not dry else ""
        return True, f"{params / 1e6:.3g}M params, {tokens_s:,.0f} tok/s, {tflops:.3g} TFLOP/s{mfu} ({name})"

    for check, body in (("ZeRO-2 heads " + ("fp32" if dry else "bf16"), zero2_heads), ("resume", resume),
                        ("eval (test split)", evaluate), ("ZeRO-3 text2text + generation", zero3_text2text),
                        ("throughput (GPT-2, ZeRO-2)", throughput)):
        rows.append(timed(check, body))
    return rows


def table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"| {'check':<{width}} | ok   | seconds | detail", f"|{'-' * (width + 2)}|------|---------|-------"]
    lines += [f"| {r.check:<{width}} | {'yes ' if r.ok else 'NO  '} | {r.seconds:7.1f} | {r.detail}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="on the CPU with tiny models: check the check's wiring")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --dry runs the same checks on the CPU", file=sys.stderr)
        return 2
    root = Path(args.keep or tempfile.mkdtemp(prefix="mtl-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MTL_DATA_CACHE", str(root / "data-cache"))
    try:
        rows = run_checks(root, dry=args.dry)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    where = "CPU (dry)" if args.dry else f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    print(f"gpu_check on {where}, torch {torch.__version__}\n{table(rows)}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
