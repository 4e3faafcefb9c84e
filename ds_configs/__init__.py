"""The DeepSpeed configs shipped with mtl; a job names one by its file name without .json (`deepspeed: zero3`)."""
