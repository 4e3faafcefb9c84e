"""Which scratch folders a worker may remove: only those of processes it can tell are gone.

The scratch root can be a folder that containers with their own PID namespaces share (a hostPath
mounted by every pod of a node); a PID that does not exist here may be a live run over there."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import scratch
from trainer.scratch import remove_orphans, scratch_dir


def this_host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", ".", socket.gethostname())


def this_boot() -> str:
    path = Path("/proc/sys/kernel/random/boot_id")
    return path.read_text().strip()[:8] if path.exists() else "noboot"


def this_ns() -> str:
    return str(os.stat("/proc/self/ns/pid").st_ino)


@pytest.fixture(scope="module")
def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def folder(root: Path, name: str) -> Path:
    path = root / name
    (path / "deepspeed").mkdir(parents=True)
    return path


def test_only_this_hosts_folders_of_gone_processes_are_removed(tmp_path, dead_pid):
    host, boot, ns = this_host(), this_boot(), this_ns()
    other_boot = "0badb007" if boot != "0badb007" else "0badb008"
    gone_here = folder(tmp_path, f"{host}-{boot}-{ns}-{dead_pid}-version-abc")
    before_reboot = folder(tmp_path, f"{host}-{other_boot}-{ns}-{os.getpid()}-version-abc")  # PID reused since: gone
    alive_here = folder(tmp_path, f"{host}-{boot}-{ns}-{os.getpid()}-version-abc")
    other_host = folder(tmp_path, f"other.pod-{boot}-{ns}-{dead_pid}-version-abc")  # its PID namespace is not ours
    # A container of this pod (same host name, same kernel) with a PID namespace of its own.
    other_container = folder(tmp_path, f"{host}-{boot}-{int(ns) + 1}-{dead_pid}-version-abc")
    old_format = folder(tmp_path, f"{dead_pid}-version-abc")  # no host: its owner may live elsewhere
    unrelated = folder(tmp_path, "notes")
    assert sorted(remove_orphans(tmp_path)) == sorted([gone_here, before_reboot])
    assert not gone_here.exists() and not before_reboot.exists()
    assert alive_here.exists() and other_host.exists() and old_format.exists() and unrelated.exists()
    assert other_container.exists()


def test_a_hostname_with_dashes_still_names_and_parses(tmp_path, monkeypatch, dead_pid):
    monkeypatch.setattr(socket, "gethostname", lambda: "pod-abc_123")
    monkeypatch.setattr(scratch, "ROOT", tmp_path)
    mine = scratch_dir("init-from-optimizer")  # a kind with dashes too
    assert mine.name.startswith(f"pod.abc.123-{this_boot()}-{this_ns()}-{os.getpid()}-init-from-optimizer-")
    gone = folder(tmp_path, f"pod.abc.123-{this_boot()}-{this_ns()}-{dead_pid}-init-from-abc")
    other = folder(tmp_path, f"pod.abc.124-{this_boot()}-{this_ns()}-{dead_pid}-init-from-abc")
    assert remove_orphans(tmp_path) == [gone]
    assert mine.exists() and other.exists()
