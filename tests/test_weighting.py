"""Loss weighting strategies: values, learning, state round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.control.weighting import (
    DWAWeighting,
    FAMOWeighting,
    StaticWeighting,
    UncertaintyWeighting,
    build_weighting,
)


def test_static():
    w = StaticWeighting({"a": 2.0, "b": 0.5})
    assert w.weighted("a", torch.tensor(3.0)).item() == 6.0
    assert w.weights() == {"a": 2.0, "b": 0.5}


def test_uncertainty_starts_at_static_and_learns_to_down_weight_noisy_task():
    w = UncertaintyWeighting({"easy": 1.0, "noisy": 1.0})
    assert w.weights() == pytest.approx({"easy": 1.0, "noisy": 1.0})
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        loss = w.weighted("easy", torch.tensor(0.1)) + w.weighted("noisy", torch.tensor(5.0))
        loss.backward()
        opt.step()
    weights = w.weights()
    # The optimum of exp(-s)*L + s is s = log L: weight 1/L.
    assert weights["noisy"] == pytest.approx(1 / 5.0, rel=0.05)
    assert weights["easy"] > weights["noisy"]
    clone = UncertaintyWeighting({"easy": 1.0, "noisy": 1.0})
    clone.load_state_dict(w.state_dict())
    assert clone.weights() == pytest.approx(weights)


def test_dwa_follows_loss_ratios_and_resumes():
    w = DWAWeighting({"a": 1.0, "b": 1.0}, temperature=2.0, window=2)
    for step in range(4):  # window 1: a=4, b=4; window 2: a=2 (falling fast), b=4 (flat)
        w.end_step({"a": 4.0 if step < 2 else 2.0, "b": 4.0})
    ra, rb = 0.5, 1.0
    ea, eb = math.exp(ra / 2), math.exp(rb / 2)
    assert w.weights() == pytest.approx({"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)})
    assert w.weights()["b"] > w.weights()["a"]  # the task that stopped improving gets more weight
    state = json.loads(json.dumps(w.state_dict()))
    clone = DWAWeighting({"a": 1.0, "b": 1.0}, temperature=2.0, window=2)
    clone.load_state_dict(state)
    for _ in range(3):
        w.end_step({"a": 1.0, "b": 3.0})
        clone.end_step({"a": 1.0, "b": 3.0})
    assert clone.weights() == pytest.approx(w.weights())


def test_dwa_keeps_static_until_two_windows():
    w = DWAWeighting({"a": 2.0, "b": 1.0}, window=3)
    for _ in range(5):
        w.end_step({"a": 1.0})
    assert w.weights() == {"a": 2.0, "b": 1.0}


def test_build_weighting_names():
    assert isinstance(build_weighting("dwa", {"a": 1.0}), DWAWeighting)
    assert isinstance(build_weighting("famo", {"a": 1.0}, famo_lr=0.1), FAMOWeighting)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        build_weighting("gradnorm", {"a": 1.0})


def test_famo_scales_each_task_by_k_z_over_its_loss_times_its_static_weight():
    w = FAMOWeighting({"a": 1.0, "b": 1.0, "c": 2.0})
    assert w.weights() == {"a": 1.0, "b": 1.0, "c": 2.0}  # until every task has trained once
    w.end_step({"a": 4.0, "b": 1.0})
    assert w.weights() == {"a": 1.0, "b": 1.0, "c": 2.0}
    w.end_step({"c": 0.5})
    # z is uniform still (no task has a loss to compare with yet): weight_t = K (1/L_t) / sum(1/L)
    inverse = {"a": 1 / 4.0, "b": 1 / 1.0, "c": 1 / 0.5}
    total = sum(inverse.values())
    expected = {t: static * 3 * q / total for (t, q), static in zip(inverse.items(), (1.0, 1.0, 2.0))}
    assert w.weights() == pytest.approx(expected)
    assert w.weighted("a", torch.tensor(2.0)).item() == pytest.approx(2.0 * expected["a"])


def test_famo_logits_follow_the_papers_update_through_adam():
    """The scripted losses of three steps; the logits equal those of torch's Adam on FAMO's
    gradient J_softmax(w)^T delta, delta = the fall of each task's log loss."""
    losses = [{"a": 2.0, "b": 2.0}, {"a": 1.0, "b": 1.9}, {"a": 0.5, "b": 1.8}, {"b": 1.7}]
    famo = FAMOWeighting({"a": 1.0, "b": 1.0}, lr=0.025, decay=0.01)
    w = torch.zeros(2, requires_grad=True)
    adam = torch.optim.Adam([w], lr=0.025, weight_decay=0.01)
    before = None
    for step in losses:
        famo.end_step(step)
        now = torch.tensor([step.get("a", math.nan), step.get("b", math.nan)])
        if before is not None:
            delta = torch.where(now.isnan() | before.isnan(), torch.zeros(2), before.log() - now.log())
            adam.zero_grad()
            w.grad = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta)[0]
            adam.step()
        before = torch.where(now.isnan(), before if before is not None else now, now)
    assert famo.logits == pytest.approx(w.detach().tolist(), abs=1e-7)
    # b's loss fell slower (log 2 -> log 1.7 against a's 2 -> 0.5): b gets the larger share
    assert famo.logits[1] > famo.logits[0]


def test_famo_resumes_exactly_from_its_saved_state():
    w = FAMOWeighting({"a": 1.0, "b": 1.0})
    for step in ({"a": 2.0, "b": 3.0}, {"a": 1.5, "b": 2.9}, {"a": 1.0}):
        w.end_step(step)
    clone = FAMOWeighting({"a": 1.0, "b": 1.0})
    clone.load_state_dict(json.loads(json.dumps(w.state_dict())))
    for step in ({"a": 0.9, "b": 2.5}, {"b": 2.4}, {"a": 0.8, "b": 2.0}):
        w.end_step(step)
        clone.end_step(step)
        assert clone.weights() == w.weights()


def test_pcgrad_projects_away_only_conflicts_in_a_random_order_of_the_others():
    """PCGrad (Yu et al. 2020): a task's gradient loses its component along another task's gradient
    where the two conflict (negative dot product), the others taken in a random order, against
    the others' original gradients."""
    import numpy as np
    import torch

    from trainer.control.gradient_surgery import pcgrad

    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(pcgrad(g, np.random.default_rng(0)), torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    aligned = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    torch.testing.assert_close(pcgrad(aligned, np.random.default_rng(0)), aligned)  # no conflict: unchanged

    three = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rng, mirror = np.random.default_rng([7, 2]), np.random.default_rng([7, 2])
    expected = three.clone()
    for i in range(3):
        for j in mirror.permutation(3).tolist():
            if j != i and float(expected[i] @ three[j]) < 0:
                expected[i] = expected[i] - float(expected[i] @ three[j]) / float(three[j] @ three[j]) * three[j]
    got = pcgrad(three, rng)
    torch.testing.assert_close(got, expected)
    assert any(float(three[i] @ three[j]) < 0 for i in range(3) for j in range(3)), "the scenario has a conflict"
    assert not torch.allclose(got, three)
    zero = torch.tensor([[1.0, -1.0], [0.0, 0.0]])  # a task without gradient projects nothing
    torch.testing.assert_close(pcgrad(zero, np.random.default_rng(0)), zero)
