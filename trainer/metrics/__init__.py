"""Task metrics through `evaluate` modules that ship with mtl (so they work offline).

A metric name in a job (`accuracy`, `macro_f1`, `exact_match`, `f1`, `rouge`) maps to the
module that computes it; modules are loaded once per process.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = {"accuracy": "accuracy", "macro_f1": "macro_f1", "exact_match": "squad", "f1": "squad", "rouge": "rouge"}


@lru_cache(maxsize=None)
def _module(name: str):
    import evaluate

    return evaluate.load(str(HERE / f"{name}.py"))


def compute(names: list[str], predictions: list, references: list) -> dict[str, float]:
    """{metric: value} for the requested names; `references` is a list of lists for squad."""
    out: dict[str, float] = {}
    for module in dict.fromkeys(MODULES[n] for n in names):
        refs = references
        if module == "squad":
            refs = [r if isinstance(r, list) else [r] for r in references]
        out.update(_module(module).compute(predictions=predictions, references=refs))
    wanted = set(names) | ({"rouge1", "rouge2", "rougeL", "rougeLsum"} if "rouge" in names else set())
    return {k: float(v) for k, v in out.items() if k in wanted}
