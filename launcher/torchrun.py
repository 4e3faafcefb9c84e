"""`mtl train` without Ray: one process per rank under torchrun (or Slurm's srun with torchrun's
variables), for clusters that have no Ray and machines where it is not installed.

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HEAD:29500 \\
        -m launcher.torchrun job.yaml [key=value ...] [--new | --allow-changes]

Every process reads the job; rank 0 then does what `mtl train`'s driver does (validation, the
version it resumes from and its drift check, init_from, the experiment's lease, the resolved
job.yaml) and hands the job it settled on to the other ranks. The ranks run the same worker
loop as under Ray Train (trainer.loop.run_worker with trainer.runtime.TorchrunRuntime): the same
versions, resume, resize and metrics. What needs Ray is refused: `train.validation: task`
(validation runs in the loop instead). SIGTERM (torchrun passes its own on, Slurm sends one
before a job's time is up) writes a version at the current step, and the same command resumes.
The world size is torchrun's; it must be scaling.num_workers (or within its range).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import uuid

from trainer.errors import RunStopped, UserError


def parse(argv: list[str] | None) -> argparse.Namespace:
    from launcher.cli import add_change_flags, parse_with_overrides

    parser = argparse.ArgumentParser(prog="python -m launcher.torchrun",
                                     description="Train a job under torchrun, without Ray (one process per rank).")
    parser.add_argument("job", help="the job's YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the job file")
    add_change_flags(parser)
    return parse_with_overrides(parser, argv)


def refusal(spec, world: int) -> str | None:
    """Why this job cannot run on `world` torchrun processes, or None."""
    if spec.train.validation == "task":
        return "train.validation: task runs validation as Ray tasks; under torchrun use train.validation: loop"
    if world not in spec.scaling.sizes:
        wanted = list(spec.scaling.num_workers) if spec.scaling.elastic else spec.scaling.num_workers
        return (f"torchrun started {world} processes but scaling.num_workers is {wanted}: give torchrun that many "
                f"(--nnodes × --nproc_per_node) or set scaling.num_workers={world}")
    return None


def main(argv: list[str] | None = None) -> int:
    from launcher.cli import change_policy, run_reporting

    args = parse(argv)
    return run_reporting("torchrun", lambda: train(args.job, args.overrides, change_policy(args)))


def train(job: str, overrides: list[str], on_change: str) -> int:
    import torch.distributed as dist

    from launcher.jobfile import load_job
    from trainer.runtime import TorchrunRuntime
    from trainer.spec import JobSpec

    spec = load_job(job, overrides)  # a mistake in the file: every rank says so and exits 2
    runtime = TorchrunRuntime(spec.scaling.collective_timeout_s, use_gpu=spec.scaling.use_gpu)
    try:
        with contextlib.ExitStack() as held:  # rank 0's lease, released however the run ends
            settled, problem = [None], None
            if runtime.rank == 0:
                try:
                    settled[0] = _as_driver(spec, runtime.world, on_change, held).model_dump(mode="json")
                except Exception as exc:  # any failure: the other ranks must hear of it, not wait in the broadcast
                    problem = exc
            dist.broadcast_object_list(settled, src=0)  # the job rank 0 settled on, or None when there is none
            if settled[0] is None:
                if problem is not None:
                    raise problem
                return 2  # rank 0 says why
            _run(JobSpec.model_validate(settled[0]), runtime)
    finally:
        dist.destroy_process_group()
    return 0


def _as_driver(spec, world: int, on_change: str, held: contextlib.ExitStack):
    """Rank 0: the job to run, holding the experiment's lease in `held` — or a UserError."""
    from launcher.jobfile import dump_job
    from launcher.lease import Lease
    from launcher.run import prepare
    from trainer.versions import open_storage

    problem = refusal(spec, world)
    if problem:
        raise UserError(problem)
    storage = open_storage(spec.storage)
    spec = prepare(spec, storage, on_change, workers=world)
    held.enter_context(Lease(storage, spec.name, uuid.uuid4().hex, spec.storage.lease_ttl_s))  # as under Ray
    storage.write_text(f"{spec.name}/job.yaml", dump_job(spec))
    return spec


def _run(spec, runtime) -> None:
    from launcher.run import summarize
    from trainer.loop import run_worker
    from trainer.loop_state import WorkerStopped
    from trainer.model import read_ds_config
    from trainer.versions import open_storage

    try:
        run_worker(spec, runtime, ds_base=read_ds_config(spec.deepspeed))
    except WorkerStopped as exc:  # SIGTERM: the version at this step is written
        raise RunStopped(f"{exc}; run the same command to resume from it", 143) from None
    if runtime.rank == 0:
        summarize(spec, open_storage(spec.storage), None)


if __name__ == "__main__":
    sys.exit(main())
