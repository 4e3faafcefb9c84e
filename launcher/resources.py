"""Can the cluster ever hold the workers a job asks for? Answered before Ray Train waits for them.

Ray Train waits for its placement group to become ready and, when it cannot, retries; on a
cluster that will never have the resources that is a run that never starts and never says
why. So the driver checks the request against the cluster's nodes first: bundle by bundle,
the way Ray places them (each worker's CPUs, GPUs and accelerator type on one node; with
strict_spread every worker on a different node). A cluster with an autoscaler is checked
against the most it may grow to; any other cluster gets `scaling.wait_for_nodes_s` for nodes
to join, then the run stops with what was asked and what the cluster has.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from trainer.errors import UserError

PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}
POLL_S = 2.0


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    address: str
    resources: dict[str, float]


class InsufficientResources(UserError):
    """The cluster cannot hold the workers the job asks for."""


def worker_bundle(scaling) -> dict[str, float]:
    """What one Ray Train worker reserves on its node (what ScalingConfig asks Ray for)."""
    bundle = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        bundle["GPU"] = float(scaling.gpus_per_worker)
        if scaling.accelerator_type:
            bundle[f"accelerator_type:{scaling.accelerator_type}"] = 0.001  # Ray's own convention
    return bundle


def workers_that_fit(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many bundles one node can hold at most."""
    counts = [math.floor(node.get(name, 0.0) / need + 1e-9) for name, need in bundle.items() if need > 0]
    return min(counts) if counts else 0


def placement_problem(nodes: list[NodeResources], *, workers: int, bundle: dict[str, float],
                      placement: str) -> str | None:
    """None when the nodes can hold `workers` bundles under `placement`, else why not."""
    fits = [workers_that_fit(n.resources, bundle) for n in nodes]
    if placement == "strict_spread":
        possible = sum(1 for f in fits if f >= 1)
    else:
        possible = sum(fits)
    if possible >= workers:
        return None
    asked = " + ".join(f"{_name(k)} {v:g}" for k, v in bundle.items())
    spread = " on separate nodes (placement strict_spread)" if placement == "strict_spread" else ""
    has = "; ".join(f"node {n.node_id[:12]} ({n.address}): " + ", ".join(
        f"{_name(k)} {v:g}" for k, v in sorted(n.resources.items()) if k in bundle or k in ("CPU", "GPU"))
        for n in nodes) or "no nodes"
    return (f"scaling asks for {workers} workers × {{{asked}}}{spread}, but the cluster can hold at most "
            f"{possible}: {len(nodes)} node(s) — {has}. Lower scaling.num_workers or scaling.cpus_per_worker/"
            f"gpus_per_worker, or add nodes")


def _name(resource: str) -> str:
    return resource.replace("accelerator_type:", "accelerator ")


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the connected Ray cluster and their total resources."""
    import ray

    return [NodeResources(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})))
            for n in ray.nodes() if n.get("Alive")]


def autoscaler_limits() -> dict[str, float] | None:
    """The most an autoscaling cluster may grow to, or None for a fixed cluster."""
    try:
        from ray._private import state as ray_state

        return ray_state.get_max_resources_from_cluster_config() or None
    except Exception:  # not an autoscaling cluster, or an older Ray without the helper
        return None


def require_resources(scaling, *, wait_s: float) -> None:
    """Return once the cluster can hold the workers; raise InsufficientResources within `wait_s`."""
    bundle = worker_bundle(scaling)
    limits = autoscaler_limits()
    if limits:
        # Nodes come as the run asks for them; only a request beyond the cluster's maximum is hopeless.
        needed = {k: v * scaling.min_workers for k, v in bundle.items()}
        short = {k: v for k, v in needed.items() if limits.get(k, 0.0) + 1e-9 < v}
        if short:
            raise InsufficientResources(
                "scaling asks for " + ", ".join(f"{_name(k)} {v:g}" for k, v in needed.items())
                + " in all, but this autoscaling cluster grows to at most "
                + ", ".join(f"{_name(k)} {limits.get(k, 0):g}" for k in short))
        return
    deadline = time.monotonic() + wait_s
    while True:
        problem = placement_problem(cluster_nodes(), workers=scaling.min_workers, bundle=bundle,
                                    placement=scaling.placement)
        if problem is None:
            return
        if time.monotonic() >= deadline:
            waited = f" (waited {wait_s:g}s for nodes to join)" if wait_s else ""
            raise InsufficientResources(problem + waited)
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
