"""The multitask model: per-task heads on one backbone, weighted losses, no stale head gradients."""

from __future__ import annotations

import pytest
import torch

from trainer.model.models import (
    HeadSpec,
    MultiTaskModel,
    build_model,
    group_lr_factors,
    heads_apart,
    lr_factor,
    param_groups,
)
from trainer.control.weighting import UncertaintyWeighting


def batch(tokenizer, texts, labels=None):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    if labels is not None:
        out["labels"] = torch.tensor(labels)
    return out


@pytest.fixture
def heads_model(model_dir):
    torch.manual_seed(0)
    return build_model(kind="heads", encoding="heads", name_or_path=str(model_dir),
                       heads=[HeadSpec("a", "classification", 2), HeadSpec("b", "classification", 3),
                              HeadSpec("q", "extractive_qa", 0)])


def test_heads_forward_weights_the_loss_and_zeroes_other_heads_gradients(heads_model, tokenizer):
    b = batch(tokenizer, ["great film", "dull plot"], [1, 0])
    loss, weighted = heads_model("a", b, weight=2.5)
    assert weighted.item() == pytest.approx(2.5 * loss.item())
    weighted.backward()
    assert heads_model.heads["a"].out.weight.grad.abs().sum() > 0
    for other in ("b", "q"):  # present and exactly zero: ZeRO-3 would otherwise re-apply a stale gradient
        grad = heads_model.heads[other].out.weight.grad
        assert grad is not None and torch.count_nonzero(grad) == 0


def test_uncertainty_weighting_is_part_of_the_model(model_dir, tokenizer):
    weighting = UncertaintyWeighting({"a": 1.0})
    model = build_model(kind="heads", encoding="heads", name_or_path=str(model_dir),
                        heads=[HeadSpec("a", "classification", 2)], loss_weighting=weighting)
    assert any(n.startswith("loss_weighting.") for n, _ in model.named_parameters())
    groups = param_groups(model, weight_decay=0.1, weighting_lr=0.5)
    assert groups[-1]["lr"] == 0.5 and groups[-1]["params"] == [weighting.log_vars]
    loss, weighted = model("a", batch(tokenizer, ["great"], [1]))
    assert weighted.item() == pytest.approx(loss.item())  # exp(-0) * L + 0


def test_text2text_forward_uses_the_lm_loss(seq2seq_dir, tokenizer):
    model = build_model(kind="text2text", encoding="seq2seq", name_or_path=str(seq2seq_dir), heads=[])
    assert isinstance(model, MultiTaskModel) and model.lm is not None
    b = batch(tokenizer, ["great film"])
    b["labels"] = torch.tensor([[5, 6, 3]])
    loss, weighted = model("anything", b, weight=0.5)
    assert weighted.item() == pytest.approx(0.5 * loss.item()) and loss.item() > 0


def test_causal_loss_projects_only_the_target_positions_and_equals_the_full_loss(causal_dir, tokenizer):
    """The decoder's logits start at the batch's first target; loss and gradients are the full ones."""
    model = build_model(kind="text2text", encoding="causal", name_or_path=str(causal_dir), heads=[])
    assert model._keeps_logits
    ids = torch.randint(5, 100, (3, 12))
    labels = torch.full((3, 12), -100)
    labels[0, 7:10], labels[1, 9:12], labels[2, 5:8] = ids[0, 7:10], ids[1, 9:12], ids[2, 5:8]
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    seen = []
    hook = model.lm.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    loss, _ = model("t", b)
    hook.remove()
    assert seen == [12 - 4]  # positions 4..11: position 4 predicts row 2's first target, token 5
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = model.lm(input_ids=ids, attention_mask=b["attention_mask"], labels=labels).loss
    full.backward()
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ours, model.parameters()))


def test_lr_schedules():
    linear, cosine, constant = (lr_factor(s, 2, 10) for s in ("linear", "cosine", "constant"))
    assert [linear(s) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    assert cosine(6) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert constant(9) == 1.0


def test_lora_trains_adapters_and_heads_only(model_dir, tokenizer):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}
    model = build_model(kind="heads", encoding="heads", name_or_path=str(model_dir),
                        heads=[HeadSpec("a", "classification", 2)], lora=lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("heads.") for n in trainable)
    assert any("lora_A" in n for n in trainable) and "heads.a.out.weight" in trainable
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("attention.self.query.base_layer.weight" in n for n in frozen)
    loss, weighted = model("a", batch(tokenizer, ["great"], [1]))
    weighted.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def grads_of(model, task: str, b: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    _, weighted = model(task, b)
    weighted.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["heads", "causal"])
