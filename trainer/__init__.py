"""Worker side of mtl: tasks, data, sampling, weighting and the training loop."""
from trainer import lean_imports

lean_imports.install()
