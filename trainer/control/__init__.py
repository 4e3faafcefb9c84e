"""What steers a run between steps: loss weighting (`weighting`), conflicting task gradients
(`gradient_surgery`), mixture adaptation from validation (`adapt_mixture`) or online from the
training losses (`bandit_mixture`), per-task early stopping (`early_stopping`), stop requests and
preemption (`stopping`), and the heads a step does not train (`head_guard`).

The face: code outside this package imports these names from `trainer.control` (see trainer/face.py).
"""
from trainer.face import face

__getattr__, __dir__, __all__ = face(__name__, {
    "adapt_mixture": ("MixtureAdapter",),
    "bandit_mixture": ("BanditMixer",),
    "early_stopping": ("EarlyStopping",),
    "gradient_surgery": ("TaskGradients", "pcgrad", "surgery_problem",),
    "head_guard": ("HeadGuard",),
    "stopping": ("StopRequests", "agreed", "clear_stop", "request_stop",),
    "weighting": ("UncertaintyWeighting", "build_weighting",),
})
