"""Versions on shared storage: the store (`storage`: a folder, NFS or S3), a version's layout and
its commit (`checkpoint`, `deferred_writes`, `whole_weights`, `base_model`), latest and best
(`version_registry`), resuming on another number of workers (`resize`), what every node must see
the same (`agreement`), reading version files as data (`safe_load`), and starting a run from
another run's version (`init_from`).

The face: code outside this package imports these names from `trainer.versions` (see trainer/face.py).
"""
from trainer.face import face

__getattr__, __dir__, __all__ = face(__name__, {
    "agreement": ("agreed_versions", "require_parts_on_storage", "require_same_data",
                  "require_shared_storage",),
    "base_model": ("BASE_FILE", "adapters_only", "base_record", "read_base", "require_base", "weight_files",),
    "checkpoint": ("COMMITTED", "DS_FILE", "DS_TAG", "MODEL_STATES", "TAGS", "WHOLE_WEIGHTS",
                   "committed_versions", "model_needs", "read_tags", "settings_needs", "version_step",),
    "deferred_writes": ("DeferredWrites",),
    "init_from": ("forgetting_table", "load_init_optimizer", "load_init_weights",),
    "resize": ("load_resized",),
    "safe_load": ("weights_only_loads",),
    "storage": ("Storage", "StorageError", "open_experiment", "open_storage", "storage_problem",
                "worker_filesystem",),
    "version_registry": ("UNTRAINED", "existing_versions", "pick_version",),
    "whole_weights": ("frozen_names", "has_whole_weights", "read_whole_weights",),
}, modules=("checkpoint", "init_from", "version_registry"))
