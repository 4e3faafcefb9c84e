"""Evaluation during training: per-task metrics on a held-out split by every rank together
(`per_task`), and validation of each committed version by a Ray task beside the run
(`background_validation`).

The face: code outside this package imports these names from `trainer.evaluation` (see trainer/face.py).
"""
from trainer.face import face

__getattr__, __dir__, __all__ = face(__name__, {
    "background_validation": ("BackgroundValidation", "WAIT_AT_END_S",),
    "per_task": ("DeadlineExceeded", "EvalSet", "baseline_metrics", "best_per_example", "build_eval_set",
                 "evaluate_task", "generation_deadline", "label_probabilities", "predict_features",),
})
