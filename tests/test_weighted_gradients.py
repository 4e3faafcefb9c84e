"""One optimizer step's gradient is the weighted mean over its plan's micro-batches, and with
token-normalised losses each task's part is the gradient of one batch of all its rows.

The step runs through the worker's own `run_plan` on a real DeepSpeed engine (one process,
gloo). With SGD at lr 1 and no clipping, the parameter change is exactly minus the gradient
DeepSpeed applied; the reference is computed by hand with plain autograd on a copy.
"""

from __future__ import annotations

import copy
import os
import random
import socket

import pytest
import torch

from conftest import qa_rows, sentiment_rows, summary_rows
from trainer.data.batching import TaskStream
from trainer.loop import run_plan
from trainer.loop_setup import skip_inference_comm_op
from trainer.data.batching import IGNORE_INDEX
from trainer.model.models import HeadSpec, build_model, loss_items
from trainer.data.check_encode import encode_split
from trainer.tasks import registry
from trainer.tasks.registry import TaskContext


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    skip_inference_comm_op()  # as a worker does: DeepSpeed would JIT-build an op training never uses
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()


def features(task_type, rows, tokenizer, labels=(), encoding="heads"):
    t = registry.get(task_type)
    for i, r in enumerate(rows):
        r["__row__"] = i + 1
        if "label" in r:
            r["label"] = r["label"]
    ctx = TaskContext("t", tokenizer, encoding, 48, t.default_prompt, labels,
                      t.options_model.model_validate({"doc_stride": 16} if task_type == "extractive_qa" else {}))
    feats = encode_split(rows, t, ctx).features
    keep = ["input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions", "length"]
    return feats.select_columns([c for c in keep if c in feats.column_names])


def without_dropout(model):
    """`model` with every dropout off: forward passes repeat exactly, for the comparisons."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def two_heads_tasks(model_dir, tokenizer, seed: int):
    """A heads model over tasks a (classification) and q (extractive QA), its heads drawn from
    `seed`, dropout off; a copy for the reference computed by hand; fresh streams of 3-row micro-batches."""
    rng = random.Random(0)
    feats = {"a": features("classification", sentiment_rows(12, rng), tokenizer, ("negative", "positive")),
             "q": features("extractive_qa", qa_rows(8, rng), tokenizer)}
    torch.manual_seed(seed)
    model = without_dropout(build_model(kind="heads", encoding="heads", name_or_path=str(model_dir),
                                        heads=[HeadSpec("a", "classification", 2), HeadSpec("q", "extractive_qa", 0)]))

    def streams():
        return {t: TaskStream(t, f, rank=0, world=1, seed=0, pad_id=0, micro_batch_size=3) for t, f in feats.items()}

    return model, copy.deepcopy(model), streams


@pytest.mark.parametrize("stage", [0, 2])
def test_step_gradient_is_weighted_mean_over_plan(process_group, model_dir, tokenizer, stage):
    import deepspeed

    model, reference, streams = two_heads_tasks(model_dir, tokenizer, seed=0)
    plan, weights = {"a": 2, "q": 1}, {"a": 2.0, "q": 0.5}

    # By hand: sum over the plan's micro-batches of weight * loss, divided by their number.
    reference_streams = streams()
    total = sum(weights[t] * reference(t, reference_streams[t].next_batch())[0]
                for t, n in plan.items() for _ in range(n)) / sum(plan.values())
    total.backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}

    config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 3, "train_batch_size": 9,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=config)
    stats = run_plan(engine, plan, streams(), weights, ["a", "q"], torch.device("cpu"))
    assert engine.global_steps == 1
    per_task, _ = stats.reduce()
    assert per_task["a"]["micro_batches"] == 2 and per_task["q"]["micro_batches"] == 1
    applied = {n: before[n] - p.detach() for n, p in engine.module.named_parameters()}
    compared = 0
    for name, grad in expected.items():
        torch.testing.assert_close(applied[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        compared += 1
    assert compared > 10 and expected["heads.a.out.weight"].abs().sum() > 0


def one_batch(batches: list[dict], pad_id: int) -> dict:
    """Micro-batches' rows as one batch, padded on the right as TaskStream pads."""
    width = max(b["input_ids"].shape[1] for b in batches)
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: torch.cat([torch.nn.functional.pad(b[k], (0, width - b[k].shape[1]), value=v) for b in batches])
            for k, v in pads.items()}


