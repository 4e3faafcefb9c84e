"""Mixture rates and step plans: formulas, statistics over many steps, fixed accumulation, resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trainer.control.bandit_mixture import BanditMixer
from trainer.data.sampling import StepPlanner, mixture_rates

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


@pytest.mark.parametrize("draw", ["even", "random"])
@pytest.mark.parametrize("strategy,kwargs", [("temperature", {"temperature": 3.0}), ("proportional", {}),
                                             ("uniform", {})])
def test_plans_follow_rates_over_many_steps(strategy, kwargs, draw):
    rates = mixture_rates(strategy, SIZES, **kwargs)
    planner = StepPlanner(list(SIZES), rates, {}, micro_batches_per_step=4, seed=0, draw=draw)
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


def test_even_draws_keep_every_task_within_two_micro_batches_of_its_share_at_every_step():
    """One task a step (the demo's recipe), four tasks, one at rate 0.12: drawn independently, such a
    task can go unseen for 40 steps (it did, in a benchmark run); dealt evenly it gets its 4.8."""
    rates = {"sentiment": 0.2934, "qa": 0.2934, "summary": 0.1198, "topic": 0.2934}
    for seed in range(20):
        planner = StepPlanner(list(rates), rates, {}, micro_batches_per_step=1, seed=seed)
        counts = dict.fromkeys(rates, 0)
        for step in range(1, 101):
            for t, n in planner.plan().items():
                counts[t] += n
            assert all(abs(counts[t] - rates[t] * step) < 2 for t in rates), (seed, step, counts)
    firsts = {next(iter(StepPlanner(list(rates), rates, {}, 1, seed=s).plan())) for s in range(20)}
    assert len(firsts) > 1  # the seed sets which task comes first


def test_random_draws_can_leave_a_small_task_out_for_long():
    """What `draw: random` (each step a multinomial, as before `even`) does to the same mixture."""
    rates = {"sentiment": 0.2934, "qa": 0.2934, "summary": 0.1198, "topic": 0.2934}
    longest = 0
    for seed in range(20):
        planner = StepPlanner(list(rates), rates, {}, micro_batches_per_step=1, seed=seed, draw="random")
        gap = 0
        for _ in range(100):
            gap = 0 if "summary" in planner.plan() else gap + 1
            longest = max(longest, gap)
    assert longest >= 25


def test_even_draws_resume_exactly_and_follow_new_rates_and_frozen_tasks():
    rates = {"a": 0.5, "b": 0.3, "c": 0.2}
    a = StepPlanner(list(rates), rates, {}, 3, seed=4)
    for _ in range(7):
        a.plan()
    state = json.loads(json.dumps(a.state_dict()))
    b = StepPlanner(list(rates), rates, {}, 3, seed=0)
    b.load_state_dict(state)
    assert [a.plan() for _ in range(20)] == [b.plan() for _ in range(20)]
    a.freeze("a")
    counts = dict.fromkeys(rates, 0)
    for _ in range(40):
        for t, n in a.plan().items():
            counts[t] += n
    assert counts["a"] == 0 and abs(counts["b"] - 72) <= 2 and abs(counts["c"] - 48) <= 2
    a.set_rates({"a": 0.1, "b": 0.1, "c": 0.8})
    counts = dict.fromkeys(rates, 0)
    for _ in range(40):
        for t, n in a.plan().items():
            counts[t] += n
    assert abs(counts["c"] - 120 * 8 / 9) <= 3 and abs(counts["b"] - 120 / 9) <= 3


def test_an_unknown_draw_is_refused():
    with pytest.raises(ValueError, match="unknown draw 'sometimes'"):
        StepPlanner(["a"], {"a": 1.0}, {}, 1, seed=0, draw="sometimes")


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


def test_early_stopping_freezes_a_task_after_patience_validations_without_a_gain():
    from trainer.control.early_stopping import EarlyStopping

    es = EarlyStopping(["a", "b"], patience=2, min_delta=0.01)
    assert es.update(10, {"a": 0.50, "b": 0.30}) == []
    assert es.update(20, {"a": 0.505, "b": 0.40}) == []  # a: +0.005 is within min_delta, one without a gain
    assert es.update(30, {"a": 0.70, "b": 0.45}) == []  # a gains: its count starts again
    assert es.update(40, {"a": 0.69, "b": 0.50}) == []
    assert es.update(50, {"a": 0.70, "b": 0.55}) == ["a"]  # a: two validations without a gain above 0.01
    assert es.state["a"] == {"best": 0.70, "best_step": 30, "evals_without_gain": 2, "stopped_at": 50}
    assert es.update(60, {"a": 0.99, "b": 0.50}) == []  # a stopped for good; b's first validation without a gain
    again = EarlyStopping(["a", "b", "new"], patience=2, min_delta=0.01)
    again.load_state_dict(es.state_dict())  # a resumed run goes on where it was; a new task starts afresh
    assert again.update(70, {"a": 0.99, "b": 0.55, "new": 0.1}) == ["b"] and again.stopped() == ["a", "b"]
    assert again.state["new"]["best"] == 0.1 and again.state["b"]["best_step"] == 50


def test_a_frozen_task_gets_no_micro_batches_and_its_slots_go_to_the_others():
    planner = StepPlanner(["a", "b", "c"], {"a": 1.0, "b": 1.0, "c": 1.0}, {"c": 2}, micro_batches_per_step=5,
                          seed=0)
    planner.freeze("a")
    plans = [planner.plan() for _ in range(20)]
    assert all("a" not in p and sum(p.values()) == 5 and p["c"] == 2 for p in plans)
    assert planner.expected_rates() == {"a": 0.0, "b": 0.6, "c": 0.4}
    planner.freeze("b")  # only a fixed task is left: it takes every slot
    assert planner.plan() == {"c": 5} and planner.expected_rates()["c"] == 1.0
    resumed = StepPlanner(["a", "b", "c"], {"a": 1.0, "b": 1.0, "c": 1.0}, {"c": 2}, 5, seed=0)
    resumed.load_state_dict(planner.state_dict())
    assert resumed.frozen == {"a", "b"} and [resumed.plan() for _ in range(3)] == [planner.plan() for _ in range(3)]
    planner.freeze("c")
    assert planner.all_frozen()
    with pytest.raises(RuntimeError, match="every task is frozen"):
        planner.plan()


def test_a_scaled_task_gets_a_share_in_proportion_and_the_scales_resume():
    planner = StepPlanner(["a", "b", "c"], {"a": 0.5, "b": 0.25, "c": 0.25}, {}, micro_batches_per_step=4, seed=0)
    planner.scale("a", 0.5)  # a's weight 0.25 against b's and c's 0.25: a third each
    assert planner.expected_rates() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    resumed = StepPlanner(["a", "b", "c"], {"a": 0.5, "b": 0.25, "c": 0.25}, {}, 4, seed=0)
    resumed.load_state_dict(planner.state_dict())
    assert resumed.scales == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert [resumed.plan() for _ in range(5)] == [planner.plan() for _ in range(5)]


def test_rebalancing_moves_rates_toward_lagging_tasks_within_bounds_and_resumes_exactly():
    from trainer.control.adapt_mixture import MixtureAdapter

    def scripted(adapter, planner, validations):
        moves = []
        for step, scores in validations:
            for task, (scale, _) in adapter.update(step, scores, planner.scales).items():
                planner.scale(task, scale)
            moves.append(planner.expected_rates())
        return moves

    tasks, rates = ["a", "b", "c"], {"a": 1.0, "b": 1.0, "c": 1.0}
    options = dict(by="trend", reference=None, factor=2.0, min_scale=0.25, max_scale=4.0, min_delta=0.01)
    adapter, planner = MixtureAdapter(**options), StepPlanner(tasks, rates, {}, 3, seed=0)
    # a keeps gaining, b stopped gaining (+0.005 is within min_delta), c gains once and then stops.
    validations = [(10, {"a": 0.2, "b": 0.5, "c": 0.3}), (20, {"a": 0.3, "b": 0.505, "c": 0.4}),
                   (30, {"a": 0.4, "b": 0.505, "c": 0.4}), (40, {"a": 0.5, "b": 0.50, "c": 0.4}),
                   (50, {"a": 0.6, "b": 0.50, "c": 0.4})]
    moves = scripted(adapter, planner, validations[:3])
    assert moves[0] == pytest.approx({t: 1 / 3 for t in tasks})  # the first validation only sets the start
    assert moves[1]["a"] > 1 / 3 > moves[1]["b"] and moves[1]["a"] == pytest.approx(moves[1]["c"])
    assert moves[2]["a"] > moves[1]["a"] and moves[2]["c"] < moves[1]["c"]
    assert planner.scales == {"a": 4.0, "b": 0.25, "c": 1.0}
    assert [(h["step"], h["task"], h["to"]) for h in adapter.history] == \
        [(20, "a", 2.0), (20, "b", 0.5), (20, "c", 2.0), (30, "a", 4.0), (30, "b", 0.25), (30, "c", 1.0)]
    assert adapter.history[1]["why"] == "gains no more: +0.0050 since the last validation"

    again, replanned = MixtureAdapter(**options), StepPlanner(tasks, rates, {}, 3, seed=0)
    again.load_state_dict(adapter.state_dict())  # saved with the version
    replanned.load_state_dict(planner.state_dict())
    assert scripted(again, replanned, validations[3:]) == scripted(adapter, planner, validations[3:])
    assert planner.scales == {"a": 4.0, "b": 0.25, "c": 0.25}  # at the bounds they stay

    by_reference = MixtureAdapter(**{**options, "by": "reference", "reference": {"a": 0.9, "b": 0.5, "c": 0.45}})
    changes = by_reference.update(10, {"a": 0.6, "b": 0.6, "c": 0.445}, {"a": 1.0, "b": 1.0, "c": 1.0}, skip={"a"})
    assert {t: s for t, (s, _) in changes.items()} == {"b": 0.5, "c": 0.5}  # a skipped (stopped early); c within 0.01


def test_the_bandit_starts_uniform_and_draws_more_of_the_task_with_more_loss_left():
    """ODM's EXP3 on scripted losses: a's loss halves, b's stays: b's rate grows, a keeps at least eps_t."""
    mixer = BanditMixer(["a", "b", "c"], smoothing=0.9)
    assert mixer.rates() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    rewards = {"a": 0.0, "b": 0.0, "c": 0.0}
    for step in range(1, 41):
        losses = {"a": 2.0 * 0.5 ** min(step, 10) + 0.1, "b": 2.0, "c": 2.0 * 0.9 ** min(step, 10)}
        drawn = mixer.rates()
        for task, loss in losses.items():  # the rule, written out: reward = loss / first loss, importance-weighted
            first = {"a": 1.1, "b": 2.0, "c": 1.8}[task]
            rewards[task] = 0.9 * rewards[task] + 0.1 * (loss / first) / drawn[task]
        rates = mixer.update(losses)
    k, t = 3, 41
    eps, before = min(1 / k, math.sqrt(math.log(k) / (k * t))), min(1 / k, math.sqrt(math.log(k) / (k * (t - 1))))
    exp = {task: math.exp(before * r) for task, r in rewards.items()}
    expected = {task: (1 - k * eps) * e / sum(exp.values()) + eps for task, e in exp.items()}
    assert rates == pytest.approx(expected)
    assert rates["b"] > rates["c"] > rates["a"] >= eps and sum(rates.values()) == pytest.approx(1.0)


def test_the_bandit_resumes_exactly_and_leaves_fixed_tasks_alone():
    mixer = BanditMixer(["a", "b"])
    for losses in ({"a": 3.0, "b": 1.0, "fixed": 9.0}, {"a": 2.0}, {"a": 1.5, "b": 0.9}):
        mixer.update(losses)
    clone = BanditMixer(["a", "b"])
    clone.load_state_dict(json.loads(json.dumps(mixer.state_dict())))
    for losses in ({"a": 1.0, "b": 0.8}, {"b": 0.7}):
        assert clone.update(losses) == mixer.update(losses)
    assert set(mixer.rates()) == {"a", "b"}


def test_new_rates_keep_a_planners_scales_and_frozen_tasks():
    planner = StepPlanner(["a", "b", "c"], {"a": 1.0, "b": 1.0, "c": 1.0}, {}, 4, seed=0)
    planner.scale("a", 0.5)
    planner.freeze("c")
    planner.set_rates({"a": 0.2, "b": 0.2, "c": 0.6})
    rates = planner.expected_rates()
    assert rates["c"] == 0.0 and rates["a"] == pytest.approx(rates["b"] / 2)
