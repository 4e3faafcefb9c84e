"""Macro-averaged F1 (scikit-learn's) over the labels seen in references or predictions
(`evaluate` module, offline). A label with no true or predicted example scores 0."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Unweighted mean of per-label F1.", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        if not references:
            return {"macro_f1": 0.0}
        labels = sorted(set(references) | set(predictions))
        return {"macro_f1": float(f1_score(references, predictions, labels=labels, average="macro",
                                           zero_division=0.0))}
