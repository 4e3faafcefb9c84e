"""The checks that keep ranks on several nodes in agreement, on one process (world of one): what
they refuse and the line they say it with. The multi-node forms run in test_node_local_disks."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from trainer.versions.agreement import require_parts_on_storage, require_same_data, require_shared_storage
from trainer.errors import UserError
from trainer.versions.storage import Storage


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))


def test_a_version_is_not_marked_while_a_ranks_files_are_missing_or_cut(storage):
    storage.write_text("step-000002/deepspeed/rank0.pt", "x" * 10)
    storage.write_text("step-000002/rng/rank-0.json", "{}")
    storage.write_text("step-000002/rng/rank-1.json", "{")  # cut short: 1 byte of 2
    mine = {"deepspeed/rank0.pt": 10, "rng/rank-0.json": 2}
    require_parts_on_storage(storage, "step-000002", [mine], "/runs")
    with pytest.raises(UserError, match=r"rank 1's files are not on storage.path /runs \(2 of 2 missing or cut short"):
        require_parts_on_storage(storage, "step-000002", [mine, {"rng/rank-1.json": 2, "deepspeed/rank1.pt": 10}], "/runs")


def test_one_rank_sees_its_own_probe_and_leaves_nothing(storage, tmp_path):
    require_shared_storage(storage, 0, str(tmp_path), wait_s=0)
    assert not list(tmp_path.iterdir())


def test_one_rank_agrees_with_itself_on_its_data():
    require_same_data({"sentiment": {"source": "abc", "labels": ["a"], "rows": {"train": 3}, "features": {"train": 3}}}, 0)

