"""Secrets that `mtl submit` forwards to a job, kept out of the job's metadata.

Ray shows a job's runtime_env (its env_vars included) to anyone who can list jobs, so secrets
(HF_TOKEN, S3 credentials) travel instead in a file inside the job's package, which Ray
unpacks as the working directory of the job's driver and of every worker. Each of them reads
it once at start; a variable the node already has is left as it is (the cluster's own
configuration wins).
"""

from __future__ import annotations

import json
import os

JOB_ENV_FILE = os.path.join(".mtl", "env.json")


def load_job_env(folder: str = ".") -> list[str]:
    """Put the forwarded variables into os.environ; the names that were set."""
    path = os.path.join(folder, JOB_ENV_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        values = json.load(fh)
    added = []
    for key, value in values.items():
        if key not in os.environ:
            os.environ[key] = str(value)
            added.append(key)
    return added
