"""Cluster pieces without a cluster: resource fitting, placement, submission packages, secrets,
auth headers, and the device rule of every collective."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, job_dict
from launcher.jobfile import parse_job, resolve
from launcher.resources import NodeResources, placement_problem, worker_bundle, workers_that_fit


def scaling(**values):
    return parse_job({**job_dict(Path("/d")), "scaling": values}).scaling


def nodes(*cpus: float, gpus: float = 0) -> list[NodeResources]:
    return [NodeResources(f"{i:040x}", f"10.0.0.{i}", {"CPU": c, "GPU": gpus, "memory": 1e9})
            for i, c in enumerate(cpus)]


# -- what fits where ---------------------------------------------------------------------------

def test_bundles_fit_node_by_node_not_by_the_cluster_total():
    bundle = {"CPU": 2.0}
    assert workers_that_fit({"CPU": 3.0}, bundle) == 1
    # 3 + 3 CPUs hold two 2-CPU workers, not three, although the cluster has 6 CPUs.
    assert placement_problem(nodes(3, 3), workers=2, bundle=bundle, placement="pack") is None
    problem = placement_problem(nodes(3, 3), workers=3, bundle=bundle, placement="pack")
    assert "asks for 3 workers × {CPU 2}" in problem and "can hold at most 2" in problem


def test_strict_spread_needs_a_node_per_worker():
    assert placement_problem(nodes(4), workers=2, bundle={"CPU": 1.0}, placement="spread") is None
    problem = placement_problem(nodes(4), workers=2, bundle={"CPU": 1.0}, placement="strict_spread")
    assert "on separate nodes" in problem and "at most 1" in problem
    assert placement_problem(nodes(1, 1), workers=2, bundle={"CPU": 1.0}, placement="strict_spread") is None


def test_gpu_workers_need_gpus_and_the_accelerator_type():
    spec = scaling(num_workers=2, use_gpu=True, gpus_per_worker=1, accelerator_type="H100")
    bundle = worker_bundle(spec)
    assert bundle == {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    assert "GPU" in placement_problem(nodes(8, 8), workers=2, bundle=bundle, placement="pack")
    h100 = [NodeResources("a" * 40, "10.0.0.9", {"CPU": 8, "GPU": 2, "accelerator_type:H100": 1})]
    assert placement_problem(h100, workers=2, bundle=bundle, placement="pack") is None
    assert "accelerator H100" in placement_problem(nodes(8, gpus=4), workers=2, bundle=bundle, placement="pack")


def test_scaling_config_carries_placement_resources_and_accelerator():
    from launcher.run import scaling_config

    config = scaling_config(scaling(num_workers=3, cpus_per_worker=2, placement="strict_spread"))
    assert config.num_workers == 3 and config.placement_strategy == "STRICT_SPREAD"
    assert config.resources_per_worker == {"CPU": 2.0} and not config.use_gpu
    config = scaling_config(scaling(use_gpu=True, gpus_per_worker=1, accelerator_type="A100"))
    assert config.resources_per_worker == {"CPU": 1.0, "GPU": 1.0} and config.accelerator_type == "A100"


def test_the_process_group_timeout_is_the_jobs():
    from launcher.jobfile import JobErrors
    from launcher.run import torch_config

    assert (torch_config(scaling()).backend, torch_config(scaling()).timeout_s) == ("gloo", 1800)
    config = torch_config(scaling(use_gpu=True, collective_timeout_s=7200))
    assert (config.backend, config.timeout_s) == ("nccl", 7200)
    with pytest.raises(JobErrors, match="scaling.collective_timeout_s"):
        scaling(collective_timeout_s=5)


def test_gpu_fields_without_use_gpu_are_refused_and_a_resolved_job_reloads():
    from launcher.jobfile import JobErrors, dump_job

    with pytest.raises(JobErrors, match="gpus_per_worker needs scaling.use_gpu: true"):
        scaling(gpus_per_worker=2)
    for value in (2, 0.5):  # the model would land on another rank's GPU, or two ranks share one
        with pytest.raises(JobErrors, match=f"scaling.gpus_per_worker: {value:g} is not supported; each worker trains "
                                            f"on one GPU"):
            scaling(use_gpu=True, gpus_per_worker=value)
    with pytest.raises(JobErrors, match="placement"):
        scaling(placement="scatter")
    import yaml

    spec = parse_job(job_dict(Path("/d")))
    assert parse_job(yaml.safe_load(dump_job(spec))).scaling == spec.scaling  # every field written, still valid


# -- submission --------------------------------------------------------------------------------

def test_the_package_ships_code_and_job_and_keeps_secrets_out_of_metadata(tmp_path, monkeypatch):
    from launcher import submit

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_secret")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/local")
    spec = resolve(parse_job(job_dict(Path("/d"))))
    folder = tmp_path / "pkg"
    folder.mkdir()
    submit.package(spec, folder, "mtl-x-1", forward="missing")
    assert (folder / "launcher" / "cli.py").exists() and (folder / "trainer" / "loop.py").exists()
    assert (folder / "ds_configs" / "zero3.json").exists()  # shipped names resolve on the cluster too
    assert not list(folder.rglob("__pycache__"))
    job = (folder / ".mtl" / "job.yaml").read_text()
    assert "deepspeed: .mtl/deepspeed.json" in job and "secret" not in job
    assert json.loads((folder / ".mtl" / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    env_file = folder / ".mtl" / "env.json"
    assert json.loads(env_file.read_text()) == {"HF_TOKEN": "hf_secret", "AWS_SECRET_ACCESS_KEY": "aws_secret",
                                                "__mode__": "missing"}
    assert env_file.stat().st_mode & 0o077 == 0
    # Without --forward-credentials no secret leaves this machine, and two packages of one job differ
    # (a node's cache of one never serves another's files).
    again = tmp_path / "again"
    again.mkdir()
    submit.package(spec, again, "mtl-x-2")
    assert not (again / ".mtl" / "env.json").exists()
    assert (again / ".mtl" / "submission.json").read_text() != (folder / ".mtl" / "submission.json").read_text()
    assert "not forwarded: AWS_SECRET_ACCESS_KEY, HF_TOKEN" in submit.credential_notes(None)[0]
    # What Ray shows as the job's runtime_env: no secret, and no local path for a remote cluster.
    remote, local = submit.public_env(on_this_machine=False), submit.public_env(on_this_machine=True)
    assert remote["HF_HUB_OFFLINE"] == "1" and "TORCH_EXTENSIONS_DIR" not in remote
    assert local["TORCH_EXTENSIONS_DIR"] == "/somewhere/local"
    assert not {"HF_TOKEN", "AWS_SECRET_ACCESS_KEY"} & set(local)


def test_forwarded_secrets_fill_only_what_the_node_lacks_and_the_file_is_gone_once_read(tmp_path, monkeypatch):
    from trainer.job_env import JOB_ENV_FILE, load_job_env

    (tmp_path / ".mtl").mkdir()
    (tmp_path / JOB_ENV_FILE).write_text(json.dumps({"MTL_TEST_A": "from-job", "MTL_TEST_B": "from-job"}))
    monkeypatch.setenv("MTL_TEST_B", "node-own")
    monkeypatch.delenv("MTL_TEST_A", raising=False)
    assert load_job_env(str(tmp_path)) == ["MTL_TEST_A"]
    assert os.environ["MTL_TEST_A"] == "from-job" and os.environ["MTL_TEST_B"] == "node-own"
    assert not (tmp_path / JOB_ENV_FILE).exists()  # not left in the node's working-dir cache
    monkeypatch.delenv("MTL_TEST_A")
    assert load_job_env(str(tmp_path / "elsewhere")) == []


AWS_NODE_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                    "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "AWS_PROFILE")


@pytest.fixture
def bare_aws_node(monkeypatch, tmp_path):
    """A node with no AWS credentials of its own (and no metadata service to ask)."""
    from trainer import job_env

    for key in AWS_NODE_SOURCES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    job_env.node_aws_credentials.cache_clear()
    yield job_env
    job_env.node_aws_credentials.cache_clear()


FORWARDED_AWS = {"AWS_ACCESS_KEY_ID": "AKIAFORWARDED", "AWS_SECRET_ACCESS_KEY": "fwd-secret",
                 "AWS_SESSION_TOKEN": "fwd-session"}


def test_forwarded_aws_keys_never_override_a_role_the_node_has_unless_asked(bare_aws_node, monkeypatch, capsys):
    job_env = bare_aws_node
    # IRSA: a web identity the SDK renews by itself; forwarded keys would win over it in the chain.
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token")
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::1:role/node")
    assert job_env.apply_secrets(FORWARDED_AWS) == []
    assert "AWS_ACCESS_KEY_ID" not in os.environ
    assert "own (web identity (IRSA))" in capsys.readouterr().err
    assert job_env.apply_secrets(FORWARDED_AWS, override=True) == list(FORWARDED_AWS)
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIAFORWARDED"


def test_forwarded_aws_keys_go_together_where_the_node_has_none(bare_aws_node, monkeypatch):
    job_env = bare_aws_node
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-stale-token-of-the-node")  # no key pair: not a credential
    assert job_env.apply_secrets(FORWARDED_AWS) == list(FORWARDED_AWS)
    assert os.environ["AWS_SESSION_TOKEN"] == "fwd-session"
    job_env.node_aws_credentials.cache_clear()
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    assert job_env.apply_secrets({k: v for k, v in FORWARDED_AWS.items() if k != "AWS_SESSION_TOKEN"}) == []
    assert "AWS_SESSION_TOKEN" not in os.environ  # the node's pair (set above) stays whole


def test_no_secret_enters_the_runtime_env_ray_shows(monkeypatch):
    from launcher.run import worker_env

    for key, value in {"WANDB_API_KEY": "wandb-secret", "MLFLOW_TRACKING_TOKEN": "mlflow-secret",
                       "MLFLOW_TRACKING_PASSWORD": "pw", "WANDB_PROJECT": "p", "MLFLOW_TRACKING_URI": "http://m",
                       "HF_TOKEN": "hf"}.items():
        monkeypatch.setenv(key, value)
    env = worker_env(use_gpu=False)
    assert env["WANDB_PROJECT"] == "p" and env["MLFLOW_TRACKING_URI"] == "http://m"
    assert not {"WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"} & set(env)


def test_remote_submissions_name_the_paths_only_this_machine_has():
    from launcher.submit import local_only_paths

    spec = resolve(parse_job(job_dict(Path("/data"))))
    lines = "\n".join(local_only_paths(spec))
    assert "tasks.sentiment.data.train /data/sentiment/train.jsonl" in lines and "storage.path" in lines
    spec.storage.path = "s3://bucket/runs"
    assert "storage.path" not in "\n".join(local_only_paths(spec))


def test_dashboard_addresses_and_auth_headers(tmp_path, monkeypatch):
    from launcher.ray_auth import auth_headers, dashboard_url
    from trainer.errors import UserError

    assert dashboard_url("http://head:8265/") == "http://head:8265"
    assert dashboard_url("head") == "http://head:8265" and dashboard_url("10.0.0.1:9000") == "http://10.0.0.1:9000"
    with pytest.raises(UserError, match="not a dashboard address"):
        dashboard_url("ray://head:10001")
    with pytest.raises(UserError, match="--address"):
        dashboard_url(None)
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers("http://127.0.0.1:8265") == {}
    token = tmp_path / "token"
    token.write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert auth_headers("http://127.0.0.1:8265") == {"Authorization": "Bearer abc"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "xyz")
    assert auth_headers("http://127.0.0.1:8265") == {"Authorization": "Bearer xyz"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers("http://127.0.0.1:8265") == {}


def test_a_submitted_driver_does_not_repeat_the_jobs_env_vars(monkeypatch):
    from launcher.run import submitted_job_env

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert submitted_job_env() == set()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}, "working_dir": "x"}}))
    assert submitted_job_env() == {"HF_HUB_OFFLINE"}


def test_rank_placement_is_read_from_worker_lines():
    from launcher.submit import rank_placement

    logs = ("(RayTrainWorker pid=1) [mtl] rank 1 of 2 on node ab12 at 10.0.0.2 (h, cpu, 1 threads)\n"
            "(RayTrainWorker pid=2) [mtl] rank 0 of 2 on node cd34 at 10.0.0.1 (h, cpu, 1 threads)\n")
    assert rank_placement(logs) == {0: ("cd34", "10.0.0.1"), 1: ("ab12", "10.0.0.2")}


# -- collectives run on the worker's device ----------------------------------------------------

class NcclLikeAllReduce:
    """Stands in for NCCL: refuses a tensor that is not on the process group's device."""

    def __init__(self, device: torch.device):
        self.device, self.seen = device, []

    def __call__(self, tensor, *args, **kwargs):
        if tensor.device != self.device:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        self.seen.append(tensor.device)


