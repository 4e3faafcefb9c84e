"""Step time of a job under several DeepSpeed configs (real Ray Train workers, CPU or GPU).

    .venv/bin/python benchmarks/zero_stage_step.py jobs/demo.yaml --configs zero1 zero2 --steps 4

Each config trains the job for `--steps` steps under a fresh name in a temporary storage folder
(validation only at the end, one version), then reads the step times the run logged to TensorBoard;
the first step (warm-up) is left out of the median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import step_times  # noqa: E402


def main() -> None:
    from launcher.jobfile import load_job
    from launcher.run import train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    parser.add_argument("--configs", nargs="+", default=["zero1", "zero2"])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="mtl-bench-") as storage:
        for config in args.configs:
            spec = load_job(args.job, [*args.overrides, f"name=bench-{config}", f"deepspeed={config}",
                                       f"train.steps={args.steps}", "train.warmup_steps=0", "train.eval_every=0",
                                       "train.checkpoint_every=0", f"storage.path={storage}"])
            train(spec)
            times = step_times(Path(storage) / spec.name / "tensorboard")
            results[config] = [times[s] for s in sorted(times) if s > 1]
    print(f"{args.job} {' '.join(args.overrides)}: median step time over steps 2..{args.steps}")
    for config, times in results.items():
        print(f"{config:<16}{statistics.median(times):>8.2f} s   ({', '.join(f'{t:.1f}' for t in times)})")


if __name__ == "__main__":
    main()
