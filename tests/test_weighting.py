"""Loss weighting strategies: values, learning, state round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.control.weighting import DWAWeighting, StaticWeighting, UncertaintyWeighting, build_weighting


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
    with pytest.raises(ValueError, match="unknown loss weighting"):
        build_weighting("gradnorm", {"a": 1.0})