def test_step_statistics_are_reduced_on_the_workers_device(monkeypatch):
    import torch.distributed as dist

    from trainer.reporting import StepStats

    device = torch.device("meta")  # any device but the CPU the counters live on
    fake = NcclLikeAllReduce(device)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", fake)
    stats = StepStats(["a", "b"])
    stats.add("a", torch.tensor(0.5), {"attention_mask": torch.ones(2, 3)})
    # The sums come back to the CPU after the reduction; a meta tensor has no values to copy back.
    with pytest.raises(NotImplementedError):
        stats.reduce(device)
    assert fake.seen == [device]
    with pytest.raises(RuntimeError, match="device type cpu"):  # what NCCL said before the fix
        fake(stats.values)


def test_a_step_reads_nothing_back_from_the_device_until_its_end():
    """The host never waits on a micro-batch: its loss stays on the device (here the meta device,
    which refuses any read) until the step's statistics are reduced."""
    from trainer.loop import run_plan

    class Engine:
        def __call__(self, task, batch, weight, touch_heads=True):
            loss = torch.tensor(0.7, device="meta")
            return loss, loss * weight

        def backward(self, weighted):
            pass

        def step(self):
            pass

    class Stream:
        def next_batch(self):
            return {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5),
                    "labels": torch.tensor([[-100, -100, 3, 4, 5]] * 2)}

    stats = run_plan(Engine(), {"a": 3, "b": 2}, {"a": Stream(), "b": Stream()}, {"a": 1.0, "b": 0.5}, ["a", "b"],
                     "cpu", encoding="causal")
    assert stats.losses.device.type == "meta"
    # micro-batches, scored target tokens (3 a row), rows, real and padded tokens: from the host batches
    assert stats.counts.tolist() == [[3, 18, 6, 30, 30], [2, 12, 4, 20, 20]]
    with pytest.raises(NotImplementedError):  # the one read, at the step's end
        stats.reduce("cpu")


