"""Which Ray cluster a verb talks to, read as Ray's own tools read it.

A Ray cluster has two addresses, and Ray's tools take each where it belongs:
- the **dashboard** (http://HEAD:8265): the Jobs API, as `ray job submit --address` takes it. The
  verbs that submit or follow jobs (`submit`, `jobs`, `multinode --address`) use it, from
  --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (the order of Ray's
  JobSubmissionClient).
- the **GCS** (HEAD:6379, `auto` on a node of the cluster, or ray://HEAD:10001 for Ray Client):
  a driver joins the cluster through it, as `ray.init(address=...)` does. The verbs that run a
  driver here (`train`, `baselines`, `eval --address`, `serve --address`) use it, from --address,
  else RAY_ADDRESS (which Ray sets inside a submitted job).
Given the other kind, a verb says which kind it needs and what to run instead; no traceback.
"""

from __future__ import annotations

import os

from launcher.ray_auth import DEFAULT_DASHBOARD_PORT, dashboard_url
from trainer.errors import UserError

DASHBOARD_SCHEMES = ("http://", "https://")


def _given(flag: str | None, *variables: str) -> tuple[str | None, str]:
    """The first address given, and where it came from (for the message)."""
    if flag:
        return flag, "--address"
    for name in variables:
        if os.environ.get(name):
            return os.environ[name], name
    return None, ""


def driver_address(flag: str | None, verb: str) -> str | None:
    """The GCS address a driver joins (None: an embedded local Ray)."""
    address, source = _given(flag, "RAY_ADDRESS")
    if address is None:
        return None
    if address.startswith(DASHBOARD_SCHEMES):
        submit = f"mtl submit JOB --address {address}"
        raise UserError(f"{source}={address} is a cluster's dashboard (the Jobs API); `mtl {verb}` joins a cluster as "
                        f"a driver, through its GCS address (HEAD:6379, or auto on one of its nodes). To run there "
                        f"from this machine, use `{submit}`"
                        + (f", or unset {source} for an embedded local Ray" if source != "--address" else ""))
    if "://" in address and not address.startswith("ray://"):
        raise UserError(f"{source}={address}: a driver joins a Ray cluster through HEAD:6379, auto, or "
                        f"ray://HEAD:10001 (Ray Client)")
    return address


PROBE_TIMEOUT_S = 5.0


def require_listening(address: str) -> None:
    """A GCS (or Ray Client) address with nothing listening is refused at once: ray.init would
    retry it for minutes, printing a warning every few seconds."""
    import socket

    if address == "auto":
        return
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"cluster address '{address}': expected HEAD:PORT (the GCS, port 6379 by default), auto, "
                        f"or ray://HEAD:10001")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(f"cannot join the Ray cluster at {address}: nothing answers there ({exc.strerror or exc}). "
                        f"Is the cluster up, and is this its GCS address (`ray status --address {hostport}` on a "
                        f"node checks it)?") from None


def jobs_address(flag: str | None, *, required: bool = True) -> str | None:
    """The dashboard URL of the cluster whose Jobs API a verb talks to (None when none is given
    and the verb has something else to do without one)."""
    address, source = _given(flag, "RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    if address is None:
        if not required:
            return None
        raise UserError(f"no cluster address: pass --address http://HEAD:{DEFAULT_DASHBOARD_PORT} (the head node's "
                        f"dashboard) or set RAY_API_SERVER_ADDRESS / RAY_ADDRESS")
    if address == "auto" or address.startswith("ray://"):
        raise UserError(f"{source}={address} is a driver's address; the Jobs API is the head node's dashboard, "
                        f"http://HEAD:{DEFAULT_DASHBOARD_PORT} (set it with --address or RAY_API_SERVER_ADDRESS)")
    return dashboard_url(address)
