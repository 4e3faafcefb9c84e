"""Mixture rates and step plans: formulas, statistics over many steps, fixed accumulation, resume."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.sampling import StepPlanner, mixture_rates

SIZES = {"a": 9000, "b": 900, "c": 100}


def test_rate_formulas():
    assert mixture_rates("proportional", SIZES) == pytest.approx({"a": 0.9, "b": 0.09, "c": 0.01})
    assert mixture_rates("uniform", SIZES) == pytest.approx({t: 1 / 3 for t in SIZES})
    assert mixture_rates("capped", SIZES, cap=1000) == pytest.approx({"a": 1000 / 2000, "b": 900 / 2000, "c": 100 / 2000})
    t2 = {t: (n / 10000) ** 0.5 for t, n in SIZES.items()}
    assert mixture_rates("temperature", SIZES, temperature=2.0) == pytest.approx(
        {t: v / sum(t2.values()) for t, v in t2.items()})
    assert mixture_rates("temperature", SIZES, temperature=1.0) == pytest.approx(mixture_rates("proportional", SIZES))
    assert mixture_rates("explicit", SIZES, explicit={"a": 2, "b": 1, "c": 1}) == pytest.approx(
        {"a": 0.5, "b": 0.25, "c": 0.25})


@pytest.mark.parametrize("strategy,kwargs", [("temperature", {"temperature": 3.0}), ("proportional", {}),
                                             ("uniform", {})])
def test_plans_follow_rates_over_many_steps(strategy, kwargs):
    rates = mixture_rates(strategy, SIZES, **kwargs)
    planner = StepPlanner(list(SIZES), rates, {}, micro_batches_per_step=4, seed=0)
    steps = 5000
    totals = {t: 0 for t in SIZES}
    for _ in range(steps):
        plan = planner.plan()
        assert sum(plan.values()) == 4
        for t, n in plan.items():
            totals[t] += n
    slots = 4 * steps
    for t, rate in rates.items():
        # binomial standard deviation of the observed share; 5 sigma keeps this test deterministic-safe
        sigma = np.sqrt(rate * (1 - rate) / slots)
        assert abs(totals[t] / slots - rate) < 5 * sigma + 1e-9, (t, totals[t] / slots, rate)


def test_fixed_accumulation_is_exact_and_rest_is_drawn():
    planner = StepPlanner(["a", "b", "c"], {"b": 0.5, "c": 0.5}, {"a": 2}, micro_batches_per_step=5, seed=1)
    plans = [planner.plan() for _ in range(200)]
    assert all(p["a"] == 2 and sum(p.values()) == 5 for p in plans)
    assert planner.expected_rates() == pytest.approx({"a": 0.4, "b": 0.3, "c": 0.3})


def test_all_fixed_is_deterministic():
    planner = StepPlanner(["a", "b"], {}, {"a": 1, "b": 3}, micro_batches_per_step=4, seed=0)
    assert all(planner.plan() == {"a": 1, "b": 3} for _ in range(10))


def test_plans_continue_identically_after_state_round_trip():
    rates = mixture_rates("temperature", SIZES, temperature=2.0)
    a = StepPlanner(list(SIZES), rates, {}, 4, seed=5)
    for _ in range(37):
        a.plan()
    import json
    state = json.loads(json.dumps(a.state_dict()))  # it is stored as JSON in a version
    expected = [a.plan() for _ in range(50)]
    b = StepPlanner(list(SIZES), rates, {}, 4, seed=999)
    b.load_state_dict(state)
    assert [b.plan() for _ in range(50)] == expected and b.step == 87


def test_same_seed_same_plans_on_every_rank():
    rates = mixture_rates("uniform", SIZES)
    ranks = [StepPlanner(list(SIZES), rates, {}, 4, seed=3) for _ in range(3)]
    for _ in range(20):
        plans = [r.plan() for r in ranks]
        assert plans[0] == plans[1] == plans[2]