def test_a_decoders_first_target_column_is_found_on_the_host(causal_dir, tokenizer):
    from trainer.loop import with_first_target
    from trainer.model.models import build_model

    torch.manual_seed(0)
    model = build_model(kind="text2text", encoding="causal", name_or_path=str(causal_dir), heads=[]).eval()
    ids = tokenizer(["the film was great positive", "the plot was dull negative"], return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        asked = model("lm", dict(batch))[0]
        given = model("lm", with_first_target(dict(batch)))[0]
    assert with_first_target(dict(batch))["first_target"] == 3 and torch.equal(asked, given)


def test_no_collective_is_called_outside_the_collectives_module():
    calls = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "reduce",
             "gather", "scatter", "barrier", "reduce_scatter"}
    offenders = []
    for path in (REPO / "trainer").rglob("*.py"):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls:
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id in ("dist", "torch"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {owner.id}.{node.func.attr}")
                if isinstance(owner, ast.Attribute) and owner.attr == "distributed":
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} torch.distributed.{node.func.attr}")
    assert not offenders, offenders


# -- storage a whole cluster reaches -----------------------------------------------------------

def test_storage_uris_open_through_pyarrow_or_fail_clearly(tmp_path):
    import pyarrow.fs as pafs

    from trainer.spec import StorageSpec
    from trainer.errors import SpecError
    from trainer.versions.storage import open_storage

    gcs = open_storage(StorageSpec(path="gs://bucket/mtl-runs"))
    assert isinstance(gcs.fs, pafs.GcsFileSystem) and gcs.path("x") == "bucket/mtl-runs/x"
    with pytest.raises(SpecError, match="storage.path: cannot open 'foo://bucket/x': Unrecognized filesystem"):
        open_storage(StorageSpec(path="foo://bucket/x"))
    local = open_storage(StorageSpec(path=str(tmp_path / "runs")))
    assert isinstance(local.fs, pafs.LocalFileSystem) and (tmp_path / "runs").is_dir()


