"""Every shipped cluster config parses and holds what the project relies on."""

from __future__ import annotations

import copy

import re

import pytest
import yaml

from conftest import REPO

CONFIGS = REPO / "cluster_configs"


def load_all(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_every_cluster_config_is_covered_by_a_test():
    shipped = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*") if p.is_file()}
    assert shipped == {"local.yaml", "aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                       "kuberay/Dockerfile"}


def test_local_layout_is_what_multinode_reads():
    from launcher.multinode import LAYOUT_KEYS, read_layout

    layout = read_layout(CONFIGS / "local.yaml")
    assert set(layout) == LAYOUT_KEYS
    assert layout["nodes"] >= 2 and layout["placement"] in ("spread", "strict_spread")


def test_a_wrong_layout_key_is_named(tmp_path):
    from launcher.multinode import read_layout
    from trainer.errors import UserError

    bad = tmp_path / "layout.yaml"
    bad.write_text("nodes: 2\nnode_count: 3\n")
    with pytest.raises(UserError, match="unknown key.*node_count"):
        read_layout(bad)


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_cloud_launcher_configs(name, provider):
    (config,) = load_all(CONFIGS / name)
    assert config["provider"]["type"] == provider
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert workers and all(w["max_workers"] >= 1 for w in workers)
    node_text = yaml.safe_dump(head["node_config"])
    assert "GPU" not in head.get("resources", {}) and "guestAccelerators" not in node_text
    assert not re.search(r"InstanceType: (g|p)\d", node_text) and "a2-" not in node_text  # no GPU head
    worker_text = yaml.safe_dump(workers[0]["node_config"])
    assert re.search(r"InstanceType: (g|p)\d|a2-highgpu|guestAccelerators", worker_text)  # GPU workers
    # Installed the way `make setup` installs it; the project synced without local junk; token auth on.
    assert any("make setup" in c for c in config["setup_commands"])
    assert {".venv", "data", "runs"} <= set(config["rsync_exclude"])
    assert "/home/ubuntu/mtl" in config["file_mounts"]
    assert any("auth_token" in k for k in config["file_mounts"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    assert any(".[cluster]" in c for c in config["setup_commands"])  # the autoscaler's cloud SDK on the head
    # Ray's own preparation and schema (what `ray up` runs first) take it as it is.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))
    images = re.findall(r"(?:ImageId|sourceImage): (\S+)", yaml.safe_dump(config))
    assert images and "latest_dlami" not in images  # Ray maps that to Ubuntu 18.04: no Python 3.10 there
    assert all("22.04" in image or "2204" in image for image in images)


def pod_specs(ray_cluster_spec: dict) -> list[dict]:
    return [ray_cluster_spec["headGroupSpec"]["template"]["spec"],
            *(group["template"]["spec"] for group in ray_cluster_spec["workerGroupSpecs"])]


def check_pods(ray_cluster_spec: dict, accounts: set[str], stop_grace_s: float) -> None:
    """Every pod runs as a ServiceAccount the manifest creates, has the grace to write a version on
    SIGTERM, and the workers stage version shards on an emptyDir named by MTL_SCRATCH_DIR."""
    for pod in pod_specs(ray_cluster_spec):
        assert pod["serviceAccountName"] in accounts
        assert pod["terminationGracePeriodSeconds"] >= stop_grace_s + 30
        # SIGTERM reaches the workers: the kubelet signals only the container's first process
        for container in pod["containers"]:
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            assert command[:3] == ["python", "-m", "launcher.prestop"]
            grace = float(command[command.index("--grace") + 1])
            assert stop_grace_s <= grace <= pod["terminationGracePeriodSeconds"] - 30
    for group in ray_cluster_spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        scratch = {e["name"]: e["value"] for e in container["env"]}["MTL_SCRATCH_DIR"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == scratch]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert "emptyDir" in volume


def test_kuberay_cluster_and_job():
    from trainer.spec import TrainSpec

    account, cluster = load_all(CONFIGS / "kuberay" / "raycluster.yaml")
    assert account["kind"] == "ServiceAccount"
    check_pods(cluster["spec"], {account["metadata"]["name"]}, TrainSpec().stop_grace_s)
    assert cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] >= 8  # the shipped hub job's GPU workers
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["authOptions"]["mode"] == "token"
    assert cluster["spec"]["rayVersion"].startswith("2.6")
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"

    account, config_map, job = load_all(CONFIGS / "kuberay" / "rayjob.yaml")
    assert account["kind"] == "ServiceAccount" and config_map["kind"] == "ConfigMap" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("mtl train /home/ray/jobs/job.yaml")
    assert job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    mounts = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "job", "mountPath": "/home/ray/jobs"} in mounts
    # The job it runs is a valid job: storage every pod reaches, spread GPU workers.
    from launcher.jobfile import parse_job

    spec = parse_job(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert spec.storage.path.startswith("s3://") and spec.scaling.use_gpu and spec.scaling.placement == "spread"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]
    assert spec.scaling.num_workers == workers  # one GPU worker per pod
    check_pods(job["spec"]["rayClusterSpec"], {account["metadata"]["name"]}, spec.train.stop_grace_s)
    assert "kubectl logs -f job/mtl-t5 " in (CONFIGS / "kuberay" / "rayjob.yaml").read_text()  # KubeRay's submitter Job


def test_the_image_installs_like_make_setup():
    text = (CONFIGS / "kuberay" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in text
    assert text.index("pip install --no-cache-dir torch==2.13.0") < text.index("-c requirements.lock")
    assert "-e '.[tracking]'" in text  # what `make setup` installs besides the test tools
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "data", "runs", ".cache", ".git"} <= ignored


def test_kuberay_manifests_use_only_fields_of_kuberays_crds():
    """Every field of the RayCluster and RayJob manifests is one KubeRay v1.5.1's CRDs define (pod
    templates included: they are Kubernetes' PodTemplateSpec); a misspelt one would be dropped or refused."""
    import copy

    from tests.support.crd_fields import load, unknown_fields

    crds = load()
    manifests = [doc for name in ("raycluster.yaml", "rayjob.yaml")
                 for doc in load_all(CONFIGS / "kuberay" / name) if doc["kind"] in crds]
    assert {doc["kind"] for doc in manifests} == {"RayCluster", "RayJob"}
    for doc in manifests:
        assert unknown_fields(doc["spec"], crds[doc["kind"]]["p"]["spec"], "spec") == [], doc["kind"]
    wrong = copy.deepcopy(next(doc for doc in manifests if doc["kind"] == "RayJob"))
    pod = wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["terminationGracePeriod"] = pod.pop("terminationGracePeriodSeconds")
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 1
    assert unknown_fields(wrong["spec"], crds["RayJob"]["p"]["spec"], "spec") == [
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.terminationGracePeriod",
        "spec.rayClusterSpec.workerGroupSpecs[0].replica"]
