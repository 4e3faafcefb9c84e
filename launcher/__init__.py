"""Driver side of mtl: the CLI, the job spec and its validation, building Ray objects."""
