"""Keep DeepSpeed's import from pulling in mlflow.

DeepSpeed's autotuner module (imported with DeepSpeed, whatever runs) imports mlflow when it is
installed, to log autotuning experiments. mtl never runs DeepSpeed's autotuner, yet the import
cost every worker about 1.2 s of CPU before its first step (`python -X importtime -c "import
deepspeed"` with mlflow-skinny installed). This finder refuses mlflow to that one module only, so
the autotuner sees mlflow as absent; every other import of mlflow (mtl's own tracker included)
gets the real one.
"""
from __future__ import annotations

import importlib.abc
import sys

AUTOTUNER = "deepspeed.autotuning.autotuner"


class _NoMlflowForDeepSpeedAutotuner(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "mlflow":
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__") == AUTOTUNER:
                raise ModuleNotFoundError("mlflow is not imported for DeepSpeed's autotuner", name=name)
            frame = frame.f_back
        return None  # anyone else: the usual finders


def install() -> None:
    if not any(isinstance(f, _NoMlflowForDeepSpeedAutotuner) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoMlflowForDeepSpeedAutotuner())
