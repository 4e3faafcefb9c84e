"""A real multi-node Ray cluster on this machine: a head and worker nodes on loopback.

Each node is its own `ray start --block` process with its own CPU share, temp dir and ports,
so Ray schedules across them exactly as across machines (distinct node ids, placement
groups, object transfer between raylets). Token authentication stays on: the cluster gets a
fresh token in its own folder, handed to its processes and to this one through
RAY_AUTH_TOKEN_PATH, never written to ~/.ray. The dashboard (and so the Jobs API) and the
GCS listen on 127.0.0.1.

Teardown stops exactly what was started: the `ray start` processes by PID and every process
they spawned (raylets, GCS, dashboard, workers), SIGTERM first, SIGKILL after a grace
period. Never `ray stop`, which kills every Ray process on the machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from launcher.ray_auth import list_alive_nodes
from trainer.errors import UserError, first_line

START_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0  # then SIGKILL, as `ray stop` does after its grace period


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path


@dataclass
class LocalCluster:
    """`with LocalCluster(nodes=2) as cluster:` — `cluster.dashboard_url` takes jobs."""

    nodes: int = 2
    cpus_per_node: float = 1
    gpus_per_node: int = 0
    root: Path | None = None
    stop_grace_s: float = STOP_GRACE_S
    # Folders each node sees as its own disk, as on machines that do not share one: path -> one
    # folder per node (head first) whose files that node finds there, or None for an empty one.
    # Each node then runs in a mount namespace of its own with a tmpfs at the path (needs root).
    node_local: dict[str, list[str | None]] = field(default_factory=dict)
    started: list[Node] = field(default_factory=list)

    def __post_init__(self):
        if self.nodes < 1:
            raise UserError(f"a cluster needs at least one node, got {self.nodes}")
        # Short: Ray's unix sockets live under the temp dirs and their paths are length-limited.
        self.root = Path(self.root or tempfile.mkdtemp(prefix="mtl-ray-", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.token_path = self.root / "auth_token"

    # -- the environment every process of this cluster (and a client of it) needs
    @property
    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("RAY_AUTH_TOKEN", None)  # this cluster's token comes from its own file
        env.update(self.auth_env)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Jobs run `python -m launcher.cli`: the interpreter that has Ray and the project comes first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    # -- lifecycle
    def start(self, timeout: float = START_TIMEOUT_S) -> LocalCluster:
        self.token_path.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.token_path.chmod(0o600)
        try:
            self._start_node("head", 0, ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                                      "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                      f"--ray-client-server-port={free_port()}"])
            self.wait_for_nodes(1, timeout)
            for i in range(1, self.nodes):
                self._start_node(f"node{i}", i, [f"--address={self.gcs_address}"])
            self.wait_for_nodes(self.nodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _on_own_disks(self, index: int, cmd: list[str]) -> list[str]:
        """`cmd` in a mount namespace where each node_local path is this node's own (see node_local)."""
        if not self.node_local:
            return cmd
        steps = []
        for path, seeds in self.node_local.items():
            os.makedirs(path, exist_ok=True)  # the mount point, also what the driver and other processes see
            steps.append(f"mount -t tmpfs tmpfs {shlex.quote(path)}")
            if seeds[index]:
                steps.append(f"cp -a {shlex.quote(seeds[index])}/. {shlex.quote(path)}")
        # unshare execs in place: the PID stop() signals is still `ray start`'s.
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", " && ".join([*steps, 'exec "$@"']),
                "sh", *cmd]

    def _start_node(self, name: str, index: int, role_args: list[str]) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray if os.path.exists(ray) else "ray", "start", "--block", *role_args,
               "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_node:g}",
               f"--num-gpus={self.gpus_per_node}", f"--temp-dir={temp_dir}",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               "--disable-usage-stats", "--log-style=record", "--log-color=false"]
        with open(log, "wb") as out:
            # A session of its own: a Ctrl-C meant for us does not kill the nodes half-way; stop() does.
            process = subprocess.Popen(self._on_own_disks(index, cmd), stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                       start_new_session=True)
        self.started.append(Node(name, process, log))

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            for node in self.started:
                if node.process.poll() is not None:
                    raise UserError(f"Ray node '{node.name}' exited with status {node.process.returncode} while "
                                    f"starting; its log: {node.log}\n{tail(node.log)}")
            try:
                alive = self.alive_nodes()
                if len(alive) >= count:
                    return
                last_error = f"{len(alive)} of {count} nodes up"
            except Exception as exc:  # the dashboard is not serving yet
                last_error = first_line(exc)
            time.sleep(1.0)
        raise UserError(f"the local Ray cluster did not come up within {timeout:.0f}s ({last_error}); "
                        f"logs in {self.root}")

    def alive_nodes(self) -> list[dict]:
        """Alive nodes as the dashboard's state API reports them (node_id, node_ip, resources_total)."""
        with temporary_env(self.auth_env):  # the header is read from these, for this call only
            return list_alive_nodes(self.dashboard_url)

    def pids(self) -> set[int]:
        """Every live process this cluster consists of: the `ray start` processes and their descendants."""
        import psutil

        pids = set()
        for node in self.started:
            try:
                root = psutil.Process(node.process.pid)
                pids.add(root.pid)
                pids.update(p.pid for p in root.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return pids

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM what was started (workers first, head last), SIGKILL whatever outlives the grace period."""
        import psutil

        grace = self.stop_grace_s if grace is None else grace
        procs = {}
        for pid in self.pids():
            try:
                procs[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                pass
        for node in reversed(self.started):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        # Every process of ours gets the same SIGTERM `ray stop` would send, but only ours: the
        # head's own shutdown alone waits ~30 s on its GCS and dashboard.
        for proc in procs.values():
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for node in self.started:
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.process.kill()
        self.started.clear()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class temporary_env:
    """Set environment variables for the duration of a block (Ray's clients read the token from them)."""

    def __init__(self, values: dict[str, str]):
        self.values, self.saved = values, {}

    def __enter__(self):
        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
