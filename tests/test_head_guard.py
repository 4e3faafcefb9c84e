"""A task a step does not train keeps its head bit for bit (trainer.control.head_guard), under every ZeRO
stage, while AdamW's weight decay and momentum would move it."""

from __future__ import annotations

import torch

from conftest import REPO
from test_zero3_build import one_rank  # noqa: F401  (a fixture: one rank's process group)
from trainer.model.ds_config import build_ds_config, fill_model_sizes, read_ds_config
from trainer.control.head_guard import HeadGuard
from trainer.model.models import HeadSpec, build_model, param_groups


def head_b(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.heads["b"].parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def train(stage: int, model_dir, guard: bool) -> tuple[list, list]:
    import deepspeed

    config = build_ds_config(read_ds_config(str(REPO / "ds_configs" / f"zero{stage}.json")), micro_batch_size=2,
                             micro_batches_per_step=1, world_size=1, max_grad_norm=1.0, precision="fp32")
    fill_model_sizes(config, 32)
    torch.manual_seed(0)
    model = build_model(kind="heads", encoding="heads", name_or_path=str(model_dir),
                        heads=[HeadSpec("a", "classification", 2), HeadSpec("b", "classification", 2)],
                        ds_config=config)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.1, weighting_lr=0.01), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    keeper = HeadGuard(engine.module.heads)
    ids = torch.arange(16).reshape(2, 8) % 20 + 5
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}

    def step(task: str, untrained: list[str]) -> None:
        held = keeper.hold(untrained) if guard else []
        engine.backward(engine(task, batch, weight=1.0)[1])
        engine.step()
        HeadGuard.restore(held)

    step("b", [])  # b trains once: its moments are not zero from here on
    before = head_b(engine)
    for _ in range(2):
        step("a", ["b"])
    return before, head_b(engine)


def test_a_head_its_step_does_not_train_stays_bit_identical(one_rank, model_dir):  # noqa: F811
    # One process group for every stage: DeepSpeed keeps the groups it made for the process.
    for stage in (0, 1, 2, 3):
        before, after = train(stage, model_dir, guard=True)
        assert all(torch.equal(a, b) for a, b in zip(before, after)), stage
        if stage in (0, 3):  # without the guard AdamW moves it
            drifted_before, drifted_after = train(stage, model_dir, guard=False)
            assert not all(torch.equal(a, b) for a, b in zip(drifted_before, drifted_after)), stage
