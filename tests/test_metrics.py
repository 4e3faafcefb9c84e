"""Each metric pinned on inputs whose value is known by hand."""

from __future__ import annotations

import pytest

from trainer import metrics


def test_accuracy_and_macro_f1():
    refs, preds = ["a", "a", "b", "c"], ["a", "b", "a", "c"]
    out = metrics.compute(["accuracy", "macro_f1"], preds, refs)
    assert out["accuracy"] == pytest.approx(0.5)
    # a: tp 1, fp 1, fn 1 -> 0.5; b: 0; c: 1 -> mean 0.5
    assert out["macro_f1"] == pytest.approx(0.5)
    # a label only ever predicted counts (as 0) in the mean: (1 + 0) / 2
    assert metrics.compute(["macro_f1"], ["a", "z"], ["a", "a"])["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_squad_exact_match_and_f1_use_the_official_normalisation():
    out = metrics.compute(["exact_match", "f1"], ["The Denver Broncos!", "Broncos won"],
                          [["Denver Broncos"], ["Denver Broncos", "the Broncos"]])
    # 1: articles and punctuation go, EM 1; 2: best reference "the Broncos" -> tokens [broncos]:
    # F1 = 2 * (1/2 * 1) / (1/2 + 1) = 2/3, EM 0
    assert out["exact_match"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_rouge_lsum_reads_sentences_from_newlines():
    out = metrics.compute(["rouge"], ["cats purr\ndogs bark"], ["dogs bark\ncats purr"])
    assert out["rouge1"] == pytest.approx(1.0)
    assert out["rougeL"] == pytest.approx(0.5)  # one sequence: the longest common subsequence is 2 of 4
    assert out["rougeLsum"] == pytest.approx(1.0)  # sentence by sentence: every sentence matches


def test_a_validation_of_many_tasks_is_one_console_line_with_the_spread(capsys):
    """Past 20 tasks a validation prints one line (mean, lowest and highest per primary metric); the
    trackers still get every task's metrics."""
    from types import SimpleNamespace

    from trainer.loop_validation import log_evaluation

    logged = {}
    trackers = SimpleNamespace(scalars=lambda values, step: logged.update(values), text=lambda *a: None)
    tasks = {f"c{i:02d}": SimpleNamespace(type="classification", metrics=None) for i in range(22)}
    tasks["gen"] = SimpleNamespace(type="generation", metrics=None)
    run = SimpleNamespace(trackers=trackers, spec=SimpleNamespace(tasks=tasks))
    report = {t: {"metrics": {"accuracy": i / 100, "macro_f1": 0.5}, "samples": []} for i, t in enumerate(tasks)}
    report["gen"] = {"metrics": {"rougeL": 0.25}, "samples": []}
    log_evaluation(run, "validation", 7, report, "step 7")
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["[mtl] eval validation step 7: 23 tasks; accuracy of 22 tasks: mean 0.1050, lowest c00 0.0000, "
                   "highest c21 0.2100; rougeL of 1 tasks: mean 0.2500, lowest gen 0.2500, highest gen 0.2500 "
                   "(every task's metrics: TensorBoard and evals/step-000007/validation.json)"]
    assert len(logged) == 22 * 2 + 1
