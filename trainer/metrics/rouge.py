"""ROUGE-1/2/L and summary-level ROUGE-Lsum F-measures (rouge-score, stemmed), averaged over
examples (`evaluate` module, offline). ROUGE-Lsum reads sentences from newlines, as rouge-score
and the summarisation literature do; texts without newlines score as ROUGE-L."""

import datasets
import evaluate
from rouge_score import rouge_scorer


KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean ROUGE F-measures.", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(list(KEYS), use_stemmer=True)
        totals = dict.fromkeys(KEYS, 0.0)
        for p, r in zip(predictions, references):
            scores = scorer.score(r, p)
            for key in totals:
                totals[key] += scores[key].fmeasure
        n = max(len(references), 1)
        return {k: v / n for k, v in totals.items()}