def test_gradient_checkpointing_recomputes_the_same_gradients(kind, model_dir, causal_dir, tokenizer):
    folder, encoding, heads = ((model_dir, "heads", [HeadSpec("a", "classification", 2)]) if kind == "heads"
                               else (causal_dir, "causal", []))
    b = batch(tokenizer, ["great film", "dull plot , very dull"], [1, 0])
    if kind == "causal":
        b = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["input_ids"].clone()}
    built = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        built[checkpointing] = build_model(kind="heads" if kind == "heads" else "text2text", encoding=encoding,
                                           name_or_path=str(folder), heads=heads,
                                           gradient_checkpointing=checkpointing)
        built[checkpointing].train()
    base = built[True].backbone if kind == "heads" else built[True].lm
    assert base.is_gradient_checkpointing and not (built[False].backbone if kind == "heads"
                                                   else built[False].lm).is_gradient_checkpointing
    torch.manual_seed(1)  # the same dropout masks in both passes
    plain = grads_of(built[False], "a" if kind == "heads" else "lm", b)
    torch.manual_seed(1)
    recomputed = grads_of(built[True], "a" if kind == "heads" else "lm", b)
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_random_init_reads_only_the_config_and_follows_the_seed(model_dir, tmp_path):
    import shutil

    config_only = tmp_path / "config-only"
    shutil.copytree(model_dir, config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))

    def built(seed: int, init: str, where):
        torch.manual_seed(seed)
        model = build_model(kind="heads", encoding="heads", name_or_path=str(where), init=init,
                            heads=[HeadSpec("a", "classification", 2)])
        return model.backbone.embeddings.word_embeddings.weight

    pretrained = built(0, "pretrained", model_dir)
    assert torch.equal(built(0, "random", config_only), built(0, "random", config_only))
    assert not torch.equal(built(0, "random", config_only), built(1, "random", config_only))
    assert not torch.equal(built(7, "random", model_dir), pretrained)  # the folder's weights are not read


def test_the_attention_implementation_is_the_one_asked_for(model_dir, tokenizer):
    outputs = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = build_model(kind="heads", encoding="heads", name_or_path=str(model_dir),
                            heads=[HeadSpec("a", "classification", 2)], attn_implementation=implementation).eval()
        assert model.backbone.config._attn_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model.head_outputs("a", batch(tokenizer, ["great film", "dull plot"]))[1]
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-4, atol=1e-5)  # the same attention


def test_heads_apart_get_their_own_rate_and_the_default_layout_is_unchanged(heads_model):
    """Without lr_scale or a head warm-up the groups are the two they always were (a version's
    optimizer state keeps its layout); with them each head has its own, at lr x its scale."""
    plain = param_groups(heads_model, weight_decay=0.1, weighting_lr=0.5)
    assert [(len(g["params"]), g["weight_decay"], set(g) - {"params", "weight_decay"}) for g in plain] == \
        [(len(plain[0]["params"]), 0.1, set()), (len(plain[1]["params"]), 0.0, set())]
    assert not heads_apart({"a": 1.0, "b": 1.0}, 0) and heads_apart({"a": 2.0}, 0) and heads_apart({"a": 1.0}, 3)
    apart = param_groups(heads_model, weight_decay=0.1, weighting_lr=0.5, lr=1e-3,
                         head_lr_scales={"a": 10.0, "b": 1.0, "q": 0.5})
    head_a = {id(p) for p in heads_model.heads["a"].parameters()}
    a_groups = [g for g in apart if {id(p) for p in g["params"]} <= head_a]
    assert [g["lr"] for g in a_groups] == pytest.approx([1e-2, 1e-2]) and {g["role"] for g in a_groups} == {"head"}
    assert sorted(g["weight_decay"] for g in a_groups) == [0.0, 0.1]
    assert {g.get("lr") for g in apart if g["role"] == "backbone"} == {None}  # the optimizer's lr
    assert sum(len(g["params"]) for g in apart) == sum(len(g["params"]) for g in plain)


def test_during_a_head_warm_up_only_the_heads_move(heads_model, tokenizer):
    """LP-FT: two steps with the backbone's rate at 0 leave it bit-identical while the head learns;
    from the third step on the backbone trains, on the schedule of the steps left."""
    groups = param_groups(heads_model, weight_decay=0.0, weighting_lr=0.5, lr=1e-2,
                          head_lr_scales={"a": 1.0, "b": 1.0, "q": 1.0})
    factors = group_lr_factors(groups, "linear", 0, 10, head_warmup_steps=2)
    backbone = [f for f, g in zip(factors, groups) if g["role"] == "backbone"][0]
    assert [backbone(s) for s in (0, 1, 2, 3)] == [0.0, 0.0, 1.0, pytest.approx(7 / 8)]
    assert [f(2) for f, g in zip(factors, groups) if g["role"] == "head"][0] == pytest.approx(0.8)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    start = {n: p.detach().clone() for n, p in heads_model.named_parameters()}
    b = batch(tokenizer, ["great film", "dull plot"], [1, 0])

    def step():
        optimizer.zero_grad()
        heads_model("a", b)[1].backward()
        optimizer.step()
        scheduler.step()

    for _ in range(2):
        step()
    moved = {n for n, p in heads_model.named_parameters() if not torch.equal(p, start[n])}
    assert moved and all(n.startswith("heads.a.") for n in moved)
    step()
    assert any(not torch.equal(p, start[n]) for n, p in heads_model.named_parameters() if n.startswith("backbone."))