def test_fp32_training_loads_a_bf16_checkpoint_in_fp32(tmp_path, model_dir):
    """transformers 5 loads with dtype="auto": a bf16 hub checkpoint would otherwise train in bf16."""
    from transformers import AutoModel

    from trainer.model.models import HeadSpec, build_model

    AutoModel.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert AutoModel.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16  # what "auto" gives
    model = build_model(kind="heads", encoding="heads", name_or_path=str(tmp_path / "bf16"),
                        heads=[HeadSpec("s", "classification", 2)])
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_s3_keys_from_the_environment_travel_with_the_pickled_filesystem(monkeypatch):
    """Ray pickles the storage filesystem to its controller and workers, whose environment may lack the keys."""
    import pickle

    from trainer.spec import StorageSpec
    from trainer.versions.storage import open_storage

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    spec = StorageSpec(path="s3://bucket/runs", endpoint_url="http://127.0.0.1:1", region="us-east-1")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    assert open_storage(spec).fs.__reduce__()[1][0]["access_key"] is None  # each node uses its own credentials
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SKTEST")
    fs = pickle.loads(pickle.dumps(open_storage(spec).fs))
    options = fs.__reduce__()[1][0]
    assert options["access_key"] == "AKTEST" and options["secret_key"] == "SKTEST"
    assert options["endpoint_override"] == "127.0.0.1:1" and options["scheme"] == "http"


