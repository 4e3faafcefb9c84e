"""Where a worker runs: the one module of trainer/ that touches Ray.

The worker loop (trainer.loop) asks its runtime who it is (rank, world, local rank, device,
node), where the experiment's storage is, and what outside the loop asks it to stop. Two
runtimes answer:

- `RayRuntime`: a Ray Train worker, as `mtl train` and `mtl submit` start them. Ray made the
  process group; the driver's stop request comes through Ray's key-value store, a node's
  drain as Ray's preemption notice, the driver's secrets as an object in Ray's store.
- `TorchrunRuntime`: a plain torch.distributed process under `torchrun` or Slurm's `srun`
  (`python -m launcher.torchrun`), for clusters without Ray and machines where Ray is not
  installed. It makes the process group from torchrun's environment; SIGTERM (torchrun
  forwards it, Slurm sends it before a job's time runs out) is the one stop request.

Ray is imported inside functions only: `import trainer.runtime` works without Ray installed.
"""

from __future__ import annotations

import os
import signal
import socket
from datetime import timedelta
from typing import Callable

import torch

from trainer.errors import UserError

KV_NAMESPACE = "mtl"

# -- Ray helpers the driver and non-rank processes use too ------------------------------------------


def in_ray_worker() -> bool:
    """Whether this process is a Ray task's or actor's (not a driver, not outside Ray)."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():  # checked first: asking anything else of Ray would start one
        return False
    from ray._private.worker import WORKER_MODE, global_worker  # no public way to tell a driver from a worker

    return global_worker.mode == WORKER_MODE


def ray_gpu_ids() -> list:
    import ray

    return ray.get_gpu_ids()


def kv_put(key: bytes, value: bytes) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)


def kv_get(key: bytes) -> bytes | None:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)


def kv_del(key: bytes) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)


def put_object(value) -> object:
    import ray

    return ray.put(value)


def get_object(ref):
    import ray

    return ray.get(ref)


def ray_logger_files() -> list[str]:
    """Ray Train logs every report at INFO under a logger named after its file."""
    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:
        return []
    return [ray_context.__file__]


class RemoteTasks:
    """Functions run as Ray tasks beside the run (train.validation: task), keyed by the caller."""

    def __init__(self):
        self.pending: dict[str, object] = {}

    def submit(self, key: str, function: Callable, *args, cpus: float, gpus: float) -> None:
        import ray

        self.pending[key] = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(function).remote(*args)

    def finished(self, wait_s: float = 0.0) -> dict[str, object]:
        """key -> the task's result (or the error that ended it), for the tasks done within `wait_s`."""
        import ray

        if not self.pending:
            return {}
        refs = list(self.pending.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)  # all of them, or what is done by then
        done: dict[str, object] = {}
        for key in [k for k, ref in self.pending.items() if ref in ready]:
            try:
                done[key] = ray.get(self.pending.pop(key))
            except Exception as exc:  # the task's own error: reported by the caller, not fatal
                done[key] = exc
        return done


# -- the worker's runtime ----------------------------------------------------------------------------


class RayRuntime:
    """A Ray Train worker."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self._context = context
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.local_world = context.get_local_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def where(self) -> tuple[str, str]:
        """(node id, address) of this worker."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def storage_location(self) -> tuple[object, str]:
        """(the filesystem Ray Train hands the workers, the experiment's folder on it)."""
        storage = self._context.get_storage()
        return storage.storage_filesystem, storage.experiment_fs_path

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)  # metrics only: the versions' record is the markers on storage

    def driver_asked(self, key: bytes) -> bool:
        return kv_get(key) is not None

    def publish(self, key: bytes, value: bytes) -> None:
        """A note the driver reads (trainer.memory's phase, when a rank is killed for memory)."""
        kv_put(key, value)

    def preempted(self) -> bool:
        """Ray's notice, read from this worker's own context (the public call is a barrier)."""
        try:
            from ray.train.v2._internal.execution.context import get_train_context

            return get_train_context().preemption_context.preemption_info is not None
        except (ImportError, AttributeError, RuntimeError):
            return False

    def hook_sigterm(self, defer: Callable[[], bool]) -> bool:
        """Ray's worker runs `raise_sys_exit_with_custom_error_message` from its SIGTERM handler (on
        the worker's main thread; training runs on another thread, which may not install handlers
        of its own). Replacing that function is the one hook there is: `defer()` True postpones
        the exit. If a Ray version moves it, SIGTERM exits at once as before."""
        try:
            import ray._private.worker as ray_worker

            original = ray_worker.raise_sys_exit_with_custom_error_message
        except (ImportError, AttributeError):
            return False

        def on_exit(message: str, exit_code: int = 1):
            if "SIGTERM" in message and defer():
                return None
            return original(message, exit_code)

        ray_worker.raise_sys_exit_with_custom_error_message = on_exit
        return True


class TorchrunRuntime:
    """A torch.distributed process started by torchrun (or srun with its variables): RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Makes the process group."""

    def __init__(self, collective_timeout_s: float, use_gpu: bool):
        import torch.distributed as dist

        missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UserError(f"not started by torchrun: {', '.join(missing)} unset (run it as `torchrun "
                            f"--nproc_per_node=N -m launcher.torchrun JOB`)")
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if use_gpu:
            torch.cuda.set_device(self.local_rank)  # this rank's own GPU, as DeepSpeed expects by LOCAL_RANK
            self._device = torch.device("cuda", self.local_rank)
        else:
            self._device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_gpu else "gloo", timeout=timedelta(seconds=collective_timeout_s),
                                    device_id=self._device if use_gpu else None)

    def device(self) -> torch.device:
        return self._device

    def where(self) -> tuple[str, str]:
        host = socket.gethostname()
        try:
            address = socket.gethostbyname(host)
        except OSError:
            address = "?"
        return host, address

    def storage_location(self) -> tuple[object, str]:
        return None, ""  # the job's own storage (trainer.loop opens it)

    def report(self, metrics: dict) -> None:
        return None  # no controller to tell: the versions and their metrics are on storage

    def driver_asked(self, key: bytes) -> bool:
        return False  # no driver: SIGTERM is the stop request

    def publish(self, key: bytes, value: bytes) -> None:
        return None  # no driver to read it

    def preempted(self) -> bool:
        return False

    def hook_sigterm(self, defer: Callable[[], bool]) -> bool:
        """The loop runs on the main thread here: a plain handler. A SIGTERM that is not deferred
        (the second, or the grace over) exits as SIGTERM's default would."""
        def handle(signum, frame):
            if not defer():
                raise SystemExit(128 + signal.SIGTERM)

        signal.signal(signal.SIGTERM, handle)
        return True
