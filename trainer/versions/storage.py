"""Shared storage for runs: a local/NFS folder or an S3 bucket, through one pyarrow filesystem.

Ray Train gets the same filesystem, so versions, metrics and TensorBoard files land together
under `<storage>/<experiment>/`.

Remote storage fails now and then (a throttled request, a dropped connection, an NFS server
that restarts). Every operation here is retried with growing pauses; only when the last
attempt fails does it raise a StorageError that names the operation and the path.
A missing file is an answer, not a failure, and is never retried.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

from trainer.errors import UserError, first_line

RETRY_DELAYS_S = (1.0, 3.0, 10.0)  # pauses between the attempts of one operation


class StorageError(UserError):
    """Storage still failed after every retry; the message names the operation and the path."""


@dataclass
class Storage:
    fs: object  # pyarrow.fs.FileSystem
    ray_path: str  # the storage path as Ray Train wants it with `fs` (no scheme)
    uri: str
    retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S

    def retried(self, what: str, relative: str, operation):
        """operation() until it succeeds, pausing between attempts; then a StorageError."""
        for attempt, pause in enumerate((*self.retry_delays_s, None), start=1):
            try:
                return operation()
            except FileNotFoundError:
                raise
            except OSError as exc:  # pyarrow's IO errors (S3, GCS, HDFS, local) are OSErrors
                if pause is None:
                    raise StorageError(f"could not {what} {self.describe(relative)} after {attempt} attempts: "
                                       f"{first_line(exc)}") from exc
                time.sleep(pause)

    def path(self, relative: str = "") -> str:
        root = self.ray_path.rstrip("/")
        return f"{root}/{relative}" if relative else root

    def write_text(self, relative: str, text: str) -> None:
        """The whole file or nothing. On a file system (a folder, NFS) the text goes to a temporary
        name beside the target and is renamed over it, so no reader (another node, a run after a
        crash) ever sees a truncated marker, registry or tags file; an object store's PUT is
        whole by itself."""
        path = self.path(relative)
        data = text.encode()

        def write():
            self.fs.create_dir(os.path.dirname(path), recursive=True)
            if getattr(self.fs, "type_name", None) != "local":
                with self.fs.open_output_stream(path) as out:
                    out.write(data)
                return
            temporary = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with self.fs.open_output_stream(temporary) as out:
                    out.write(data)
                self.fs.move(temporary, path)  # rename(2): atomic within a file system
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(temporary)
                raise
        self.retried("write", relative, write)

    def write_json(self, relative: str, data) -> None:
        self.write_text(relative, json.dumps(data, indent=1, default=str))

    def read_text(self, relative: str) -> str | None:
        import pyarrow.fs as pafs

        path = self.path(relative)

        def read():
            if self.fs.get_file_info(path).type != pafs.FileType.File:
                return None
            with self.fs.open_input_stream(path) as fh:
                return fh.read().decode()
        return self.retried("read", relative, read)

    def read_json(self, relative: str):
        text = self.read_text(relative)
        return json.loads(text) if text is not None else None

    def exists(self, relative: str) -> bool:
        import pyarrow.fs as pafs

        info = self.retried("look up", relative, lambda: self.fs.get_file_info(self.path(relative)))
        return info.type != pafs.FileType.NotFound

    def list_dirs(self, relative: str = "") -> list[str]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        infos = self.retried("list", relative, lambda: self.fs.get_file_info(selector))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def size(self, relative: str) -> int:
        """Bytes of all files under `relative`."""
        return sum(self.list_files(relative).values())

    def list_files(self, relative: str) -> dict[str, int]:
        """Every file under `relative` (path relative to it -> bytes), in one recursive listing."""
        import pyarrow.fs as pafs

        root = self.path(relative).rstrip("/")
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        infos = self.retried("list", relative, lambda: self.fs.get_file_info(selector))
        return {i.path[len(root):].lstrip("/"): i.size or 0 for i in infos if i.type == pafs.FileType.File}

    def list_file_times(self, relative: str) -> dict[str, int]:
        """The files directly in `relative`: name -> modification time in ns, by the storage's clock."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        infos = self.retried("list", relative, lambda: self.fs.get_file_info(selector))
        return {i.base_name: i.mtime_ns or 0 for i in infos if i.type == pafs.FileType.File}

    def download(self, relative: str, local: str) -> None:
        import pyarrow.fs as pafs

        os.makedirs(local, exist_ok=True)
        self.retried("download", relative, lambda: pafs.copy_files(
            self.path(relative), local, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem()))

    def download_files(self, relative: str, local: str, keep) -> list[str]:
        """The files under `relative` for which keep(path relative to it) holds, into `local`."""
        import pyarrow.fs as pafs

        root = self.path(relative).rstrip("/")
        selector = pafs.FileSelector(root, recursive=True)
        fetched = []
        for info in self.retried("list", relative, lambda: self.fs.get_file_info(selector)):
            if info.type != pafs.FileType.File:
                continue
            inner = info.path[len(root):].lstrip("/")
            if keep(inner):
                target = os.path.join(local, inner)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                self.retried("download", f"{relative}/{inner}", lambda: pafs.copy_files(
                    info.path, target, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem()))
                fetched.append(inner)
        return fetched

    def upload(self, local: str, relative: str) -> None:
        """A local folder's files into `relative`, merged with what is there."""
        import pyarrow.fs as pafs

        def upload():
            self.fs.create_dir(self.path(relative), recursive=True)
            pafs.copy_files(local, self.path(relative), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        self.retried("upload to", relative, upload)

    def delete_file(self, relative: str) -> None:
        """Removes the file; one that is already gone (say, by an attempt that failed late) is fine."""
        try:
            self.retried("delete", relative, lambda: self.fs.delete_file(self.path(relative)))
        except FileNotFoundError:
            pass

    def delete_dir(self, relative: str) -> None:
        try:
            self.retried("delete", relative, lambda: self.fs.delete_dir(self.path(relative)))
        except FileNotFoundError:
            pass

    def describe(self, relative: str = "") -> str:
        return f"{self.uri.rstrip('/')}/{relative}" if relative else self.uri


def open_storage(spec) -> Storage:
    """spec: a StorageSpec (path, endpoint_url, region)."""
    import pyarrow.fs as pafs

    if spec.path.startswith("s3://"):
        bucket_prefix = spec.path[len("s3://"):]
        kwargs = {}
        if spec.endpoint_url:
            scheme, _, host = spec.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        if spec.region:
            kwargs["region"] = spec.region
        kwargs.update(_s3_credentials_from_env())
        return Storage(pafs.S3FileSystem(**kwargs), bucket_prefix, spec.path)
    if "://" in spec.path:  # gs://, hdfs://, ...: whatever pyarrow can open, never a local folder named 'gs:'
        return _from_uri(spec.path)
    path = os.path.abspath(spec.path)
    os.makedirs(path, exist_ok=True)
    return Storage(pafs.LocalFileSystem(), path, path)


def worker_filesystem(spec, given):
    """The filesystem a worker writes versions with. Ray hands every worker the driver's (`given`),
    pickled with the keys the driver had in its environment, often a session token that expires
    within hours. Where this node has AWS credentials of its own (an instance role, IRSA, a profile:
    providers that renew themselves) or was given keys (trainer.job_env), the worker opens the
    bucket with its own credential chain instead."""
    from trainer.job_env import node_aws_credentials

    if not spec.path.startswith("s3://") or not node_aws_credentials():
        return given
    return open_storage(spec).fs


def open_experiment(location: str) -> tuple[Storage, str]:
    """(storage, name) of an experiment given by its folder or URI: `runs/demo`,
    `s3://bucket/runs/demo` ($AWS_ENDPOINT_URL for other S3-compatible servers)."""
    from trainer.spec import StorageSpec

    location = str(location).rstrip("/")
    if "://" not in location and not os.path.isdir(location):
        raise UserError(f"'{location}' is not an experiment folder")
    parent, _, name = location.rpartition("/")
    return open_storage(StorageSpec(path=parent or ".", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))), name


