"""Macro-averaged F1 over the labels seen in references or predictions (`evaluate` module, offline)."""

import datasets
import evaluate


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Unweighted mean of per-label F1.", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        labels = sorted(set(references) | set(predictions))
        scores = []
        for label in labels:
            tp = sum(p == label and r == label for p, r in zip(predictions, references))
            fp = sum(p == label and r != label for p, r in zip(predictions, references))
            fn = sum(p != label and r == label for p, r in zip(predictions, references))
            scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return {"macro_f1": sum(scores) / len(scores) if scores else 0.0}
