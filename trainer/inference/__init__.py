"""Using a trained version in one process, not training: rebuilding its model from its files
(`version_io`, which export reads through), scoring it on a held-out split (`version_eval`: `mtl
eval`, background validation), predicting and serving (`pipeline`), and the device such a process
uses (`devices`).

The face: code outside this package imports these names from `trainer.inference` (see trainer/face.py).
"""
from trainer.face import face

__getattr__, __dir__, __all__ = face(__name__, {
    "devices": ("helper_device",),
    "pipeline": ("MultitaskPipeline",),
    "version_eval": ("score_version",),
    "version_io": ("LoadedVersion", "TIED_WEIGHTS", "check_manifest", "download_model_files",
                   "load_from_storage", "whole_weights",),
})
