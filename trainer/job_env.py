"""Secrets a run needs (a hub token, storage keys, tracker keys), kept out of everything Ray shows.

Ray shows every runtime_env — a job's, and each actor's and task's — to anyone who can read
the dashboard or its state API, and Ray Train shows its train loop's config. No secret goes
into any of them. Secrets reach the processes that need them this way:

- `mtl submit --forward-credentials` writes the user's secrets into the job's package as
  `.mtl/env.json` (mode 0600). The job's driver reads it at start and removes it; each worker
  removes its node's copy of the package's file (Ray unpacks the package on every node that
  runs part of the job). Nothing forwards them without that flag: a cluster uses its own.
- The driver hands the secrets it has to its workers through Ray's object store: the train
  loop's config holds only an ObjectRef (`secrets_for_workers`, `receive_secrets`).
- On every node, a variable the node already has wins (the cluster's own configuration), and
  AWS keys are applied only where the node has no AWS credentials of its own (environment
  keys, a web identity, container credentials, a profile, an instance role): those renew
  themselves, forwarded keys never do. `--override-credentials` applies them anyway.
"""

from __future__ import annotations

import json
import os
import re
import sys
from functools import lru_cache

JOB_ENV_FILE = os.path.join(".mtl", "env.json")
MODE_KEY = "__mode__"  # in env.json: "missing" (the node's own win) or "override"
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
              "MLFLOW_TRACKING_PASSWORD")
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Names that hold a secret whatever their prefix: never copied into a runtime_env.
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
IMDS = "http://169.254.169.254"
IMDS_TIMEOUT_S = 1.0
_override = False  # the submission asked that forwarded secrets win over the nodes' own


def is_secret(name: str) -> bool:
    return name in SECRET_ENV or bool(_SECRET_NAME.search(name))


def load_job_env(folder: str = ".") -> list[str]:
    """A submitted job's driver: put the forwarded secrets into os.environ (see apply_secrets) and
    remove the file, so it does not outlive the job in the node's working-dir cache; the names set."""
    values = read_job_env_file(folder)
    if values is None:
        return []
    global _override
    _override = values.pop(MODE_KEY, "missing") == "override"
    return apply_secrets(values, override=_override)


def read_job_env_file(folder: str = ".") -> dict | None:
    """The package's forwarded secrets, removing the file as it is read; None when there is none."""
    path = os.path.join(folder, JOB_ENV_FILE)
    try:
        with open(path) as fh:
            values = json.load(fh)
    except FileNotFoundError:
        return None
    finally:
        discard(path)
    return values


def discard(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def apply_secrets(values: dict[str, str], *, override: bool = False) -> list[str]:
    """Set the given secrets in os.environ where the node lacks them (or all, with override); the names set.

    AWS keys go together or not at all: a forwarded session token beside the node's own key pair
    would be a credential neither side has."""
    aws = {k: str(v) for k, v in values.items() if k in AWS_KEYS and v}
    others = {k: str(v) for k, v in values.items() if k not in AWS_KEYS and k != MODE_KEY and v}
    applied = []
    for key, value in others.items():
        if override or key not in os.environ:
            os.environ[key] = value
            applied.append(key)
    if aws:
        own = None if override else node_aws_credentials()
        if own:
            print(f"[mtl] this node has AWS credentials of its own ({own}); the forwarded AWS keys are not "
                  f"used (`mtl submit --forward-credentials --override-credentials` uses them instead)", file=sys.stderr, flush=True)
        else:
            for key in AWS_KEYS:
                os.environ.pop(key, None)
            os.environ.update(aws)
            applied.extend(aws)
            node_aws_credentials.cache_clear()  # the node has these now
    return applied


@lru_cache(maxsize=1)
def node_aws_credentials() -> str | None:
    """Where this node's own AWS credentials come from, in the order the AWS SDKs look; None if none."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return "keys in the environment"
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") and env.get("AWS_ROLE_ARN"):
        return "web identity (IRSA)"
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "container credentials"
    if env.get("AWS_PROFILE"):
        return f"profile {env['AWS_PROFILE']}"
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    if os.path.isfile(shared):
        return f"shared credentials file {shared}"
    return instance_role()


def instance_role() -> str | None:
    """The EC2 instance role, asked of the instance metadata service (IMDSv2) in at most ~2 s;
    None off EC2 or with $AWS_EC2_METADATA_DISABLED."""
    import urllib.request

    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return None
    try:
        put = urllib.request.Request(f"{IMDS}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(put, timeout=IMDS_TIMEOUT_S) as response:
            token = response.read().decode()
        get = urllib.request.Request(f"{IMDS}/latest/meta-data/iam/security-credentials/",
                                     headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(get, timeout=IMDS_TIMEOUT_S) as response:
            role = response.read().decode().strip()
    except OSError:  # not on EC2, or no role attached
        return None
    return f"instance role {role}" if role else None


def secrets_for_workers() -> dict | None:
    """The secrets this driver has, as an ObjectRef for the train loop's config (Ray Train shows that
    config; an ObjectRef shows as its id); None when there are none."""
    from trainer.runtime import put_object

    values = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    return {"ref": put_object(values), "override": _override} if values else None


def receive_secrets(handle: dict | None) -> list[str]:
    """A worker: apply the driver's secrets (see apply_secrets) and remove this node's copy of the
    package's env.json, which only the driver reads; the names set."""
    # Ray Train moves a worker out of the package's folder; the code it runs came from there.
    discard(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), JOB_ENV_FILE))
    if not handle:
        return []
    from trainer.runtime import get_object

    return apply_secrets(get_object(handle["ref"]), override=bool(handle.get("override")))
