"""`make bench`: `mtl` against what a user would otherwise run, in one table.

    make bench    # = .venv/bin/python benchmarks/bench.py --update BENCHMARKS.md [--repeats 2] [--steps 12] [--only speed,bf16,stall]

Every measure runs its side and its reference in the same invocation, alternating (A, B, A, B
... for `--repeats`), and takes medians, so the ratios hold on a noisy machine even where the
absolute times do not. The job: one classification task on a random MiniLM-L6-shaped encoder
(benchmarks/common.py), 8 rows x 128 tokens per rank, 2 Ray Train workers x 1 CPU thread, ZeRO-2,
one micro-batch per step; the references run the same computation on the same rows.

Measures (goals from the project's speed issue):
  overhead   steady samples/s of `mtl train` / a torchrun + DeepSpeed loop            [>= 0.97]
  machine    tokens/s of `mtl train` / a bare one-process PyTorch loop, same batch    [>= 0.80]
  bf16       mtl's bf16/fp32 speed-up / the bare loop's                                [>= 0.90]
  ttfs       seconds from `mtl train` to its first step (the torchrun loop's beside)  [<= 25 s]
  stall      training's wait per version / the version's full write (local, S3)      [<= 0.2]
  memory     peak resident memory per rank, ZeRO-3 / ZeRO-0, ~85M-parameter model     [<= 0.6]
  large      a ~0.7B model under ZeRO-3 on 2 ranks: peak per rank / the memory plan    [<= 9 GiB, +-25%]
  lora       a LoRA version's size / its base model's weights (the demo's job)        [<= 0.05]
  eval       evaluation examples/s per task type, length-grouped batches / in order  [report]
  prep       preparing a 100k-row task again (node data cache) / the first time      [<= 0.10]
Measures the table lists as not measured say why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BASE,
    REPO,
    build_model,
    marked,
    median_after_warmup,
    put_marked,
    step_times,
    timed_output,
    write_rows,
)

from launcher.local_cluster import free_port  # noqa: E402

PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
       "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
       "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO)])}
MICRO_BATCH, LENGTH, WORKERS = 8, 128, 2


@dataclass
class Row:
    measure: str
    ours: str
    reference: str
    ratio: float | None
    goal: str
    met: bool | None
    how: str


def timed_lines(cmd: list[str], marker: str, timeout: float = 900) -> tuple[float | None, str, float]:
    """Run `cmd`; (seconds until a stdout line contains `marker`, all stdout, total seconds)."""
    started = time.monotonic()
    lines = timed_output(cmd, ENV, timeout)
    first = next((t for t, line in lines if marker in line), None)
    return first, "".join(line for _, line in lines), time.monotonic() - started


def mtl_job(folder: Path, model: Path, data: Path, steps: int, precision: str, name: str,
            deepspeed: str = "zero2") -> Path:
    import yaml

    job = {"name": name, "model": {"name_or_path": str(model), "kind": "heads", "max_length": LENGTH},
           "tasks": {"cls": {"type": "classification", "data": {"train": str(data)}}},
           "train": {"steps": steps, "micro_batch_size": MICRO_BATCH, "micro_batches_per_step": 1, "lr": 1e-4,
                     "lr_schedule": "constant", "eval_every": 0, "checkpoint_every": 0, "precision": precision},
           "deepspeed": deepspeed, "scaling": {"num_workers": WORKERS, "cpus_per_worker": 1},
           "storage": {"path": str(folder / "runs")}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run_mtl(folder: Path, model: Path, data: Path, steps: int, precision: str, tag: str) -> dict:
    name = f"bench-{tag}-{time.monotonic_ns()}"
    job = mtl_job(folder, model, data, steps, precision, name)
    first, _, wall = timed_lines([str(Path(PY).parent / "mtl"), "train", str(job)], "[mtl] step 1/")
    times = step_times(folder / "runs" / name / "tensorboard")
    return {"ttfs": first, "wall": wall, "step": median_after_warmup([times[s] for s in sorted(times)])}


def run_torchrun(model: Path, data: Path, steps: int, bf16: bool = False) -> dict:
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(WORKERS), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "benchmarks" / "ref_deepspeed_loop.py"),
           "--model", str(model), "--data", str(data), "--micro-batch", str(MICRO_BATCH), "--length", str(LENGTH),
           "--steps", str(steps), "--zero", "2", *(["--bf16"] if bf16 else [])]
    first, out, _ = timed_lines(cmd, "first step")
    times = json.loads(next(line for line in out.splitlines() if line.startswith('{"step_times"')))["step_times"]
    return {"ttfs": first, "step": median_after_warmup(times)}


def run_bare(model: Path, data: Path, steps: int, bf16: bool = False) -> dict:
    cmd = [PY, str(REPO / "benchmarks" / "ref_bare_loop.py"), "--model", str(model), "--data", str(data),
           "--batch", str(MICRO_BATCH * WORKERS), "--length", str(LENGTH), "--steps", str(steps),
           "--threads", str(WORKERS), *(["--bf16"] if bf16 else [])]
    _, out, _ = timed_lines(cmd, "step_times")
    times = json.loads(next(line for line in out.splitlines() if line.startswith('{"step_times"')))["step_times"]
    return {"step": median_after_warmup(times)}


def fast_bf16_here() -> bool:
    import torch

    from trainer.model import fast_bf16

    return fast_bf16(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def speed_rows(folder: Path, repeats: int, steps: int, with_bf16: bool) -> list[Row]:
    model, data = folder / "model", folder / "rows.jsonl"
    params = build_model(model)
    write_rows(data, rows=MICRO_BATCH * WORKERS * (steps + 2), length=LENGTH)
    ours, torchrun, bare = [], [], []
    for _ in range(repeats):  # alternating, so drift in the machine's speed hits every side alike
        ours.append(run_mtl(folder, model, data, steps, "fp32", "fp32"))
        torchrun.append(run_torchrun(model, data, steps))
        bare.append(run_bare(model, data, steps))
    global_rows = MICRO_BATCH * WORKERS
    shape = (f"{params / 1e6:.1f}M-parameter encoder, {MICRO_BATCH}x{LENGTH} tokens per rank, {WORKERS} workers "
             f"x 1 thread, ZeRO-2, fp32, dropout on both sides, median of steps 3..{steps}, {repeats} alternating runs each")
    mtl_sps, ref_sps = global_rows / med(ours, "step"), global_rows / med(torchrun, "step")
    bare_tps, mtl_tps = global_rows * LENGTH / med(bare, "step"), global_rows * LENGTH / med(ours, "step")
    rows = [
        Row("launcher overhead: samples/s", f"{mtl_sps:.2f}", f"{ref_sps:.2f} (torchrun + DeepSpeed)",
            mtl_sps / ref_sps, ">= 0.97", mtl_sps / ref_sps >= 0.97, shape),
        Row("closeness to the machine: tokens/s", f"{mtl_tps:.0f}", f"{bare_tps:.0f} (bare loop, 1 process x "
            f"{WORKERS} threads, batch {global_rows})", mtl_tps / bare_tps, ">= 0.80", mtl_tps / bare_tps >= 0.80,
            shape),
        Row("time to first step (s)", f"{med(ours, 'ttfs'):.1f}", f"{med(torchrun, 'ttfs'):.1f} (torchrun loop)",
            med(ours, "ttfs") / med(torchrun, "ttfs"), "<= 25 s", med(ours, "ttfs") <= 25.0,
            "from the command to its first step line, embedded Ray, ops already built; each run: "
            + " / ".join(f"{r['ttfs']:.1f}" for r in ours) + " s (torchrun: "
            + " / ".join(f"{r['ttfs']:.1f}" for r in torchrun) + " s)"),
    ]
    if with_bf16 and not fast_bf16_here():
        rows.append(Row("bf16 / fp32 speed-up", "-", "-", None, ">= 0.90", None,
                        "not measured: this CPU has no native bf16 (no AMX / AVX512-BF16), so `precision: auto` "
                        "trains fp32 and a bf16 step is emulated (slower on every side)"))
    elif with_bf16:
        ours16, bare16 = [], []
        for _ in range(repeats):
            ours16.append(run_mtl(folder, model, data, steps, "bf16", "bf16"))
            bare16.append(run_bare(model, data, steps, bf16=True))
        mtl_gain, bare_gain = med(ours, "step") / med(ours16, "step"), med(bare, "step") / med(bare16, "step")
        rows.append(Row("bf16 / fp32 speed-up", f"{mtl_gain:.2f}x", f"{bare_gain:.2f}x (bare loop, bf16 weights)",
                        mtl_gain / bare_gain, ">= 0.90", mtl_gain / bare_gain >= 0.90,
                        "same shapes; this CPU's bf16 support decides whether either gains"))
    return rows


STALL = re.compile(r"^(local|s3)\s+\d+\s+[\d.]+\s+[\d.]+\s+([\d.]+)", re.M)  # checkpoint_stall.py's rows


def stall_rows() -> list[Row]:
    _, out, _ = timed_lines([PY, str(REPO / "benchmarks" / "checkpoint_stall.py")], "stall")
    found = dict(STALL.findall(out))
    if not found:
        raise RuntimeError(f"checkpoint_stall.py printed no stall:\n{out[-2000:]}")
    return [Row(f"checkpoint stall ({'local folder' if where == 'local' else 'S3, moto'})", f"{float(value):.2f}", "1.00 (a blocking save)", float(value),
                "<= 0.2", float(value) <= 0.2, "benchmarks/checkpoint_stall.py: wait per version / full write")
            for where, value in found.items()]


PHASES = re.compile(r"\[mtl\] rank (\d+) peak memory: ([\d.]+) GiB resident \(([^)]*)\)")  # each rank's last line
STAGES = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")


def memory_rows(folder: Path, steps: int) -> list[Row]:
    """Each rank's peak resident memory through a short `mtl train` of a BERT-base-shaped model
    (~85M parameters, fp32 + AdamW) under each shipped ZeRO config, 2 workers."""
    model, data = folder / "base-model", folder / "base-rows.jsonl"
    params = build_model(model, **BASE)
    write_rows(data, rows=MICRO_BATCH * WORKERS * (steps + 2), length=LENGTH)
    peaks = {}
    for stage in STAGES:
        name = f"mem-{stage}-{time.monotonic_ns()}"
        job = mtl_job(folder, model, data, steps, "fp32", name, deepspeed=stage)
        _, out, _ = timed_lines([str(Path(PY).parent / "mtl"), "train", str(job)], "peak memory", timeout=1800)
        ranks = {int(r): float(g) for r, g, _ in PHASES.findall(out)}
        if len(ranks) != WORKERS:
            raise RuntimeError(f"{stage}: expected {WORKERS} peak-memory lines:\n{out[-3000:]}")
        peaks[stage] = max(ranks.values())
    base = peaks["zero0"]
    listing = ", ".join(f"{s.replace('zero', 'stage ').replace('_offload', '+offload')} {v:.2f}"
                        for s, v in peaks.items())
    return [Row(f"ZeRO memory: peak resident GiB per rank, {params / 1e6:.0f}M params", f"{peaks['zero3']:.2f} (stage 3)",
                f"{base:.2f} (stage 0)", peaks["zero3"] / base, "<= 0.6", peaks["zero3"] / base <= 0.6,
                f"`mtl train` {steps} steps, 2 workers, fp32 AdamW; the largest rank's `peak memory` line: {listing}")]


LARGE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 14, "num_attention_heads": 16,
         "num_key_value_heads": 16, "max_position_embeddings": 2048}  # Llama-shaped, ~0.7B with the bench's vocabulary


def large_model_rows(folder: Path) -> list[Row]:
    """A model that an unpartitioned rank could not hold twice on a 24 GB machine: each rank's peak
    through 2 steps and a version of `mtl train` under ZeRO-3 on 2 workers, against the memory plan
    `mtl validate` prints for the same job (trainer.model.memory_plan)."""
    import yaml
    from conftest import build_tokenizer
    from transformers import AutoConfig, LlamaConfig

    from launcher.jobfile import load_job
    from trainer.model import GIB, job_model_size, job_plan

    model = folder / "large-model"
    tok = build_tokenizer(model)
    LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **LARGE).save_pretrained(model)
    data = write_rows(folder / "large-rows.jsonl", rows=64, length=LENGTH)
    name, tokens = f"large-{time.monotonic_ns()}", 64
    job = {"name": name, "model": {"name_or_path": str(model), "kind": "text2text", "init": "random", "max_length": tokens},
           "tasks": {"cls": {"type": "classification", "data": {"train": str(data)}, "prompt": "{text} Sentiment:"}},
           "train": {"steps": 2, "micro_batch_size": 1, "micro_batches_per_step": 1, "lr": 1e-4, "eval_every": 0,
                     "checkpoint_every": 0, "precision": "fp32"},
           "deepspeed": "zero3", "scaling": {"num_workers": WORKERS, "cpus_per_worker": 1},
           "storage": {"path": str(folder / "runs")}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    _, out, _ = timed_lines([str(Path(PY).parent / "mtl"), "train", str(path)], "peak memory", timeout=1800)
    ranks = {int(r): (float(g), phases) for r, g, phases in PHASES.findall(out)}
    if len(ranks) != WORKERS:
        raise RuntimeError(f"large model: expected {WORKERS} peak-memory lines:\n{out[-3000:]}")
    peak, phases = max(ranks.values())
    spec = load_job(str(path), [])  # the plan `mtl validate` prints for this job
    size = job_model_size(spec, AutoConfig.from_pretrained(model), "causal", [])
    plan = job_plan(spec, size).host_bytes / GIB
    ratio = peak / plan
    return [Row(f"ZeRO-3 {size.params / 1e9:.2f}B-parameter Llama-shaped model, 2 ranks: peak resident GiB per rank",
                f"{peak:.2f}", f"{plan:.2f} (the plan)", ratio, "<= 9 GiB; plan within +-25%",
                peak <= 9.0 and 0.75 <= ratio <= 1.25,
                f"`mtl train` 2 steps + a version, fp32 AdamW, micro-batch 1 x {tokens} tokens, `model.init: random`; "
                f"by phase: {phases}")]


def lora_rows(folder: Path, job_path: str) -> list[Row]:
    """The size of a LoRA version against its base model's weights: one step of the demo's job
    (its model, LoRA settings and DeepSpeed config; no validation), then its version on disk."""
    import yaml

    from trainer.versions import weight_files

    job = yaml.safe_load(Path(job_path).read_text())
    name = f"lora-{time.monotonic_ns()}"
    for task in job["tasks"].values():
        task["data"] = {"train": task["data"]["train"], "limit": 64}  # no validation split: nothing evaluated
    job.update(name=name, storage={"path": str(folder / "runs")})
    job["train"].update(steps=1, warmup_steps=0, checkpoint_every=0)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    timed_lines([str(Path(PY).parent / "mtl"), "train", str(path)], "finished at", timeout=1800)
    version = folder / "runs" / name / "step-000001"
    size = sum(p.stat().st_size for p in version.rglob("*") if p.is_file())
    model = sum(p.stat().st_size for p in weight_files(str(REPO / job["model"]["name_or_path"])))
    return [Row("LoRA version size / the base model's weights", f"{size / 2 ** 20:.1f} MiB",
                f"{model / 2 ** 20:.0f} MiB (base weights)", size / model, "<= 0.05", size / model <= 0.05,
                f"{job_path} for 1 step: adapters, heads, optimizer state, tokenizer and settings; the base is named "
                f"by base.json")]


def task_count_rows(folder: Path, counts: list[int]) -> list[Row]:
    """What grows with the number of tasks (benchmarks/many_tasks.py), each count against the first."""
    import many_tasks

    model = folder / "tasks-model"
    build_model(model)
    figures = [many_tasks.measure(folder, model, count, ENV) for count in counts]
    base, rows = figures[0], []
    how = (f"N classification tasks x {many_tasks.ROWS} rows, MiniLM-shaped heads, 2 workers, 4 micro-batches of "
           f"8x128 tokens a step (equal tokens whatever N), validation ({many_tasks.VALIDATION_ROWS} rows a task) "
           "at the end; benchmarks/many_tasks.py")
    for f in figures[1:]:
        n, ratio = f["tasks"], f["first_step_s"] / base["first_step_s"]
        rows.append(Row(f"{n} tasks / {base['tasks']}: time to first step (s)", f"{f['first_step_s']:.1f}",
                        f"{base['first_step_s']:.1f} ({base['tasks']} tasks)", ratio, "<= 1.5x", ratio <= 1.5,
                        f"{how}; the node's data cache warm (preparing it took {f['prepare_s']:.1f} s vs "
                        f"{base['prepare_s']:.1f} s); `mtl validate` {f['validate_s']:.1f} s vs "
                        f"{base['validate_s']:.1f} s"))
        ratio = f["step_s"] / base["step_s"]
        rows.append(Row(f"{n} tasks / {base['tasks']}: steady step time (s)", f"{f['step_s']:.2f}",
                        f"{base['step_s']:.2f} ({base['tasks']} tasks)", ratio, "<= 1.2x", ratio <= 1.2,
                        f"{how}; median of steps 3 on; peak {f['peak_gib']:.2f} vs {base['peak_gib']:.2f} GiB "
                        f"per rank; end-of-run validation {f['end_validation_s']:.1f} s vs "
                        f"{base['end_validation_s']:.1f} s ({n / base['tasks']:.0f}x the rows)"))
    return rows


PREPARED = re.compile(r"^prepared (\w+) ([\d.]+) (\d+)", re.M)  # data_prep.py's line


def prep_rows(folder: Path, repeats: int, rows: int) -> list[Row]:
    """Preparing a `rows`-row classification task in a fresh process: with an empty node cache on one
    process and on all the machine's cores, then again with the entry the first run stored (a
    restart, another rank, the next run)."""
    model, data = folder / "prep-model", folder / "prep.jsonl"
    from conftest import build_tokenizer

    from trainer.data import usable_cores

    build_tokenizer(model)
    write_varied_rows(data, rows)

    def prepare(cache: Path, processes: int) -> tuple[str, float]:
        _, out, _ = timed_lines([PY, str(REPO / "benchmarks" / "data_prep.py"), "--model", str(model), "--data",
                                 str(data), "--cache", str(cache), "--processes", str(processes)], "prepared")
        found = PREPARED.search(out)
        if not found or int(found.group(3)) != rows:
            raise RuntimeError(f"data_prep.py printed no preparation of {rows} rows:\n{out[-2000:]}")
        return found.group(1), float(found.group(2))

    cores = usable_cores()
    first, cached, alone = [], [], []
    for repeat in range(repeats):
        first.append(prepare(folder / f"prep-cache-{repeat}", cores))
        cached.append(prepare(folder / f"prep-cache-{repeat}", cores))
        alone.append(prepare(folder / f"prep-alone-{repeat}", 1))
    statuses = [s for s, _ in first + alone], [s for s, _ in cached]
    if statuses != (["built"] * 2 * repeats, ["hit"] * repeats):
        raise RuntimeError(f"expected builds, then a cache hit each time, got {statuses}")
    a, b, c = (statistics.median(t for _, t in runs) for runs in (first, cached, alone))
    how = "benchmarks/data_prep.py: read + check + tokenize in a fresh process"
    return [Row(f"data preparation, {rows // 1000}k rows: cached / first", f"{b:.2f} s", f"{a:.2f} s (first)", b / a,
                "<= 0.10", b / a <= 0.10, f"{how}, empty node cache, then again"),
            Row(f"data preparation, {rows // 1000}k rows: first, {cores} processes / 1", f"{a:.1f} s",
                f"{c:.1f} s (1 process)", a / c, "< 1 with 2+ cores", a / c < 1 if cores > 1 else None,
                f"{how}, empty node cache; the split's chunks encoded on {cores} forked processes against 1 "
                "(whose Rust tokenizer already runs on every core)")]


def write_varied_rows(path: Path, rows: int, seed: int = 0) -> None:
    """Classification rows of 8-120 words, like sentences and short reviews."""
    from conftest import words

    rng = random.Random(seed)
    vocab = [w for w in words() if w.isalpha()]
    with path.open("w") as fh:
        for _ in range(rows):
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 120)))
            fh.write(json.dumps({"text": text, "label": rng.choice(["negative", "positive"])}) + "\n")


def job_data(job_path: str, splits: tuple[str, ...], limit: int | None = None):
    """A job file's spec, tokenizer, model encoding and prepared tasks (these `splits`)."""
    from launcher.jobfile import load_job
    from trainer.data import prepare_tasks
    from trainer.model import load_tokenizer_and_encoding

    spec = load_job(job_path, [])
    tokenizer, encoding = load_tokenizer_and_encoding(spec.model.name_or_path, spec.model.kind)
    return spec, tokenizer, encoding, prepare_tasks(spec, tokenizer, encoding, splits=splits, limit=limit)


