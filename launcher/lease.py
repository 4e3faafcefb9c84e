"""One run per experiment: a lease on storage that a run's driver holds from before its workers
restore until it ends.

Two drivers on one experiment (a job submitted twice, a RayJob re-run, a user's second terminal)
would otherwise restore, prune and commit the same versions at once, and shards of two runs could
end up under one marker. Each driver writes a candidate, `<experiment>/.lease/<run id>.json` (who,
where, since), waits a moment (SETTLE_S), then lists the candidates: the oldest one by the
storage's own clock (its modification time; names break ties) holds the lease, the others remove
theirs and stop, naming the holder. The wait exceeds the storage clock's granularity, so a
candidate written after another's listing is strictly younger than it: every contender that
could matter sees the same order, and exactly one holds.

The same protocol works on a folder, NFS and an object store with read-after-write consistency
(S3): it needs only writes, a listing and deletes, where a conditional put is not available
through the storage layer (pyarrow's S3 filesystem has none).

Candidates are written once, so their order never changes; each driver's heartbeat goes to
`<run id>.beat`, rewritten every ttl/4. A holder whose heartbeat has not changed for
`storage.lease_ttl_s` is a driver that is gone (SIGKILLed, its machine lost): its files are
removed and the lease taken over, said in one line. A heartbeat recent by the holder's clock
is taken at its word; an old one is watched for ttl on this machine's clock before the lease is
taken from it, so two machines' clocks that differ never hand a live run's lease away.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

from trainer.errors import UserError

# How long a candidate waits before it lists the others: longer than the storage's clock granularity,
# so a candidate written after that listing is strictly younger (S3 dates objects to the second; a
# folder or NFS to the nanosecond).
SETTLE_S = {"local": 0.05}
SETTLE_OTHER_S = 2.0
FOLDER = ".lease"


class LeaseHeld(UserError):
    """Another live run holds the experiment."""


class Lease:
    def __init__(self, storage, experiment: str, run_id: str, ttl_s: float, *, settle_s: float | None = None,
                 say=None):
        self.storage, self.experiment, self.run_id = storage, experiment, run_id
        self.ttl_s = ttl_s
        self.settle_s = SETTLE_S.get(getattr(storage.fs, "type_name", ""), SETTLE_OTHER_S) if settle_s is None \
            else settle_s
        self.say = say or (lambda line: print(f"[mtl] {line}", file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def mine(self) -> str:
        return self._file(self.run_id, "json")

    def _file(self, run: str, kind: str) -> str:
        return f"{self.experiment}/{FOLDER}/{run}.{kind}"

    def acquire(self) -> None:
        """Hold the lease or raise LeaseHeld naming the run that does; then keep it alive."""
        try:
            self._contend()
        except BaseException:
            self._remove(self.run_id)  # no candidate of ours outlives a run that did not start
            raise
        self._thread = threading.Thread(target=self._beat_on, name="mtl-lease", daemon=True)
        self._thread.start()

    def _contend(self) -> None:
        self._write()
        self._beat_once()
        time.sleep(self.settle_s)
        while True:
            candidates = self._candidates()
            holder = next(iter(candidates), None)
            if holder is None or holder == self.run_id:
                break
            info = self._read(holder)
            state = self._holder_state(holder, info)
            if state == "alive":
                raise LeaseHeld(f"experiment '{self.experiment}' is being trained by another run: {describe(info)}. "
                                f"Wait for it to end, stop it, or give this run another name (--new)")
            if state == "gone":
                self._remove(holder)
                self.say(f"took over '{self.experiment}' from {describe(info)}: its heartbeat stopped "
                         f"(storage.lease_ttl_s {self.ttl_s:g}s)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._remove(self.run_id)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the protocol's pieces
    def _write(self) -> None:
        self.storage.write_text(self.mine, json.dumps({
            "run": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
            "command": " ".join(sys.argv[:3])}))

    def _beat_once(self) -> None:
        self.storage.write_text(self._file(self.run_id, "beat"), str(time.time()))

    def _remove(self, run: str) -> None:
        self.storage.delete_file(self._file(run, "json"))
        self.storage.delete_file(self._file(run, "beat"))

    def _candidates(self) -> dict[str, int]:
        """run id -> when storage wrote its candidate (ns, by the storage's clock), oldest first (ties: by name)."""
        listed = self.storage.list_file_times(f"{self.experiment}/{FOLDER}")
        runs = {name[:-len(".json")]: stamp for name, stamp in listed.items() if name.endswith(".json")}
        return dict(sorted(runs.items(), key=lambda item: (item[1], item[0])))

    def _read(self, run: str) -> dict:
        try:
            info = json.loads(self.storage.read_text(self._file(run, "json")) or "{}")
            info["beat"] = float(self.storage.read_text(self._file(run, "beat")) or 0)
        except ValueError:
            return {"run": run}
        return info

    def _holder_state(self, run: str, info: dict) -> str:
        """"alive" (a recent heartbeat), "ended" (its candidate went away) or "gone" (unchanged for ttl).

        A heartbeat within ttl by the holder's clock is taken at its word; an older one is watched
        on this machine's clock before the lease is taken from it (the two clocks may differ)."""
        if time.time() - float(info.get("beat", 0)) < self.ttl_s:
            return "alive"
        folder = f"{self.experiment}/{FOLDER}"
        seen = self.storage.list_file_times(folder).get(f"{run}.beat")
        deadline = time.monotonic() + self.ttl_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.ttl_s / 8))
            listed = self.storage.list_file_times(folder)
            if f"{run}.json" not in listed:
                return "ended"
            if listed.get(f"{run}.beat") != seen:
                return "alive"
        return "gone"

    def _beat_on(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if f"{self.run_id}.json" not in self.storage.list_file_times(f"{self.experiment}/{FOLDER}"):
                    self.say(f"warning: the lease on '{self.experiment}' was taken over (this driver was "
                             f"silent for over {self.ttl_s:g}s); another run may be writing its versions")
                    return
                self._beat_once()
            except Exception as exc:  # noqa: BLE001 - storage down for a moment: the next beat tries again
                self.say(f"warning: could not renew the lease on '{self.experiment}': {exc}")


def describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if info.get("since") else "?"
    return (f"run {info.get('run', '?')[:12]} on {info.get('host', '?')} (pid {info.get('pid', '?')}, "
            f"since {since}, `{info.get('command', '?')}`)")
