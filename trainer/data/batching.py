"""Task-homogeneous micro-batches: sharded per rank, grouped by length, padded per micro-batch.

Per task and epoch, every rank computes the same seeded permutation of the task's
features and takes its own contiguous block of it, so shards are disjoint and equally
long. Inside a shard, examples are sorted by length within pools of ~`pool` micro-batches
(sorting the whole shard would make the batch order track length), cut into micro-batches
(by row count or by a token budget), and the micro-batches are shuffled. The order is a
pure function of (seed, task, epoch, rank, world), so a stream's whole state is
(epoch, cursor).

A run resumed on another number of workers continues the current epoch from global
positions (`continue_from`): the examples that the old ranks already drew in it are known
from their (epoch, cursor); the others, in the epoch's order, are dealt round-robin to the
new ranks, so within that epoch no example is skipped or drawn twice. That epoch's order is
then part of the state; the epochs after it are sharded as usual for the new world size.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from trainer.errors import DataError

IGNORE_INDEX = -100
# Per-token fields and their padding value; everything else is per-example.
PAD_VALUES = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}
TENSOR_FIELDS = {"labels", "start_positions", "end_positions", "label_id", "prompt_length", "length", "example_id"}


def task_salt(task: str) -> int:
    """A stable per-task number (Python's hash() changes between processes)."""
    return zlib.crc32(task.encode())


def epoch_permutation(n: int, seed: int, salt: int, epoch: int) -> np.ndarray:
    """The order of a task's examples in `epoch` that every rank's shard is cut from."""
    return np.random.default_rng([seed, salt, epoch]).permutation(n)


def shard_indices(n: int, rank: int, world: int, seed: int, salt: int, epoch: int) -> np.ndarray:
    per_rank = n // world
    return epoch_permutation(n, seed, salt, epoch)[rank * per_rank:(rank + 1) * per_rank]


def group_micro_batches(indices: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, *,
                        rows: int | None, max_tokens: int | None, pool: int, by_length: bool) -> list[list[int]]:
    if rows is None and max_tokens is None:
        raise ValueError("give rows or max_tokens")
    rows_per_pool = pool * (rows or max(1, max_tokens // max(1, int(np.median(lengths[indices])))))
    batches: list[list[int]] = []
    for start in range(0, len(indices), rows_per_pool):
        chunk = indices[start:start + rows_per_pool]
        if by_length:
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(_cut(chunk, lengths, rows, max_tokens))
    if by_length:
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches


def _cut(chunk: np.ndarray, lengths: np.ndarray, rows: int | None, max_tokens: int | None) -> list[list[int]]:
    if max_tokens is None:
        return [chunk[i:i + rows].tolist() for i in range(0, len(chunk), rows)]
    out, current, longest = [], [], 0
    for i in chunk.tolist():
        new_longest = max(longest, int(lengths[i]))
        if current and new_longest * (len(current) + 1) > max_tokens:
            out.append(current)
            current, new_longest = [], int(lengths[i])
        current.append(i)
        longest = new_longest
    if current:
        out.append(current)
    return out


def collate(columns: dict[str, list], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Pad each per-token field to its longest in this micro-batch (never to max_length).

    Fields are padded separately: a seq2seq target (`labels`) has its own length.
    """
    out: dict = {}
    for key, values in columns.items():
        if key in PAD_VALUES and isinstance(values[0], list):
            fill = pad_id if PAD_VALUES[key] is None else PAD_VALUES[key]
            longest = max(len(v) for v in values)
            if pad_to_multiple_of:
                longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
            out[key] = torch.tensor([v + [fill] * (longest - len(v)) for v in values], dtype=torch.long)
        elif key in TENSOR_FIELDS:
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values  # metadata (offsets, ids) for evaluation
    return out


def column_array(features, name: str) -> np.ndarray:
    """A whole column of a `datasets.Dataset` as a numpy array, read through Arrow: `features[name]`
    builds Python lists first, 10x slower (5 ms for 300 rows; at hundreds of tasks, seconds of start)."""
    return features.with_format("arrow")[name].to_numpy()


class TaskStream:
    """An endless, resumable stream of one task's micro-batches for one rank."""

    def __init__(self, task: str, features, *, rank: int, world: int, seed: int, pad_id: int,
                 micro_batch_size: int | None, max_tokens: int | None = None, pool: int = 50,
                 by_length: bool = True):
        if len(features) < world:
            raise DataError(f"task '{task}': {len(features)} training examples cannot be shared by {world} workers")
        self.task, self.features, self.rank, self.world, self.seed = task, features, rank, world, seed
        self.pad_id, self.rows, self.max_tokens = pad_id, micro_batch_size, max_tokens
        self.pool, self.by_length = pool, by_length
        self.lengths = column_array(features, "length")
        self.salt = task_salt(task)
        self.epoch, self.cursor = 0, 0
        self.remainder: tuple[int, np.ndarray] | None = None  # (epoch, its examples not yet drawn), after a resize
        self._batches: list[list[int]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.remainder is not None and self.remainder[0] == epoch:
            idx = self.remainder[1][self.rank::self.world]  # sizes differ by at most one: nothing left out
        else:
            idx = shard_indices(len(self.features), self.rank, self.world, self.seed, self.salt, epoch)
        rng = np.random.default_rng([self.seed, self.salt, epoch, self.rank, 1])
        return group_micro_batches(idx, self.lengths, rng, rows=self.rows, max_tokens=self.max_tokens,
                                   pool=self.pool, by_length=self.by_length)

    def next_indices(self) -> list[int]:
        if self._batches is None:
            self._batches = self.epoch_batches(self.epoch)
        if self.cursor >= len(self._batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._batches = self.epoch_batches(self.epoch)
        batch = self._batches[self.cursor]
        self.cursor += 1
        return batch

    def next_batch(self) -> dict:
        return collate(self.features[self.next_indices()], self.pad_id)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "cursor": self.cursor}
        if self.remainder is not None:
            state["remainder"] = {"epoch": self.remainder[0], "examples": self.remainder[1].tolist()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        left = state.get("remainder")
        self.remainder = (int(left["epoch"]), np.asarray(left["examples"], dtype=np.int64)) if left else None
        self._batches = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every example of `epoch` in the order the ranks' shards are cut from."""
        if self.remainder is not None and self.remainder[0] == epoch:
            return self.remainder[1]
        return epoch_permutation(len(self.features), self.seed, self.salt, epoch)

    def continue_from(self, old_states: list[dict], old_world: int) -> None:
        """Continue the epoch that streams of `old_world` ranks (their states, by rank) were in.

        With row-counted micro-batches all old ranks are in the same epoch. With token budgets
        their shards may hold different numbers of micro-batches and a rank may have moved on to
        the next epoch; the epoch continued is the earliest, and what a rank already drew from
        its next one may be drawn again there.
        """
        epoch = min(int(s["epoch"]) for s in old_states)
        drawn: set[int] = set()
        for rank, state in enumerate(old_states):
            old = TaskStream(self.task, self.features, rank=rank, world=old_world, seed=self.seed,
                             pad_id=self.pad_id, micro_batch_size=self.rows, max_tokens=self.max_tokens,
                             pool=self.pool, by_length=self.by_length)
            old.load_state_dict(state)
            batches = old.epoch_batches(epoch)
            for batch in batches[:old.cursor] if old.epoch == epoch else batches:
                drawn.update(batch)
        order = old.epoch_order(epoch)  # every old stream has the same order for the epoch
        self.remainder = (epoch, np.asarray([i for i in order.tolist() if i not in drawn], dtype=np.int64))
        self.epoch, self.cursor, self._batches = epoch, 0, None
