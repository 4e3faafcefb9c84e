"""A task a step does not train keeps its head bit for bit (trainer.control.head_guard), under every ZeRO
stage, while AdamW's weight decay and momentum would move it."""

from __future__ import annotations

import torch

from conftest import REPO
from test_weighted_gradients import without_dropout
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


class Rows:
    """A task's stream: a new micro-batch of 2 rows each time (trainer.data.TaskStream's next_batch)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> dict:
        ids = torch.randint(5, 25, (2, 8), generator=self.generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (2,), generator=self.generator)}


def after_plans(stage: int, model_dir, touch: str) -> list[torch.Tensor]:
    """Every parameter after three steps of run_plan whose heads come and go between micro-batches:
    `touch` every other head in a step's first micro-batch (what run_plan does), in `every` one, or `never`."""
    import deepspeed

    from trainer.loop import run_plan

    plans = [{"b": 1, "a": 2}, {"a": 1, "c": 2}, {"c": 1, "b": 2}]  # b: micro-batch 0 of step 1, 1-2 of step 3
    config = build_ds_config(read_ds_config(str(REPO / "ds_configs" / f"zero{stage}.json")), micro_batch_size=2,
                             micro_batches_per_step=3, world_size=1, max_grad_norm=1.0, precision="fp32")
    fill_model_sizes(config, 32)
    torch.manual_seed(0)
    model = without_dropout(build_model(kind="heads", encoding="heads", name_or_path=str(model_dir),
                                        heads=[HeadSpec(t, "classification", 2) for t in "abc"], ds_config=config))
    forward = model.forward
    if touch != "first":
        model.forward = lambda task, batch, weight=1.0, touch_heads=True: forward(task, batch, weight,
                                                                                  touch_heads=touch == "every")
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.0, weighting_lr=0.01), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    streams = {t: Rows(i) for i, t in enumerate("abc")}
    for plan in plans:
        run_plan(engine, plan, streams, dict.fromkeys("abc", 1.0), list("abc"), torch.device("cpu"))
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def test_other_heads_are_touched_once_a_step_with_the_same_result_as_every_micro_batch(one_rank, model_dir):  # noqa: F811
    for stage in (0, 1, 2, 3):
        first = after_plans(stage, model_dir, "first")
        every = after_plans(stage, model_dir, "every")
        assert all(torch.equal(a, b) for a, b in zip(first, every)), stage
        if stage == 3:  # untouched, a head keeps re-applying its last micro-batch's gradient
            never = after_plans(stage, model_dir, "never")
            assert not all(torch.equal(a, b) for a, b in zip(first, never)), stage
