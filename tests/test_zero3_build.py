"""Under ZeRO-3 the model is built partitioned (zero.Init through transformers), never whole.

One process group of one rank, as a worker has: each parameter is then a ZeRO partition whose
local tensor is empty outside a gather, which is what every rank sees of the weights it does
not own. Gathered, the partitioned model must equal the model built whole.
"""

from __future__ import annotations

import pytest
import torch

from trainer.ds_config import MODEL_SIZED_KEYS, build_ds_config, fill_model_sizes, read_ds_config
from trainer.models import HeadSpec, build_model, is_partitioned, param_groups

from conftest import REPO


@pytest.fixture
def one_rank(tmp_path, monkeypatch):
    import deepspeed
    import torch.distributed as dist

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)  # what Ray Train sets for each worker

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def zero3_config(hidden: int) -> dict:
    config = build_ds_config(read_ds_config(str(REPO / "ds_configs" / "zero3.json")), micro_batch_size=2,
                             micro_batches_per_step=1, world_size=1, max_grad_norm=1.0, precision="fp32")
    return fill_model_sizes(config, hidden)


def test_auto_sizes_follow_the_hidden_size_and_fall_back_to_deepspeeds_defaults():
    config = zero3_config(32)["zero_optimization"]
    assert {k: config[k] for k in MODEL_SIZED_KEYS} == {
        "reduce_bucket_size": 1024, "stage3_prefetch_bucket_size": 921, "stage3_param_persistence_threshold": 320,
        "stage3_max_live_parameters": 24576, "stage3_max_reuse_distance": 24576, "sub_group_size": 12288}
    unknown = fill_model_sizes({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                      "stage3_prefetch_bucket_size": 1000}}, None)
    assert unknown["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 1000}  # a number is kept


@pytest.mark.parametrize("kind", ["heads", "text2text"])
def test_zero3_builds_partitioned_with_the_pretrained_weights_and_seeded_heads(one_rank, model_dir, causal_dir, kind):
    import deepspeed
    from transformers.integrations import is_deepspeed_zero3_enabled

    folder, encoding = (model_dir, "heads") if kind == "heads" else (causal_dir, "causal")
    heads = [HeadSpec("sentiment", "classification", 2)] if kind == "heads" else []

    def build(ds_config=None):
        torch.manual_seed(7)
        return build_model(kind=kind, encoding=encoding, name_or_path=str(folder), heads=heads, ds_config=ds_config)

    whole, parted = build(), build(zero3_config(32))
    pretrained = parted.backbone if kind == "heads" else parted.lm
    assert all(is_partitioned(p) and p.numel() == 0 for p in pretrained.parameters())  # nothing held whole
    assert not any(is_partitioned(p) for p in parted.heads.parameters())  # DeepSpeed partitions them at initialize
    assert not is_deepspeed_zero3_enabled()  # later models in the process (evaluation) are built whole

    # Decay groups by full shape: a partition is flat, a matrix must stay decayed.
    def grouping(model):
        return [sorted(id_name[id(p)] for p in g["params"])
                for id_name in [{id(p): n for n, p in model.named_parameters()}]
                for g in param_groups(model, weight_decay=0.1, weighting_lr=0.01)]
    assert grouping(parted) == grouping(whole)

    expected = whole.state_dict()
    with deepspeed.zero.GatheredParameters(list(parted.parameters())):
        got = {k: v.clone() for k, v in parted.state_dict().items()}
    assert got.keys() == expected.keys()
    for name, value in expected.items():  # the checkpoint's weights, not initialised-and-forgotten ones
        assert torch.equal(got[name], value), name


def test_init_from_weights_load_into_a_partitioned_model(one_rank, model_dir):
    import deepspeed

    from trainer.init_from import whole_parameters

    heads = [HeadSpec("sentiment", "classification", 2)]
    torch.manual_seed(1)
    source = build_model(kind="heads", encoding="heads", name_or_path=str(model_dir), heads=heads)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)  # weights a run trained
    target = build_model(kind="heads", encoding="heads", name_or_path=str(model_dir), heads=heads,
                         ds_config=zero3_config(32))
    with whole_parameters(target):
        missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not missing and not unexpected
    with deepspeed.zero.GatheredParameters(list(target.parameters())):
        for name, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[name], value), name
