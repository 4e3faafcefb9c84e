"""`mtl multinode` (what `make train-multinode` runs): a job on several Ray nodes.

With a cluster address (--address or RAY_ADDRESS) the job is submitted there and followed.
Otherwise a real cluster of NODES nodes is started on this machine (launcher.local_cluster),
the job is submitted to it through the Jobs API with its workers spread over the nodes, its
logs are streamed, the node each rank ran on is printed, and the cluster is torn down by PID,
also when the job fails or on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from launcher.jobfile import load_job, read_yaml
from launcher.local_cluster import STOP_GRACE_S, LocalCluster, temporary_env
from launcher.ray_auth import jobs_client
from launcher.submit import follow, rank_placement, submit, wait_until_done
from launcher.validate import require_valid
from trainer.errors import UserError

LOCAL_LAYOUT = Path(__file__).resolve().parent.parent / "cluster_configs" / "local.yaml"
LAYOUT_KEYS = {"nodes", "cpus_per_node", "gpus_per_node", "placement", "stop_grace_s"}


def read_layout(path: Path | str | None) -> dict:
    """The local cluster's layout (cluster_configs/local.yaml unless another file is given).

    An install without the repository's cluster_configs/ gets {}: the defaults where it is read.
    """
    path = Path(path) if path else LOCAL_LAYOUT
    if not path.exists():
        if path == LOCAL_LAYOUT:
            return {}
        raise UserError(f"cluster layout not found: '{path}'")
    layout = read_yaml(str(path)) or {}
    unknown = set(layout) - LAYOUT_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid keys: "
                        f"{', '.join(sorted(LAYOUT_KEYS))}")
    return layout


def run_multinode(job: str, overrides: list[str], *, nodes: int | None, cpus_per_node: float | None,
                  address: str | None, layout_file: str | None = None) -> int:
    layout = read_layout(layout_file)
    spec = load_job(job, overrides)
    if "placement" not in spec.scaling.model_fields_set:  # one worker per node where possible
        spec = load_job(job, [f"scaling.placement={layout.get('placement', 'spread')}", *overrides])
    if address:
        _, status = submit(spec, address, wait=True)
        return status
    require_valid(spec)  # before any node starts: a wrong job costs nothing
    nodes = nodes or int(layout.get("nodes") or 2)
    cpus = cpus_per_node or layout.get("cpus_per_node") or max(1, (os.cpu_count() or 1) // nodes)
    started = time.monotonic()
    cluster = LocalCluster(nodes=nodes, cpus_per_node=cpus, gpus_per_node=int(layout.get("gpus_per_node") or 0),
                           stop_grace_s=float(layout.get("stop_grace_s") or STOP_GRACE_S))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a SIGTERM tears down like Ctrl-C
    job_id = None
    try:
        say(f"starting a local Ray cluster: {nodes} nodes × {cpus:g} CPU on 127.0.0.1 (token auth on), "
            f"logs in {cluster.root}")
        cluster.start()
        say(f"cluster up in {time.monotonic() - started:.0f}s: head {cluster.gcs_address}, "
            f"dashboard {cluster.dashboard_url}")
        with temporary_env(cluster.auth_env):
            client = jobs_client(cluster.dashboard_url)
            job_id, _ = submit(spec, cluster.dashboard_url, validated=True)
            try:
                status = follow(client, job_id, detached_hint=False)
            except KeyboardInterrupt:
                say(f"interrupted: stopping job {job_id}")
                client.stop_job(job_id)  # its driver and workers get to exit before the nodes go
                wait_until_done(client, job_id, timeout=30)
                raise
            logs = client.get_job_logs(job_id)
        print_placement(rank_placement(logs))
        say(f"job {job_id} {'succeeded' if status == 0 else f'failed (exit status {status})'} "
            f"in {time.monotonic() - started:.0f}s on {nodes} nodes")
        return status
    except KeyboardInterrupt:
        say("interrupted: stopping the local cluster" + ("; the run can resume from its latest version "
                                                         "(same command)" if job_id else ""))
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_started = time.monotonic()
        cluster.stop()
        left = cluster.pids()
        say(f"local cluster stopped in {time.monotonic() - stop_started:.0f}s"
            + (f"; processes still alive: {sorted(left)}" if left else "; no Ray process of it is left"))
        if not left:
            cluster.cleanup()


def print_placement(placement: dict[int, tuple[str, str]]) -> None:
    if not placement:
        say("no rank placement lines in the job's logs")
        return
    for rank, (node, address) in sorted(placement.items()):
        say(f"rank {rank}: node {node} at {address}")
    distinct = len({node for node, _ in placement.values()})
    say(f"{len(placement)} ranks on {distinct} distinct node{'s' if distinct != 1 else ''}")


def say(message: str) -> None:
    print(f"[mtl] {message}", file=sys.stderr, flush=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
