"""Task data, from files to micro-batches: reading raw splits (`read_data`), checking and encoding
rows (`check_encode`), the node's cache of prepared data (`data_cache`), the entry that does all of it
for a job (`task_data`), task-homogeneous micro-batches (`batching`) and the mixing plan of each
optimizer step (`sampling`).

The face: code outside this package imports these names from `trainer.data` (see trainer/face.py).
"""
from trainer.face import face

__getattr__, __dir__, __all__ = face(__name__, {
    "batching": ("IGNORE_INDEX", "TaskStream", "collate", "column_array", "group_micro_batches", "shard_indices",
                 "task_salt",),
    "check_encode": ("CheckedTask", "encode_split",),
    "read_data": ("ROW", "reading_once"),
    "sampling": ("StepPlanner", "mixture_rates",),
    "task_data": ("TaskData", "check_task_data", "data_signature", "epoch_padding", "model_encoding",
                  "prepare_tasks", "primary_metric", "task_context", "task_metrics", "usable_cores",),
})
