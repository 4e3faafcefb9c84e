"""Under ZeRO-3 the model is built partitioned (zero.Init through transformers), never whole.

One process group of one rank, as a worker has: each parameter is then a ZeRO partition whose
local tensor is empty outside a gather, which is what every rank sees of the weights it does
not own. Gathered, the partitioned model must equal the model built whole.
"""

from __future__ import annotations

import pytest
import torch

from trainer.loop_setup import skip_inference_comm_op
from trainer.model.ds_config import MODEL_SIZED_KEYS, build_ds_config, fill_model_sizes, read_ds_config
from trainer.model.models import HeadSpec, build_model, hidden_size, is_partitioned, param_groups

from conftest import REPO


@pytest.fixture
def one_rank(tmp_path, monkeypatch):
    import deepspeed
    import torch.distributed as dist

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)  # what Ray Train sets for each worker

    skip_inference_comm_op()  # as a worker does: DeepSpeed would JIT-build an op training never uses
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
        # DeepSpeed keeps the groups it cloned for the process: the next test's group is a new one.
        from deepspeed.utils import groups

        groups._WORLD_GROUP = groups._DATA_PARALLEL_GROUP = groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


def zero3_config(hidden: int, precision: str = "fp32", keep: dict | None = None) -> dict:
    config = build_ds_config(read_ds_config(str(REPO / "ds_configs" / "zero3.json")), micro_batch_size=2,
                             micro_batches_per_step=1, world_size=1, max_grad_norm=1.0, precision=precision)
    return fill_model_sizes(config, hidden, keep=keep)


def test_auto_sizes_follow_the_hidden_size_and_fall_back_to_deepspeeds_defaults():
    config = zero3_config(32)["zero_optimization"]
    assert {k: config[k] for k in MODEL_SIZED_KEYS} == {
        "reduce_bucket_size": 1024, "stage3_prefetch_bucket_size": 921, "stage3_param_persistence_threshold": 320,
        "stage3_max_live_parameters": 24576, "stage3_max_reuse_distance": 24576, "sub_group_size": 12288}
    unknown = fill_model_sizes({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                      "stage3_prefetch_bucket_size": 1000}}, None)
    assert unknown["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 1000}  # a number is kept
    from transformers import BertConfig, EncoderDecoderConfig, GPT2Config

    pair = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(hidden_size=32), BertConfig(hidden_size=48))
    assert (hidden_size(pair), hidden_size(GPT2Config(n_embd=64))) == (48, 64)  # no hidden_size of its own


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


def test_init_from_weights_load_into_a_partitioned_model_one_module_at_a_time(one_rank, model_dir, monkeypatch):
    import deepspeed

    from trainer.versions.init_from import fit_by_name, load_module_by_module

    heads = [HeadSpec("sentiment", "classification", 2)]
    torch.manual_seed(1)
    source = build_model(kind="heads", encoding="heads", name_or_path=str(model_dir), heads=heads)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)  # weights a run trained
    target = build_model(kind="heads", encoding="heads", name_or_path=str(model_dir), heads=heads,
                         ds_config=zero3_config(32))
    problem, missing, unexpected = fit_by_name(target, source.state_dict())
    assert problem is None and not missing and not unexpected
    other = {**source.state_dict(), "heads.sentiment.out.weight": torch.zeros(3, 32)}  # 3 labels there
    assert fit_by_name(target, other)[0] == "heads.sentiment.out.weight is (3, 32) there and (2, 32) here"
    gathered_at_once = []
    real = deepspeed.zero.GatheredParameters

    def counting(params, *args, **kwargs):
        params = list(params)
        gathered_at_once.append(sum(p.ds_numel for p in params if is_partitioned(p)))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", counting)
    load_module_by_module(target, source.state_dict())
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", real)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in source.modules())
    assert max(gathered_at_once) == largest  # one module's parameters whole at a time, never the model
    with deepspeed.zero.GatheredParameters(list(target.parameters())):
        for name, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[name], value), name


