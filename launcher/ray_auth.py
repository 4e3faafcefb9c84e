"""Talking to a Ray cluster's dashboard (Jobs and state API) with token authentication.

Ray 2.60 turns token auth on by default. A client finds the token where Ray's own CLI does:
RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (when
RAY_AUTH_MODE=token). The token goes into an explicit Authorization header, read when the
request is made, so one process can talk to clusters with different tokens and nothing is
cached behind its back.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from trainer.errors import UserError, first_line

DEFAULT_DASHBOARD_PORT = 8265
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# `--insecure`: send the token over plain http to another host anyway (a network the user trusts).
allow_plain_http = False


def auth_token() -> str | None:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not path and os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        path = str(Path.home() / ".ray" / "auth_token")
    if path and os.path.exists(path):
        return Path(path).read_text().strip()
    return None


def auth_headers(url: str) -> dict[str, str]:
    """The Authorization header for a request to `url`; refused where plain http would carry the
    token across a network (anyone on the path could read it and then run code on the cluster)."""
    token = auth_token()
    if not token:
        return {}
    parsed = urlparse(url)
    if parsed.scheme == "http" and parsed.hostname not in LOOPBACK and not allow_plain_http:
        raise UserError(f"refusing to send the cluster's auth token over plain http to {parsed.hostname}: anyone on "
                        f"the network path could read it. Use https:// (a TLS proxy in front of the dashboard) or a "
                        f"tunnel (ssh -L {DEFAULT_DASHBOARD_PORT}:localhost:{DEFAULT_DASHBOARD_PORT} HEAD, or kubectl "
                        f"port-forward) with --address http://127.0.0.1:{DEFAULT_DASHBOARD_PORT}; or pass --insecure "
                        f"on a network you trust")
    return {"Authorization": f"Bearer {token}"}


def dashboard_url(address: str | None) -> str:
    """http://HOST:PORT of a cluster's dashboard from what a user types (URL, host:port or host)."""
    if not address:
        raise UserError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    if address.startswith("ray://") or address == "auto":
        raise UserError(f"--address '{address}' is not a dashboard address; the Jobs API needs "
                        f"http://HOST:{DEFAULT_DASHBOARD_PORT} (the head node's dashboard)")
    return f"http://{address if ':' in address else f'{address}:{DEFAULT_DASHBOARD_PORT}'}"


def jobs_client(address: str | None):
    """A JobSubmissionClient for the cluster, with a clear error when nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    headers = auth_headers(url)
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as exc:  # ConnectionError, or Ray's auth error with its own advice
        raise UserError(f"cannot reach the Ray Jobs API at {url}: {first_line(exc)}\n"
                        f"  Is the cluster up and its dashboard on? With token auth, set RAY_AUTH_MODE=token and "
                        f"RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or run `ray get-auth-token`).") from None


def get_json(url: str, timeout: float = 10.0):
    """GET a dashboard endpoint with the auth header; the decoded JSON."""
    request = urllib.request.Request(url, headers=auth_headers(url))
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def list_alive_nodes(url: str) -> list[dict]:
    """The cluster's alive nodes from the dashboard's state API (node_id, node_ip, resources_total)."""
    data = get_json(f"{url}/api/v0/nodes?limit=1000&detail=true")
    nodes = data.get("data", {}).get("result", {}).get("result", [])
    return [n for n in nodes if n.get("state") == "ALIVE"]

