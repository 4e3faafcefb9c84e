"""ROUGE-1/2/L F-measure (rouge-score, stemmed), averaged over examples (`evaluate` module, offline)."""

import datasets
import evaluate
from rouge_score import rouge_scorer


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean ROUGE F-measures.", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for p, r in zip(predictions, references):
            scores = scorer.score(r, p)
            for key in totals:
                totals[key] += scores[key].fmeasure
        n = max(len(references), 1)
        return {k: v / n for k, v in totals.items()}
