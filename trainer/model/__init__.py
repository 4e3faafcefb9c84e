"""The trained model and what it takes to build it: the backbone with per-task heads or one LM
(`models`), a model folder's tokenizer and config (`model_io`), DeepSpeed's numbers (`ds_config`),
the precision of a run (`precision`), fp32 ZeRO-3 partitions held once (`zero3_master`), and the
memory plan of a job before anything starts (`memory_plan`).

The face: code outside this package imports these names from `trainer.model` (see trainer/face.py).
"""
from trainer.face import face

__getattr__, __dir__, __all__ = face(__name__, {
    "ds_config": ("DEEPSPEED_SUB_GROUP_SIZE", "DEVICE_KEYS", "fill_model_sizes", "job_ds_config",
                  "offloads_optimizer", "read_ds_config", "zero_stage",),
    "memory_plan": ("GIB", "RAY_KILL_FRACTION", "describe", "job_model_size", "job_plan", "model_size",
                    "plan_memory",),
    "model_io": ("check_model", "load_config", "load_model_files", "load_tokenizer_and_encoding",),
    "models": ("SURROGATE", "HeadSpec", "MultiTaskModel", "build_model", "build_model_from_config", "first_target",
               "forward_accepts", "group_lr_factors", "heads_apart", "hidden_size", "is_partitioned", "lr_factor",
               "job_heads_apart", "loss_items", "model_class", "model_config", "param_groups",),
    "precision": ("agreed_precision", "fast_bf16",),
    "zero3_master": ("share_master_partitions",),
})