@pytest.mark.parametrize("stage", [0, 2])
def test_token_normalised_step_gradient_is_each_tasks_one_batch_gradient(process_group, causal_dir, tokenizer, stage):
    """train.loss_normalization: tokens. A task's micro-batches of 2 rows hold different numbers of
    target tokens; the step's gradient must be, per task, the gradient of its rows as one batch (the
    mean over all their tokens), at its share of the step's micro-batches, times its weight."""
    import deepspeed

    rng = random.Random(1)
    feats = {"c": features("classification", sentiment_rows(8, rng), tokenizer, ("negative", "positive"), "causal"),
             "g": features("generation", summary_rows(12, rng), tokenizer, encoding="causal")}
    torch.manual_seed(0)
    model = without_dropout(build_model(kind="text2text", encoding="causal", name_or_path=str(causal_dir), heads=[]))
    reference = copy.deepcopy(model)
    plan, weights = {"c": 1, "g": 3}, {"c": 2.0, "g": 0.5}
    pad = tokenizer.pad_token_id
    streams = lambda: {t: TaskStream(t, f, rank=0, world=1, seed=0, pad_id=pad, micro_batch_size=2)  # noqa: E731
                       for t, f in feats.items()}

    reference_streams = streams()
    drawn = {t: [reference_streams[t].next_batch() for _ in range(n)] for t, n in plan.items()}
    items = [loss_items(b, "causal") for b in drawn["g"]]
    assert len(set(items)) > 1, f"the generation micro-batches should differ in target tokens: {items}"
    steps = sum(plan.values())
    total = sum(weights[t] * plan[t] / steps * reference(t, one_batch(drawn[t], pad))[0] for t in plan)
    total.backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
    # What the mean of micro-batch means gives instead: the test tells the two apart.
    old = {n: torch.autograd.grad(sum(weights[t] * reference(t, b)[0] for t in plan for b in drawn[t]) / steps, p)[0]
           for n, p in list(reference.named_parameters())[:1]}
    name = next(iter(old))
    assert not torch.allclose(old[name], expected[name], rtol=1e-3, atol=1e-6)

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": steps, "train_batch_size": 2 * steps,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=config)
    stats = run_plan(engine, plan, streams(), weights, ["c", "g"], torch.device("cpu"), encoding="causal")
    assert engine.global_steps == 1
    per_task, _ = stats.reduce()
    mean_over_tokens = float(reference("g", one_batch(drawn["g"], pad))[0].detach())
    assert per_task["g"]["loss"] == pytest.approx(mean_over_tokens, rel=1e-4)  # what the step reports, too
    applied = {n: before[n] - p.detach() for n, p in engine.module.named_parameters()}
    for n, grad in expected.items():
        torch.testing.assert_close(applied[n], grad, rtol=1e-4, atol=1e-6, msg=n)
    assert len(expected) > 10


@pytest.mark.parametrize("stage", [0, 1])
def test_pcgrad_step_applies_the_projected_sum_of_the_tasks_gradients(process_group, model_dir, tokenizer, stage):
    """loss_weighting.surgery: pcgrad. Each task's gradient of the step is computed apart; on the
    shared encoder conflicting ones are projected (trainer.control.gradient_surgery.pcgrad, order
    from the seed and step), heads summed as they are; DeepSpeed applies exactly that sum."""
    import deepspeed
    import numpy as np

    from trainer.control.gradient_surgery import TaskGradients, pcgrad

    # heads drawn so that the two tasks' encoder gradients conflict (asserted below)
    model, reference, streams = two_heads_tasks(model_dir, tokenizer, seed=2)
    plan, weights = {"a": 2, "q": 1}, {"a": 2.0, "q": 0.5}

    # By hand: each task's gradient, PCGrad over the shared parameters, heads summed.
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    params = [p for p in reference.parameters() if p.requires_grad]
    reference_streams, per_task = streams(), {}
    for task, n in plan.items():
        loss = sum(weights[task] * reference(task, reference_streams[task].next_batch())[0] for _ in range(n)) / 3
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        per_task[task] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                    for g, p in zip(grads, params)])
    shared = torch.cat([torch.full((p.numel(),), not n.startswith("heads."), dtype=torch.bool)
                        for n, p in zip(names, params)])
    stacked = torch.stack([per_task["a"], per_task["q"]])
    assert float(stacked[0, shared] @ stacked[1, shared]) < 0, "the scenario needs conflicting tasks"
    expected = stacked.sum(0)
    expected[shared] = pcgrad(stacked[:, shared], np.random.default_rng([0, 0])).sum(0)
    assert not torch.allclose(expected, stacked.sum(0))

    config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 3, "train_batch_size": 9,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=config)
    surgery = TaskGradients(engine.module, seed=0, world=1)
    stats = run_plan(engine, plan, streams(), weights, ["a", "q"], torch.device("cpu"), surgery=surgery, step=0)
    assert engine.global_steps == 1
    assert stats.reduce()[0]["q"]["micro_batches"] == 1
    after = torch.cat([p.detach().flatten() for p in engine.module.parameters() if p.requires_grad])
    torch.testing.assert_close(before - after, expected, rtol=1e-4, atol=1e-6)