def test_auto_precision_takes_bf16_only_where_every_rank_computes_it_natively(monkeypatch):
    from trainer.model import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    assert precision.agreed_precision("auto", cpu) == ("fp32", "train.precision auto: fp32, since bf16 is "
                                                               "emulated on this CPU (no AMX / AVX512-BF16)")
    chosen, warning = precision.agreed_precision("bf16", cpu)
    assert chosen == "bf16" and "dozens of times slower" in warning
    assert precision.agreed_precision("fp32", cpu) == ("fp32", None)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert precision.agreed_precision("auto", cpu) == ("bf16", None)
    # One rank without bf16 instructions makes every rank fall back (their DeepSpeed configs must agree).
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    other_rank = iter([1.0, 0.0])  # what the other rank adds: itself to the count, "not fast" to the flags
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: t.add_(next(other_rank)))
    assert precision.agreed_precision("auto", cpu)[0] == "fp32"


def test_a_worker_with_credentials_of_its_own_writes_with_them_not_the_drivers(bare_aws_node, monkeypatch):
    """The driver's keys (a session token that expires) travel pickled in Ray's filesystem; a node
    with its own renewing credentials (here IRSA) opens the bucket with its own chain."""
    from trainer.spec import StorageSpec
    from trainer.versions.storage import open_storage, worker_filesystem

    spec = StorageSpec(path="s3://bucket/runs", endpoint_url="http://127.0.0.1:1", region="us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKDRIVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SKDRIVER")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "driver-session")
    drivers = open_storage(spec).fs
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key)
    assert worker_filesystem(spec, drivers) is drivers  # a node with nothing of its own: the driver's keys
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token")
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::1:role/node")
    bare_aws_node.node_aws_credentials.cache_clear()
    own = worker_filesystem(spec, drivers)
    assert own.__reduce__()[1][0]["access_key"] is None  # the SDK's chain on this node, which renews
    local = StorageSpec(path="/shared/runs")
    assert worker_filesystem(local, drivers) is drivers
