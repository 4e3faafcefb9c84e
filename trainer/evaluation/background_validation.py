"""`train.validation: task`: each committed version is validated by a Ray task beside the run.

Validation inside the loop makes every rank wait while the model generates; here rank 0 hands
each committed version to a Ray task (`train.validation_cpus` / `validation_gpus`, e.g. a GPU
of its own) and training goes on. The task scores the version as `mtl eval` does
(trainer.inference.version_eval) and writes `evals/<version>/validation.json`; rank 0 collects finished
tasks between steps, logs their metrics at the version's step, and ranks the version in the
registry. A version whose validation is still running is never pruned. At the end the run waits
for the tasks still running (at most `WAIT_AT_END_S`).
"""

from __future__ import annotations

WAIT_AT_END_S = 3600.0


def _validate(storage_spec: dict, name: str, version: str) -> dict:
    """The Ray task: the version's validation results, as evaluate_all writes them."""
    from trainer.inference import score_version
    from trainer.reporting import quiet_libraries
    from trainer.spec import StorageSpec
    from trainer.versions import open_storage

    quiet_libraries()
    storage = open_storage(StorageSpec.model_validate(storage_spec))
    results, _, _ = score_version(storage, name, version, "validation", untrained=False, baselines=False)
    report = {task: {"metrics": r["metrics"], "samples": r["samples"]} for task, r in results.items()}
    storage.write_json(f"{name}/evals/{version}/validation.json", report)
    return report


class BackgroundValidation:
    """Rank 0's validation tasks, by version."""

    def __init__(self, spec):
        from trainer.runtime import RemoteTasks

        self.spec = spec
        self.tasks = RemoteTasks()

    @property
    def pending(self) -> dict[str, object]:
        """version -> its task still running"""
        return self.tasks.pending

    def submit(self, version: str) -> None:
        self.tasks.submit(version, _validate, self.spec.storage.model_dump(mode="json"), self.spec.name, version,
                          cpus=self.spec.train.validation_cpus, gpus=self.spec.train.validation_gpus)

    def finished(self, wait_s: float = 0.0) -> dict[str, dict | Exception]:
        """Version -> its report (or the error that ended its task: a pruned version, storage), for
        the tasks done within `wait_s`."""
        return self.tasks.finished(wait_s)
