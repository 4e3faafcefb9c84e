"""What a step reports: per-task losses and tokens summed over ranks, a console line, TensorBoard.

Only rank 0 writes TensorBoard and prints; Ray forwards its stdout to the driver's console.
Event files are written to a local scratch folder and copied to `<experiment>/tensorboard/`
on storage by a background thread every `sync_every_s`, at each version and at the end, so
a path or an S3 bucket show the run as it goes and the loop never waits for the copy.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import threading

import torch

from trainer.collectives import all_reduce_sum


# Up to this many tasks the console shows a line (or table row) per task; beyond, counts and spreads
# (a FLAN-sized mixture would print pages at every validation). TensorBoard and storage keep each task.
CONSOLE_TASKS = 20


def say(message: str) -> None:
    """One console line on the worker's stdout, which Ray forwards to the driver's console."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def quiet_libraries() -> None:
    """Ray Train workers log at INFO; these libraries then flood the console (dill dumps bytecode)."""
    from trainer.runtime import ray_logger_files

    names = ["dill", "datasets", "transformers", "DeepSpeed", "deepspeed", "torch.distributed", "ray.train", "absl"]
    for name in names + ray_logger_files():
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_library_warnings()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def quiet_library_warnings() -> None:
    """Deprecations inside the libraries, which users can do nothing about (driver and workers)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers.models.encoder_decoder")
    # peft asks transformers a question transformers renamed; the answer is the same.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class StepStats:
    """Per-task sums for one optimizer step on one rank; `reduce` makes them global.

    Nothing here waits for the device: the losses add up where they were computed, the counts
    come from the micro-batch as it was on the host, and `reduce` reads everything back once per
    step (a `.item()` per micro-batch would make the host wait for each one's backward pass).
    """

    FIELDS = ("loss_sum", "micro_batches", "loss_items", "examples", "real_tokens", "padded_tokens")

    def __init__(self, tasks: list[str]):
        self.tasks = tasks
        self.counts = torch.zeros(len(tasks), len(self.FIELDS) - 1, dtype=torch.float64)  # on the host
        self.losses: torch.Tensor | None = None  # on the losses' device

    def add(self, task: str, loss: torch.Tensor, host_batch: dict, items: int = 1) -> None:
        """`loss`: the micro-batch's mean loss, where it was computed, over `items` items (tokens or
        rows: trainer.model.loss_items; 1 counts every micro-batch alike); `host_batch`: the
        micro-batch before it was moved there."""
        i = self.tasks.index(task)
        if self.losses is None:
            self.losses = torch.zeros(len(self.tasks), dtype=torch.float64, device=loss.device)
        self.losses[i] += loss.detach().to(torch.float64) * items
        mask = host_batch["attention_mask"]
        self.counts[i] += torch.tensor([1, items, mask.shape[0], float(mask.sum()), mask.numel()],
                                       dtype=torch.float64)

    @property
    def values(self) -> torch.Tensor:
        """[loss_sum, micro_batches, loss_items, examples, real_tokens, padded_tokens] per task, on the host (reads the device)."""
        losses = self.losses.cpu() if self.losses is not None else torch.zeros(len(self.tasks), dtype=torch.float64)
        return torch.cat([losses[:, None], self.counts], dim=1)

    def reduce(self, device: torch.device | str = "cpu",
               flags: list[float] = ()) -> tuple[dict[str, dict[str, float]], list[float]]:
        """({task: {loss, micro_batches, examples, real_tokens, padded_tokens}}, flags) over all ranks;
        a task's loss is the mean over its items (see `add`).

        The same sums on every rank, so the weighting state stays identical everywhere. `flags`
        are this rank's notes for the run's control (stop requests, uploads finished): they ride
        in the same all-reduce, so agreeing on them costs no collective of its own.
        """
        device = torch.device(device)
        losses = self.losses if self.losses is not None else torch.zeros(len(self.tasks), dtype=torch.float64)
        local = torch.cat([losses.to(device), self.counts.flatten().to(device),
                           torch.tensor(flags, dtype=torch.float64).to(device)])
        summed = all_reduce_sum(local, device).tolist()  # the step's one read back from the device
        n, width = len(self.tasks), self.counts.shape[1]
        out = {}
        for i, task in enumerate(self.tasks):
            mbs, items, examples, real, padded = summed[n + i * width:n + (i + 1) * width]
            out[task] = {"loss": summed[i] / items if items else math.nan, "micro_batches": mbs, "examples": examples,
                         "real_tokens": real, "padded_tokens": padded}
        return out, summed[n + self.counts.numel():]


def step_line(step: int, total: int, per_task: dict, lr: float, seconds: float, tokens_per_s: float, *,
              grad_norm: float | None = None, eta_s: float | None = None) -> str:
    losses = " ".join(f"{t} {v['loss']:.3f}" for t, v in per_task.items() if v["micro_batches"])
    norm = f" | grad norm {grad_norm:.3g}" if grad_norm is not None else ""
    eta = f" | eta {duration(eta_s)}" if eta_s is not None and step < total else ""
    return (f"[mtl] step {step}/{total} | loss {losses}{norm} | lr {lr:.2e} | {seconds:.2f}s | "
            f"{tokens_per_s:.0f} tok/s{eta}")


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 312 -> '5m12s', 9.4 -> '9s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Board:
    """TensorBoard scalars and text on rank 0, mirrored to storage as the run goes."""

    def __init__(self, storage, relative: str = "tensorboard", sync_every_s: float = 30.0):
        from torch.utils.tensorboard import SummaryWriter

        from trainer.scratch import scratch_dir

        self.local = scratch_dir("tensorboard")
        self.writer = SummaryWriter(str(self.local), flush_secs=max(1, int(sync_every_s)))
        self.storage, self.relative, self.sync_every_s = storage, relative, sync_every_s
        self._lock = threading.Lock()  # one copy at a time: the thread's and the loop's
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, name="mtl-tensorboard-sync", daemon=True)
        self._thread.start()

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(tag, value, step)

    def hparams(self, values: dict, metric_tags: list[str]) -> None:
        """The run's settings for TensorBoard's HParams tab, in this run's own event file (torch's
        add_hparams would open a sub-run per call). The metrics are scalar tags the run writes
        anyway (validation/<task>/<metric>); the tab shows their latest values beside the settings."""
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(values, {tag: 0.0 for tag in metric_tags}):
            self.writer.file_writer.add_summary(summary)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def sync(self) -> None:
        with self._lock:
            self.writer.flush()
            self.storage.upload(str(self.local), self.relative)

    def _sync_loop(self) -> None:
        from trainer.versions import StorageError

        while not self._closed.wait(self.sync_every_s):
            try:
                self.sync()
            except StorageError as exc:  # the next sync tries again; versions report their own errors
                say(f"[mtl] warning: TensorBoard events not copied this time: {exc}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.writer.close()
        self.sync()
        shutil.rmtree(self.local, ignore_errors=True)


def flat_hparams(job: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """A job as HParams: dotted keys, scalar values (lists as text; unset values left out)."""
    import json

    out = {}
    for key, value in job.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
    return out