def eval_rows(job_path: str, rows: int) -> list[Row]:
    """Examples/s of the evaluation pass of each task of a job (the demo's: rank classification,
    generated QA answers and summaries) on the model it starts from, one process: features in
    their order against batches of similar length (what evaluation does). The predictions of
    both orders are compared too."""
    import torch

    from trainer.evaluation import build_eval_set, evaluate_task
    from trainer.model import HeadSpec, build_model

    spec, tokenizer, encoding, tasks = job_data(job_path, ("test",), limit=rows)  # the demo's largest held-out split
    model = build_model(kind=spec.model.kind, encoding=encoding, name_or_path=spec.model.name_or_path,
                        heads=[HeadSpec(t, spec.tasks[t].type, len(d.labels)) for t, d in tasks.items()])
    batch = spec.train.eval_batch_size or spec.train.micro_batch_size
    out = []
    for name, data in tasks.items():
        es = build_eval_set(spec, name, data, tokenizer, encoding, "test")
        seconds, predictions = {}, {}
        for by_length in (False, True):
            started = time.perf_counter()
            result = evaluate_task(model, es, rank=0, world=1, batch_size=batch, pad_id=tokenizer.pad_token_id,
                                   encoding=encoding, synced=False, device=torch.device("cpu"), by_length=by_length)
            seconds[by_length], predictions[by_length] = time.perf_counter() - started, result.predictions
        n = len(predictions[True])
        same = sum(predictions[True][i] == predictions[False][i] for i in predictions[True])
        after, before = n / seconds[True], n / seconds[False]
        out.append(Row(f"evaluation: {name} ({spec.tasks[name].type}), examples/s", f"{after:.2f}",
                       f"{before:.2f} (features in order)", after / before, "report", None,
                       f"{n} test rows of `{job_path}`, its starting model, batches of {batch}, 1 process; "
                       f"{same}/{n} predictions identical"))
    return out