PROBE_TIMEOUT_S = 15.0


def storage_problem(spec, timeout_s: float | None = None) -> str | None:
    """Why the run could not write its versions to `spec.path`, found out in bounded time before
    any worker starts; None when it can. A local path needs a writable folder on its way; a
    remote one must answer one listing (pyarrow's own retries can take minutes against a dead
    endpoint, so the listing runs on a thread with a deadline)."""
    if "://" not in spec.path:
        path = existing = os.path.abspath(spec.path)
        while not os.path.exists(existing):  # the run makes the missing folders: the first one there must take them
            existing = os.path.dirname(existing)
        try:  # a file written and removed (permissions alone miss read-only mounts); nothing is left behind
            if not os.path.isdir(existing):
                raise NotADirectoryError(20, f"'{existing}' is not a folder")
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as exc:
            return f"storage.path: cannot write to '{path}': {exc.strerror or exc}"
        return None
    timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    where = f"{spec.path} at {spec.endpoint_url}" if getattr(spec, "endpoint_url", None) else spec.path
    outcome: list = []

    def probe() -> None:
        try:
            storage = open_storage(spec)
            storage.fs.get_file_info(storage.path())
            outcome.append(None)
        except BaseException as exc:  # reported below, on the calling thread
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="mtl-storage-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"storage.path: no answer from {where} within {timeout_s:g}s (is the endpoint up and reachable?)"
    if outcome[0] is not None:
        if isinstance(outcome[0], UserError):
            return str(outcome[0])
        return f"storage.path: cannot reach {where}: {first_line(outcome[0])}"
    return None


def _s3_credentials_from_env() -> dict[str, str]:
    """Keys from this process's environment, given to the filesystem explicitly.

    Ray hands the filesystem to its Train controller and to every worker by pickling it; a
    pyarrow S3FileSystem pickles explicit keys but re-resolves default credentials wherever it
    is unpickled, where the environment may have none. With no keys here (instance profiles,
    workload identity) nothing is added and every node uses its own.
    """
    env = os.environ
    if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
        return {}
    keys = {"access_key": env["AWS_ACCESS_KEY_ID"], "secret_key": env["AWS_SECRET_ACCESS_KEY"]}
    if env.get("AWS_SESSION_TOKEN"):
        keys["session_token"] = env["AWS_SESSION_TOKEN"]
    return keys


def _from_uri(uri: str) -> Storage:
    import pyarrow.fs as pafs

    from trainer.errors import SpecError, first_line

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # ArrowInvalid (unknown scheme), OSError (e.g. no JVM for hdfs://)
        raise SpecError("storage.path", f"cannot open '{uri}': {first_line(exc)}. Use a folder (local or NFS), "
                                        f"s3://bucket/prefix, gs://bucket/prefix, or another URI pyarrow "
                                        f"supports") from None
    return Storage(fs, path, uri)