def test_under_bf16_the_parts_built_whole_take_the_partitions_dtype(one_rank, model_dir):
    """zero.Init makes the pretrained partitions bf16; DeepSpeed casts nothing of a model that is
    partly partitioned, so heads, LoRA adapters and learned loss weights must follow here."""
    from trainer.control.weighting import UncertaintyWeighting

    model = build_model(kind="heads", encoding="heads", name_or_path=str(model_dir),
                        heads=[HeadSpec("sentiment", "classification", 2)],
                        loss_weighting=UncertaintyWeighting({"sentiment": 1.0}),
                        lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["query"]},
                        ds_config=zero3_config(32, precision="bf16"))
    dtypes = {name: (p.ds_tensor.dtype if is_partitioned(p) else p.dtype) for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, {n: d for n, d in dtypes.items() if d != torch.bfloat16}
    assert any("lora_" in n for n in dtypes) and any(n.startswith("loss_weighting.") for n in dtypes)


def test_a_resumed_version_keeps_its_sub_groups():
    """ZeRO-3's optimizer state is cut by sub_group_size: "auto" takes the resumed version's."""
    from trainer.loop_versions import saved_layout

    assert saved_layout({"optimizer_layout": {"sub_group_size": 12288}}, 3) == {"sub_group_size": 12288}
    assert saved_layout({}, 3) == {"sub_group_size": 1_000_000_000}  # written before it was recorded
    assert saved_layout({}, 2) == {}
    kept = zero3_config(32, keep={"sub_group_size": 1_000_000_000})["zero_optimization"]
    assert kept["sub_group_size"] == 1_000_000_000 and kept["reduce_bucket_size"] == 1024
    fixed = {"zero_optimization": {"stage": 3, "sub_group_size": 5000}}
    assert fill_model_sizes(fixed, 32, keep={"sub_group_size": 7})["zero_optimization"]["sub_group_size"] == 5000


def test_a_versions_whole_weights_are_gathered_one_parameter_at_a_time(one_rank, causal_dir, tmp_path, monkeypatch):
    """DeepSpeed's save_16bit_model gathers the whole model into rank 0's memory: a second model on
    a rank sized for a part of one. The streamed file must hold the same weights (the tied LM head
    included) while no gather ever holds more than one parameter."""
    import deepspeed

    from trainer.versions.whole_weights import FILE, read_whole_weights, write_gathered

    torch.manual_seed(3)
    whole = build_model(kind="text2text", encoding="causal", name_or_path=str(causal_dir), heads=[])
    torch.manual_seed(3)
    parted = build_model(kind="text2text", encoding="causal", name_or_path=str(causal_dir), heads=[],
                         ds_config=zero3_config(32))
    gathered_at_once = []
    real = deepspeed.zero.GatheredParameters

    def counting(params, *args, **kwargs):
        gathered_at_once.append(len(list(params)))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", counting)
    size = write_gathered(parted, tmp_path / FILE, rank=0)
    assert max(gathered_at_once) == 1 and size == (tmp_path / FILE).stat().st_size

    got, expected = read_whole_weights(tmp_path), whole.state_dict()
    assert got.keys() == expected.keys()
    assert "lm.lm_head.weight" in got and got["lm.lm_head.weight"] is got["lm.transformer.wte.weight"]  # stored once
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_fp32_zero3_keeps_one_copy_of_each_partition_and_trains_as_with_two(one_rank, causal_dir):
    """DeepSpeed clones every fp32 partition as its optimizer's master copy (its check that the two
    could be one compares a torch.device with a string). Shared, the steps must be the same."""
    import deepspeed

    from trainer.model.zero3_master import share_master_partitions

    def train(share: bool) -> tuple[int, dict, int]:
        torch.manual_seed(5)
        config = zero3_config(32)
        model = build_model(kind="text2text", encoding="causal", name_or_path=str(causal_dir), heads=[],
                            ds_config=config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        freed = share_master_partitions(engine.optimizer) if share else 0
        zero = engine.optimizer
        assert all((m.untyped_storage().data_ptr() == low.untyped_storage().data_ptr()) == share
                   for m, low in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat))
        ids = torch.arange(12).reshape(2, 6) % 20 + 3
        for _ in range(3):
            loss = engine.module.lm(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
        return freed, weights, sum(p.ds_numel for p in engine.module.parameters())

    freed, shared, parameters = train(share=True)
    _, cloned, _ = train(share=False)
    assert freed >= 4 * parameters * 0.9  # the clones: fp32, every parameter (one rank holds every partition)
    for name, value in cloned.items():
        assert torch.equal(shared[name], value), name


@pytest.mark.parametrize("stage", [1, 3])
def test_a_lora_version_holds_the_trained_parameters_only_tied_aliases_included(one_rank, causal_dir, tmp_path, stage):
    """GPT-2's LM head is tied to its (frozen) embeddings: DeepSpeed's exclude_frozen_parameters
    leaves that alias in (57 of the demo's 80 MiB)."""
    import deepspeed

    from trainer.versions import checkpoint as ckpt
    from trainer.model.ds_config import build_ds_config, read_ds_config
    from trainer.versions.whole_weights import read_whole_weights

    config = build_ds_config(read_ds_config(str(REPO / "ds_configs" / f"zero{stage}.json")), micro_batch_size=2,
                             micro_batches_per_step=1, world_size=1, max_grad_norm=1.0, precision="fp32")
    fill_model_sizes(config, 32)
    model = build_model(kind="text2text", encoding="causal", name_or_path=str(causal_dir), heads=[],
                        lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["c_attn"]}, ds_config=config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ckpt.write_rank_part(engine, tmp_path, 0, {}, trained_only=True)
    if stage == 3:  # DeepSpeed's files hold placeholders; the weights are gathered into weights/
        saved = read_whole_weights(tmp_path / ckpt.WHOLE_WEIGHTS)
    else:
        saved = torch.load(tmp_path / ckpt.MODEL_STATES, weights_only=False)["module"]
    assert saved and all("lora_" in name for name in saved), sorted(saved)[:4]
