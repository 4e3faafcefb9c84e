"""Micro-batches: disjoint equal shards, per-micro-batch padding, length grouping, token budgets, resume."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from trainer.data.batching import TaskStream, collate, group_micro_batches, shard_indices
from trainer.errors import DataError
from trainer.data.task_data import epoch_padding


def features(lengths, pad_to=None):
    ids = [[5] * n for n in lengths]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * n for n in lengths],
                                       "labels": list(range(len(lengths))), "length": list(lengths)})


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_equal_and_change_per_epoch(world):
    n = 103
    for epoch in range(3):
        shards = [set(shard_indices(n, r, world, seed=7, salt=11, epoch=epoch).tolist()) for r in range(world)]
        assert all(len(s) == n // world for s in shards)
        assert len(set().union(*shards)) == (n // world) * world  # pairwise disjoint
    e0 = shard_indices(n, 0, world, 7, 11, 0)
    e1 = shard_indices(n, 0, world, 7, 11, 1)
    assert not np.array_equal(e0, e1)


def test_collate_pads_to_longest_in_micro_batch_not_max_length():
    batch = collate({"input_ids": [[1, 2], [3, 4, 5, 6]], "attention_mask": [[1, 1], [1, 1, 1, 1]],
                     "labels": [[7, 8], [9, -100, 10, 11]], "start_positions": [0, 1],
                     "offset_mapping": [[None, [0, 1]], [None, [0, 2], [3, 4], None]]}, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [3, 4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[7, 8, -100, -100], [9, -100, 10, 11]]
    assert batch["start_positions"].tolist() == [0, 1]
    assert batch["offset_mapping"][0] == [None, [0, 1]]  # metadata passes through untouched


def test_collate_pads_seq2seq_targets_to_their_own_length():
    batch = collate({"input_ids": [[1, 2], [3]], "attention_mask": [[1, 1], [1]],
                     "labels": [[5, 6, 7, 8], [9]]}, pad_id=0)
    assert batch["input_ids"].shape == (2, 2)
    assert batch["labels"].tolist() == [[5, 6, 7, 8], [9, -100, -100, -100]]


def test_length_grouping_raises_real_token_share():
    lengths = np.random.default_rng(0).integers(5, 200, size=2000)
    common = dict(rank=0, world=2, seed=0, task="t", rows=8, max_tokens=None, pool=50)
    grouped = epoch_padding(lengths, by_length=True, **common)
    plain = epoch_padding(lengths, by_length=False, **common)
    assert grouped.real_tokens == plain.real_tokens
    assert plain.efficiency < 0.75 and grouped.efficiency > 0.95


def test_grouped_batches_cover_shard_once_and_are_shuffled():
    lengths = np.arange(1, 401)
    idx = shard_indices(400, 0, 1, 0, 0, 0)
    batches = group_micro_batches(idx, lengths, np.random.default_rng(0), rows=4, max_tokens=None,
                                  pool=5, by_length=True)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(idx.tolist())
    maxima = [max(lengths[b]) for b in batches]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_token_budget_bounds_padded_tokens():
    lengths = np.random.default_rng(1).integers(10, 120, size=500)
    idx = shard_indices(500, 0, 1, 0, 0, 0)
    batches = group_micro_batches(idx, lengths, np.random.default_rng(0), rows=None, max_tokens=512,
                                  pool=10, by_length=True)
    assert all(len(b) * max(lengths[b]) <= 512 for b in batches)
    assert sorted(i for b in batches for i in b) == sorted(idx.tolist())


def test_stream_resumes_identically_across_epochs():
    feats = features(np.random.default_rng(2).integers(3, 30, size=37).tolist())
    make = lambda: TaskStream("t", feats, rank=1, world=2, seed=3, pad_id=0, micro_batch_size=4, pool=2)  # noqa: E731
    a = make()
    for _ in range(7):
        a.next_indices()
    state = a.state_dict()
    expected = [a.next_indices() for _ in range(12)]  # crosses an epoch boundary (5 batches/epoch)
    b = make()
    b.load_state_dict(state)
    assert [b.next_indices() for _ in range(12)] == expected
    assert a.epoch >= 3


def test_stream_batches_are_padded_tensors():
    feats = features([3, 9, 4, 4, 7, 2])
    batch = TaskStream("t", feats, rank=0, world=1, seed=0, pad_id=0, micro_batch_size=3).next_batch()
    assert batch["input_ids"].shape[1] == max(batch["length"].tolist())


def test_stream_needs_a_row_per_worker():
    with pytest.raises(DataError, match="2 training examples cannot be shared by 3 workers"):
        TaskStream("t", features([3, 4]), rank=0, world=3, seed=0, pad_id=0, micro_batch_size=2)


def _epoch_draws(streams: list[TaskStream], epoch: int) -> list[int]:
    """Everything the ranks draw until each has left `epoch` (in lockstep, as training draws)."""
    drawn = []
    while any(s.epoch == epoch and (s._batches is None or s.cursor < len(s._batches)) for s in streams):
        for s in streams:
            if s.epoch == epoch and (s._batches is None or s.cursor < len(s._batches)):
                drawn += s.next_indices()
    return drawn


@pytest.mark.parametrize("old_world,new_world,max_tokens", [(2, 1, None), (1, 2, None), (2, 3, None),
                                                           (3, 2, 60)])
def test_a_resized_run_draws_every_example_of_the_epoch_exactly_once(old_world, new_world, max_tokens):
    lengths = np.random.default_rng(4).integers(3, 30, size=60).tolist()
    feats = features(lengths)

    def stream(rank, world):
        return TaskStream("t", feats, rank=rank, world=world, seed=3, pad_id=0, pool=2,
                          micro_batch_size=None if max_tokens else 4, max_tokens=max_tokens)

    old = [stream(r, old_world) for r in range(old_world)]
    before = []
    for _ in range(3):  # three steps of one micro-batch per rank
        for s in old:
            before += s.next_indices()
    states = [s.state_dict() for s in old]
    new = [stream(r, new_world) for r in range(new_world)]
    for s in new:
        s.continue_from(states, old_world)
    after = _epoch_draws(new, 0)
    assert sorted(before + after) == list(range(60))  # none skipped, none twice

    # The continued epoch is part of the state: a resume of the resized run draws the same.
    copy = stream(0, new_world)
    fresh = stream(0, new_world)
    fresh.continue_from(states, old_world)
    fresh.next_indices()
    copy.load_state_dict(fresh.state_dict())
    assert [copy.next_indices() for _ in range(20)] == [fresh.next_indices() for _ in range(20)]
    assert fresh.epoch >= 1  # and the next epochs are sharded as usual
