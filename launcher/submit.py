"""`mtl submit` and `mtl jobs`: a job on a Ray cluster through the Ray Jobs API.

A submission validates the job here first (the same checks as `mtl validate`), then ships a
package Ray unpacks on the cluster as the job's working directory:

    launcher/ trainer/ ds_configs/   this project's code (and shipped configs), so the cluster
                              runs the version you have
    .mtl/job.yaml             the resolved job (no secrets in it)
    .mtl/deepspeed.json       its DeepSpeed config (the job names it relatively)
    .mtl/submission.json      the submission's id and time (each package is new, so a node's
                              cache never serves one job's files to another)
    .mtl/env.json             with --forward-credentials only: this shell's secrets (HF_TOKEN,
                              S3 and tracker keys), mode 0600, removed once the job has read it

and runs `python -m launcher.cli train .mtl/job.yaml` there, which starts Ray Train on the
cluster. Plain settings (offline flags, regions) go in the runtime_env's env_vars; secrets go
only in the package file (see trainer.job_env), never in the job's metadata or its logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from launcher.jobfile import dump_job
from launcher.ray_auth import LOOPBACK, jobs_client
from launcher.validate import require_valid
from trainer.errors import UserError, first_line
from trainer.job_env import JOB_ENV_FILE, MODE_KEY, SECRET_ENV
from trainer.model import read_ds_config
from trainer.spec import JobSpec

# Settings safe to show in a job's runtime_env.
PUBLIC_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TOKENIZERS_PARALLELISM",
              "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
              "AWS_EC2_METADATA_DISABLED", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "WANDB_BASE_URL",
              "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
# Paths on this machine: only meaningful to a cluster on this machine.
LOCAL_PATH_ENV = ("TORCH_EXTENSIONS_DIR", "HF_HOME", "MTL_DATA_CACHE")
ENTRYPOINT = "python -m launcher.cli train .mtl/job.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submit(spec: JobSpec, address: str, *, wait: bool = False, on_change: str = "refuse",
           forward: str | None = None, validated: bool = False, out=sys.stdout) -> tuple[str, int]:
    """Submit `spec` to the cluster's Jobs API; (job id, exit status: 0 unless waiting on a failed job).

    forward: None (the cluster uses its own credentials), "missing" (this shell's secrets fill in
    what a node lacks) or "override" (they replace the nodes' own); see trainer.job_env.
    validated: the caller already ran require_valid on this spec (it reads every data row).
    """
    if not validated:
        require_valid(spec)  # everything `mtl validate` checks, before anything is shipped
    client = jobs_client(address)
    on_this_machine = urlparse(client.get_address()).hostname in LOOPBACK
    if not on_this_machine:
        for line in local_only_paths(spec):
            print(f"[mtl] warning: {line}", file=sys.stderr)
    for line in credential_notes(forward):
        print(f"[mtl] {line}", file=sys.stderr)
    submission_id = f"mtl-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="mtl-submit-") as staging:
        package(spec, Path(staging), submission_id, forward)
        job_id = client.submit_job(
            entrypoint=ENTRYPOINT + {"refuse": "", "new": " --new", "allow": " --allow-changes"}[on_change],
            submission_id=submission_id,
            runtime_env={"working_dir": staging, "env_vars": {**public_env(on_this_machine),
                                                              **stop_wait_env(spec)}},
            metadata={"mtl_name": spec.name, "mtl_storage": spec.storage.path},
        )
    print(f"[mtl] submitted job {job_id} to {client.get_address()}", file=out)
    print(f"[mtl] follow it with: mtl jobs logs {job_id} --follow --address {client.get_address()}", file=out)
    if not wait:
        return job_id, 0
    return job_id, follow(client, job_id, out=out)


def package(spec: JobSpec, folder: Path, submission_id: str = "", forward: str | None = None) -> None:
    """The job's working directory on the cluster (see the module docstring)."""
    import ds_configs
    import launcher
    import trainer

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for module in (launcher, trainer, ds_configs):
        source = Path(module.__file__).resolve().parent
        shutil.copytree(source, folder / source.name, ignore=ignore)
    meta = folder / ".mtl"
    meta.mkdir()
    (meta / "deepspeed.json").write_text(json.dumps(read_ds_config(spec.deepspeed), indent=1))
    shipped = spec.model_copy(deep=True)
    shipped.deepspeed = ".mtl/deepspeed.json"  # relative to the working directory on the cluster
    (meta / "job.yaml").write_text(dump_job(shipped))
    (meta / "submission.json").write_text(json.dumps({"submission_id": submission_id, "submitted_at": time.time(),
                                                      "nonce": os.urandom(8).hex()}))
    secrets = forwarded_secrets() if forward else {}
    if secrets:
        env_file = folder / JOB_ENV_FILE
        env_file.touch(mode=0o600)  # private before the secrets are in it
        env_file.write_text(json.dumps({**secrets, MODE_KEY: forward}))


def forwarded_secrets() -> dict[str, str]:
    return {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}


def credential_notes(forward: str | None) -> list[str]:
    """What a user should know about the secrets in this shell before the job leaves."""
    present = sorted(forwarded_secrets())
    if not present:
        return []
    if not forward:
        return [f"not forwarded: {', '.join(present)} (the cluster uses its own credentials; "
                "--forward-credentials sends this shell's to the job)"]
    notes = [f"forwarded to the job, never shown in its metadata: {', '.join(present)}"
             + (" (they replace the nodes' own)" if forward == "override" else " (where a node lacks its own)")]
    if "AWS_SESSION_TOKEN" in present:
        notes.append("AWS_SESSION_TOKEN: temporary credentials expire (often within 1-12 h) and nothing on the "
                     "cluster can renew them; give the nodes a role (instance profile, IRSA) for long runs")
    return notes


def stop_wait_env(spec: JobSpec) -> dict[str, str]:
    """`mtl jobs stop` SIGTERMs the driver, which has the workers write a version first; Ray's job
    supervisor SIGKILLs after RAY_JOB_STOP_WAIT_TIME_S (3 s by default), so give it the grace."""
    return {"RAY_JOB_STOP_WAIT_TIME_S": str(int(spec.train.stop_grace_s) + 30)}


def public_env(on_this_machine: bool) -> dict[str, str]:
    names = PUBLIC_ENV + (LOCAL_PATH_ENV if on_this_machine else ())
    env = {k: os.environ[k] for k in names if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def local_only_paths(spec: JobSpec) -> list[str]:
    """What the job reads or writes on this machine's disk, which a remote cluster may not see."""
    lines = []
    if os.path.isabs(spec.model.name_or_path):
        lines.append(f"model.name_or_path {spec.model.name_or_path}")
    for name, task in spec.tasks.items():
        for key in ("train", "validation", "test", "path"):
            value = getattr(task.data, key)
            if value and "://" not in value:
                lines.append(f"tasks.{name}.data.{key} {value}")
    if "://" not in spec.storage.path:
        lines.append(f"storage.path {spec.storage.path} (every node must write the same folder: use NFS or s3://)")
    if not lines:
        return []
    return ["these paths are on this machine; every cluster node must see them at the same path (shared "
            "filesystem), or use hub ids and s3:// storage:", *(f"  {line}" for line in lines)]


def follow(client, job_id: str, *, out=sys.stdout, detached_hint: bool = True) -> int:
    """Stream a job's logs until it ends; its exit status (the driver's, or 1 if it was stopped)."""
    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        if detached_hint:
            print(f"\n[mtl] stopped following; job {job_id} keeps running (mtl jobs stop {job_id} "
                  f"--address {client.get_address()})", file=sys.stderr)
        raise
    info = wait_until_done(client, job_id)
    print(f"[mtl] job {job_id} {info.status}" + (f": {job_message(info.message)}" if info.message
                                                  and info.status != "SUCCEEDED" else ""), file=out)
    if info.status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def wait_until_done(client, job_id: str, timeout: float = 60.0):
    """The job's info once it is in a terminal state (the log stream may end a moment earlier)."""
    deadline = time.monotonic() + timeout
    info = client.get_job_info(job_id)
    while info.status not in TERMINAL and time.monotonic() < deadline:  # JobStatus is a str enum
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    return info


def job_message(text: str | None) -> str:
    """The first line of a job's message, without Ray's promise of logs that follow it."""
    return first_line(text or "").split(", last available logs")[0]


# -- mtl jobs ----------------------------------------------------------------------------------

def list_jobs(address: str, out=sys.stdout) -> None:
    client = jobs_client(address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'job id':<36} {'status':<10} {'experiment':<20} {'started':<20} {'ended':<20}", file=out)
    for job in jobs:
        meta = job.metadata or {}
        print(f"{job.submission_id or job.job_id or '?':<36} {job.status:<10} "
              f"{meta.get('mtl_name', '-'):<20} {_time(job.start_time):<20} {_time(job.end_time):<20}", file=out)


def job_status(address: str, job_id: str, out=sys.stdout) -> str:
    client = jobs_client(address)
    info = _info(client, job_id)
    status = str(info.status)
    meta = info.metadata or {}
    print(f"job {job_id}: {status}", file=out)
    for label, value in (("experiment", meta.get("mtl_name")), ("storage", meta.get("mtl_storage")),
                         ("started", _time(info.start_time)), ("ended", _time(info.end_time)),
                         ("message", job_message(info.message))):
        if value and value != "-":
            print(f"  {label}: {value}", file=out)
    return status


def job_logs(address: str, job_id: str, *, follow_logs: bool = False, out=sys.stdout) -> int:
    client = jobs_client(address)
    _info(client, job_id)
    if follow_logs:
        return follow(client, job_id, out=out)
    out.write(client.get_job_logs(job_id))
    return 0


def stop_job(address: str, job_id: str, out=sys.stdout) -> None:
    client = jobs_client(address)
    _info(client, job_id)
    stopped = client.stop_job(job_id)
    print(f"job {job_id}: {'stop requested' if stopped else 'already finished'}", file=out)


def _info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise UserError(f"no job '{job_id}' on {client.get_address()} (see `mtl jobs list`)") from None
        raise


def _time(ms) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


RANK_LINE = re.compile(r"\[mtl\] rank (\d+) of (\d+) on node ([0-9a-f]+) at (\S+)")


def rank_placement(logs: str) -> dict[int, tuple[str, str]]:
    """rank -> (node id, address) from the workers' placement lines in a job's logs."""
    return {int(m.group(1)): (m.group(3), m.group(4)) for m in RANK_LINE.finditer(logs)}