def token_rows(job_path: str, batches: int, common_rows: int) -> list[Row]:
    """Our task-homogeneous, length-grouped micro-batches against the common approach (every task's
    rows in one shuffled dataset, batches of `common_rows` padded to their longest), on the demo
    job's real three-task data: the non-pad share of one epoch of rank 0's batches, and real
    tokens per second of forward + backward through the job's model (its LoRA included) on
    `batches` batches of each, drawn as the job's mixture draws tasks."""
    import numpy as np
    import torch

    from trainer.data import collate, group_micro_batches, shard_indices, task_salt
    from trainer.model import build_model

    spec, tokenizer, encoding, tasks = job_data(job_path, ("train",))
    world, seed, rng = spec.scaling.num_workers, spec.train.seed, np.random.default_rng(0)
    ours, pooled, ours_lengths = {}, [], []
    for name, data in tasks.items():
        features = data.encoded["train"].features
        lengths = np.asarray(features["length"])
        idx = shard_indices(len(lengths), 0, world, seed, task_salt(name), 0)
        rows = spec.tasks[name].micro_batch_size or spec.train.micro_batch_size
        ours[name] = [(features, b) for b in group_micro_batches(
            idx, lengths, np.random.default_rng(seed), rows=rows, max_tokens=spec.tasks[name].max_tokens,
            pool=spec.train.pool_micro_batches, by_length=spec.train.length_grouping)]
        pooled += [(features, int(i), int(lengths[i])) for i in idx]
        ours_lengths += [lengths[b] for _, b in ours[name]]
    order = rng.permutation(len(pooled))
    common = [[pooled[i] for i in order[start:start + common_rows]] for start in range(0, len(order), common_rows)]

    def share(groups: list) -> float:  # each group: the lengths of one batch's rows
        return sum(int(np.sum(g)) for g in groups) / sum(int(np.max(g)) * len(g) for g in groups)

    ours_share = share(ours_lengths)
    common_share = share([[length for *_, length in g] for g in common])
    rates = spec.explicit_rates() if spec.mixture.strategy == "explicit" else {t: 1.0 for t in tasks}
    draws = rng.choice(list(tasks), size=batches, p=np.array([rates[t] for t in tasks]) / sum(rates.values()))
    picked = {t: iter(ours[t]) for t in tasks}
    ours_batches = [(t, *next(picked[t])) for t in draws]
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build_model(kind=spec.model.kind, encoding=encoding, name_or_path=spec.model.name_or_path,
                        heads=[], lora=spec.model.lora.model_dump() if spec.model.lora else None).train()
    columns = ("input_ids", "attention_mask", "labels")

    def useful_tokens_per_s(batches_: list[tuple[str, dict]]) -> float:
        real, seconds = 0, 0.0
        for task, batch in batches_:
            start = time.perf_counter()
            loss, _ = model(task, batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - start
            real += int(batch["attention_mask"].sum())
        return real / seconds

    def as_batch(rows: list[tuple]) -> dict:  # (features, row index) pairs, from one task or several
        return collate({k: [f[i][k] for f, i in rows] for k in columns}, tokenizer.pad_token_id)

    ours_tps = useful_tokens_per_s([(t, as_batch([(f, i) for i in b])) for t, f, b in ours_batches])
    # A mixed batch is one LM loss over every row's target, whichever task it came from.
    common_tps = useful_tokens_per_s([(next(iter(tasks)), as_batch([(f, i) for f, i, _ in g]))
                                      for g in common[:batches]])
    how = (f"{job_path}'s train data, rank 0 of {world}, one epoch; common: all tasks shuffled together, "
           f"{common_rows} rows per batch; tokens/s: {batches} forward+backward batches each, 1 process")
    return [Row("token efficiency: non-pad share", f"{ours_share:.3f}", f"{common_share:.3f} (mixed, padded)",
                ours_share / common_share, ">= 0.95 (ours)", ours_share >= 0.95, how),
            Row("token efficiency: useful tokens/s", f"{ours_tps:.0f}", f"{common_tps:.0f} (mixed, padded)",
                ours_tps / common_tps, ">= 1.3x", ours_tps / common_tps >= 1.3, how)]


NOT_YET = [
    Row("GPU MFU (125M-1B, bf16, ZeRO-2)", "-", "-", None, ">= 40%", None, "needs a GPU; none on this machine"),
]


def table(rows: list[Row]) -> str:
    lines = ["| measure | ours | reference | ratio | goal | met | how |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"| {r.measure} | {r.ours} | {r.reference} | {ratio} | {r.goal} | {met} | {r.how} |")
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpus = os.cpu_count()
    return (f"{platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", default="speed,bf16,tokens,stall,prep,memory,large,lora,eval,tasks",
                        help="comma list of: speed, bf16, tokens, stall, prep, memory, large, lora, eval, tasks")
    parser.add_argument("--task-counts", default="8,64,256", help="tasks: the numbers of tasks, the first the base")
    parser.add_argument("--eval-rows", type=int, default=64, help="eval: test rows per task")
    parser.add_argument("--prep-rows", type=int, default=1_000_000)
    parser.add_argument("--tokens-job", default="jobs/demo.yaml", help="tokens: the job whose data and model to use "
                                                                        "(`make demo-data` prepares the demo's)")
    parser.add_argument("--tokens-batches", type=int, default=8)
    parser.add_argument("--update", help="put the table (with the machine and the command) into this Markdown "
                                         "file, between its BEGIN/END bench markers")
    args = parser.parse_args()
    only = set(args.only.split(","))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mtl-bench-") as tmp:
        ENV["MTL_DATA_CACHE"] = str(Path(tmp) / "data-cache")  # the bench's runs keep out of the user's cache
        if only & {"speed", "bf16"}:
            rows += speed_rows(Path(tmp), args.repeats, args.steps, with_bf16="bf16" in only)
        if "memory" in only:
            rows += memory_rows(Path(tmp), steps=3)
        if "large" in only:
            rows += large_model_rows(Path(tmp))
        if "lora" in only:
            rows += lora_rows(Path(tmp), args.tokens_job)
        if "prep" in only:
            rows += prep_rows(Path(tmp), args.repeats, args.prep_rows)
        if "tasks" in only:
            rows += task_count_rows(Path(tmp), [int(c) for c in args.task_counts.split(",")])
    if "tokens" in only:
        rows += token_rows(args.tokens_job, args.tokens_batches, common_rows=8)
    if "eval" in only:
        rows += eval_rows(args.tokens_job, args.eval_rows)
    if "stall" in only:
        rows += stall_rows()
    rows += NOT_YET
    command = " ".join(["benchmarks/bench.py", *sys.argv[1:]])
    text = f"`{command}` on {machine()}:\n\n{table(rows)}\n"
    print(text)
    if args.update:
        update_markdown(Path(args.update), text, partial="--only" in sys.argv)


BEGIN, END = "<!-- BEGIN bench -->", "<!-- END bench -->"


def update_markdown(path: Path, text: str, partial: bool = False) -> None:
    """Put `text` between the page's bench markers. partial (`--only`): the measured rows replace
    the page's rows of the same measure, the others stay, each run's command listed above."""
    if partial:
        text = merged(marked(path, BEGIN, END), text)
    put_marked(path, BEGIN, END, text)


def merged(old: str, new: str) -> str:
    def rows(text: str) -> dict[str, str]:
        return {line.split("|")[1].strip(): line for line in text.splitlines()
                if line.startswith("| ") and not line.startswith("| measure ")}

    def commands(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("`benchmarks/bench.py")]

    def command(line: str) -> str:
        return line.split("` on ", 1)[0]

    table_rows = {**rows(old), **rows(new)}
    rerun = {command(line) for line in commands(new)}  # the same command again: its new line replaces the old
    listed = [line for line in commands(old) if command(line) not in rerun] + commands(new)
    header = ["| measure | ours | reference | ratio | goal | met | how |", "|---|---|---|---|---|---|---|"]
    return "\n\n".join(["\n".join(listed), "\n".join(header + list(table_rows.values()))]) + "\n"


if __name__ == "__main__":
    main()
