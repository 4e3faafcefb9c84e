"""SQuAD exact match and token F1 (official normalisation), best over the reference answers."""

import collections
import re
import string

import datasets
import evaluate


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if not pred or not ref:
        return float(pred == ref)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="SQuAD v1 exact match and F1, in [0, 1].", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references):
        em = [max(float(normalize(p) == normalize(r)) for r in refs) for p, refs in zip(predictions, references)]
        f1 = [max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
        n = max(len(em), 1)
        return {"exact_match": sum(em) / n, "f1": sum(f1) / n}
