"""What grows with the number of tasks: N classification tasks of 300 training and 16 validation
rows each, a MiniLM-shaped heads model, 2 workers, `steps` steps of 4 micro-batches of 8 rows x 128
tokens (the same tokens per step whatever N), validation at the end.

    benchmarks/many_tasks.py --tasks 8,64,256   # one line of figures per count

Per count, with the node's data cache prepared first (its time is reported too): `mtl validate`
(s), time to first step (from the command to the first step line, s),
the steady step time (median of steps 3 on, s), the end-of-run validation (from the last step line
to the last task's validation line, s) and the largest rank's peak resident memory (GiB).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, build_model, step_times, timed_output, write_rows  # noqa: E402

PEAK = re.compile(r"\[mtl\] rank \d+ peak memory: ([\d.]+) GiB")
ROWS, VALIDATION_ROWS, LENGTH = 300, 16, 128


def write_job(folder: Path, model: Path, count: int, steps: int) -> tuple[Path, str]:
    import yaml

    tasks = {}
    for i in range(count):
        data = folder / "data" / f"t{i:03d}"
        if not (data / "train.jsonl").exists():
            write_rows(data / "train.jsonl", ROWS, LENGTH, seed=i)
            write_rows(data / "validation.jsonl", VALIDATION_ROWS, LENGTH, seed=10_000 + i)
        tasks[f"t{i:03d}"] = {"type": "classification",
                              "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl")}}
    name = f"tasks{count}-{time.monotonic_ns()}"
    job = {"name": name, "model": {"name_or_path": str(model), "kind": "heads", "max_length": LENGTH},
           "tasks": tasks, "mixture": {"strategy": "uniform"},
           "train": {"steps": steps, "micro_batch_size": 8, "micro_batches_per_step": 4, "lr": 1e-4,
                     "lr_schedule": "constant", "eval_every": 0, "checkpoint_every": 0, "eval_batch_size": 16},
           "deepspeed": "zero2", "scaling": {"num_workers": 2, "cpus_per_worker": 1},
           "storage": {"path": str(folder / "runs")}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path, name


WARM = """
import sys
from launcher.jobfile import load_job
from trainer.data import prepare_tasks
from trainer.model import load_model_files
spec = load_job(sys.argv[1], [])
_, tokenizer, encoding = load_model_files(spec.model.name_or_path, spec.model.kind)
prepare_tasks(spec, tokenizer, encoding)  # what each worker prepares: the same node-cache entries
"""


def measure(folder: Path, model: Path, count: int, env: dict, steps: int = 12) -> dict:
    """The figures of one count, with the node's data cache warm (the tasks prepared as a worker
    prepares them, beforehand): the fixed costs per task, not the first tokenization of their rows."""
    mtl = str(Path(sys.executable).parent / "mtl")
    job, name = write_job(folder, model, count, steps)
    started = time.monotonic()
    timed_output([sys.executable, "-c", WARM, str(job)], env)
    prepared_s = time.monotonic() - started
    started = time.monotonic()
    timed_output([mtl, "validate", str(job)], env)
    validate_s = time.monotonic() - started
    lines = timed_output([mtl, "train", str(job)], env)
    first = next(t for t, line in lines if "[mtl] step 1/" in line)
    last_step = max(t for t, line in lines if f"[mtl] step {steps}/{steps}" in line)
    validated = [t for t, line in lines if "[mtl] eval validation" in line]
    times = step_times(folder / "runs" / name / "tensorboard")
    return {"tasks": count, "prepare_s": round(prepared_s, 2), "validate_s": round(validate_s, 2),
            "first_step_s": round(first, 2),
            "step_s": round(statistics.median([times[s] for s in sorted(times)][2:]), 3),
            "end_validation_s": round(max(validated) - last_step, 2) if validated else None,
            "peak_gib": max(float(g) for g in PEAK.findall("".join(line for _, line in lines)))}


def main() -> None:
    import os
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="8,64,256")
    parser.add_argument("--steps", type=int, default=12, help="steps a run; the step time is the median of steps 3 on")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mtl-tasks-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MTL_DATA_CACHE": str(folder / "data-cache"),
               "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO)])}
        build_model(folder / "model")
        for count in (int(c) for c in args.tasks.split(",")):
            print(json.dumps(measure(folder, folder / "model", count, env, args.steps)), flush=True)


if __name__ == "__main__":
    main()
