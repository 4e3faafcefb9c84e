"""Worker side of mtl: tasks, data, sampling, weighting and the training loop."""
