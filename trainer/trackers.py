"""Where rank 0 sends the run's numbers: TensorBoard, Weights & Biases, MLflow (`tracking.to`).

Every tracker gets the same calls: the resolved job as hyper-parameters (storage and tracking
settings left out), each step's losses, loss weights, rates, lr and throughput, each
validation's per-task metrics, and sample predictions as text. A resumed run goes on in the
same W&B / MLflow run: their ids are saved with each version (trainer_state.json "trackers").

W&B reads its usual settings ($WANDB_API_KEY, $WANDB_PROJECT, $WANDB_MODE, $WANDB_DIR) unless the
job names them; MLflow reads $MLFLOW_TRACKING_URI. Without a URI, MLflow writes a file store
`mlruns` beside the experiments (local storage only); MLflow keeps that backend in maintenance
mode and asks for MLFLOW_ALLOW_FILE_STORE, which is set for that case.
"""

from __future__ import annotations

import html
import os
import time
import uuid


class Trackers:
    """The trackers of a run, called as one."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def ids(self) -> dict[str, str]:
        """Tracker -> the id a resumed run continues (for those that have one)."""
        return {t.name: t.run_id for t in self.trackers if getattr(t, "run_id", None)}

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.scalars(values, step)

    def hparams(self, values: dict, metric_tags: list[str]) -> None:
        for tracker in self.trackers:
            tracker.hparams(values, metric_tags)

    def text(self, tag: str, text: str, step: int) -> None:
        for tracker in self.trackers:
            tracker.text(tag, text, step)

    def sync(self) -> None:
        for tracker in self.trackers:
            tracker.sync()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(spec, storage, ids: dict[str, str]) -> Trackers:
    """The job's trackers on rank 0; `storage` is rooted at the experiment, `ids` come from the version resumed."""
    from trainer.reporting import Board

    trackers = []
    for name in spec.tracking.to:
        if name == "tensorboard":
            trackers.append(Board(storage))
        elif name == "wandb":
            trackers.append(WandbTracker(spec, ids.get("wandb")))
        elif name == "mlflow":
            trackers.append(MlflowTracker(spec, ids.get("mlflow")))
    return Trackers(trackers)


def local_storage_root(spec) -> str | None:
    """The storage folder when it is a local (or NFS) path, else None."""
    return None if "://" in spec.storage.path else spec.storage.path


def mlflow_uri(spec) -> str | None:
    """The MLflow tracking URI the run uses; None when there is none to use (S3 storage, no URI)."""
    uri = spec.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    root = local_storage_root(spec)
    if uri is None and root is not None:
        uri = "file://" + os.path.join(os.path.abspath(root), "mlruns")
    return uri


class WandbTracker:
    name = "wandb"

    def __init__(self, spec, run_id: str | None):
        import wandb

        root = local_storage_root(spec)
        directory = spec.tracking.wandb_dir or os.environ.get("WANDB_DIR") or (
            os.path.join(root, spec.name) if root else None)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.run_id = run_id or f"{spec.name}-{uuid.uuid4().hex[:8]}"
        # console="off": the worker's output is Ray's; W&B must not wrap its stdout.
        self.run = wandb.init(project=spec.tracking.wandb_project or os.environ.get("WANDB_PROJECT") or "mtl",
                              name=spec.name, id=self.run_id, resume="allow", dir=directory,
                              mode=spec.tracking.wandb_mode or os.environ.get("WANDB_MODE") or "online",
                              settings=wandb.Settings(console="off", quiet=True, silent=True))

    def scalars(self, values: dict[str, float], step: int) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            self.run.log(values, step=step)

    def hparams(self, values: dict, metric_tags: list[str]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def text(self, tag: str, text: str, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def sync(self) -> None:
        pass  # W&B sends (or, offline, writes) on its own

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, spec, run_id: str | None):
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(spec)
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        self.resumed = run_id is not None
        if run_id is None:
            experiment = spec.tracking.mlflow_experiment or spec.name
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=spec.name).info.run_id
        self.run_id = run_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def hparams(self, values: dict, metric_tags: list[str]) -> None:
        from mlflow.entities import Param

        if self.resumed:  # MLflow never changes a logged parameter; the resumed version's job says the rest
            return
        params = [Param(k[:250], str(v)[:6000]) for k, v in values.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step-{step:06d}.md")

    def sync(self) -> None:
        pass  # every call above is already written

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
