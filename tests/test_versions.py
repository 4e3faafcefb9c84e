"""Finding versions on storage: committed only, latest/best/by name, and what a resume on another world size changes."""

from __future__ import annotations

import json

import pytest

from trainer.spec import StorageSpec
from trainer.versions.storage import open_storage
from launcher.versions import pick_version, resume_point
from trainer.versions.checkpoint import committed_versions
from trainer.errors import UserError
from trainer.versions.version_registry import protected, registry, scores_of


@pytest.fixture
def storage(tmp_path):
    exp = tmp_path / "exp"
    for step, committed in ((2, True), (4, True), (6, False)):  # step 6: killed while writing
        version = exp / f"step-{step:06d}"
        version.mkdir(parents=True)
        (version / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 2}))
        if committed:
            (version / "COMMITTED").write_text("ok\n")
    scores = {"step-000002": {"a": {"metric": "accuracy", "value": 0.9}, "b": {"metric": "f1", "value": 0.4}},
              "step-000004": {"a": {"metric": "accuracy", "value": 0.7}, "b": {"metric": "f1", "value": 0.5}},
              "step-000006": {"a": {"metric": "accuracy", "value": 1.0}, "b": {"metric": "f1", "value": 1.0}}}
    (exp / "registry.json").write_text(json.dumps(
        registry("step-000004", ["step-000002", "step-000004"], scores)))
    return open_storage(StorageSpec(path=str(tmp_path)))


def test_only_committed_versions_count(storage):
    assert committed_versions(storage, "exp") == ["step-000002", "step-000004"]
    assert pick_version(storage, "exp", "latest") == "step-000004"
    assert pick_version(storage, "exp", "best") == "step-000002"  # mean 0.65 beats 0.60; step 6 never committed
    assert pick_version(storage, "exp", "best:b") == "step-000004"
    with pytest.raises(UserError, match="no best version for task 'c' in 'exp' \\(tasks with one: a, b\\)"):
        pick_version(storage, "exp", "best:c")
    with pytest.raises(UserError, match="'step-000006' of 'exp' not found; committed: step-000002, step-000004"):
        pick_version(storage, "exp", "step-000006")
    with pytest.raises(UserError, match="no committed version of 'nothing'"):
        pick_version(storage, "nothing", "latest")


def test_resuming_on_another_world_size_says_what_changes(storage):
    from trainer.spec import TrainSpec

    train = TrainSpec(micro_batches_per_step=4)
    assert resume_point(storage, "exp", train, 2) == ("step-000004", None)
    assert resume_point(storage, "fresh", train, 4) == (None, None)
    version, note = resume_point(storage, "exp", train, 4)
    assert version == "step-000004"
    assert "written by 2 workers and resumes on 4" in note
    assert "4×4 micro-batches instead of 2×4; train.micro_batches_per_step=2 with --allow-changes keeps it" in note
    _, note = resume_point(storage, "exp", TrainSpec(micro_batches_per_step=3), 4)
    assert note.endswith("instead of 2×3")  # 1.5 per worker: no hint


def test_retention_keeps_newest_and_best():
    from trainer.versions.checkpoint import versions_to_delete

    names = [f"step-{s:06d}" for s in (10, 20, 30, 40, 50)]
    assert versions_to_delete(names, None, set()) == []
    assert versions_to_delete(names, 2, set()) == names[:3]
    assert versions_to_delete(names, 2, {"step-000020"}) == ["step-000010", "step-000030"]


def test_committed_versions_from_a_storage_rooted_at_the_experiment(storage):
    from trainer.versions.checkpoint import committed_versions
    from trainer.versions.storage import Storage

    rooted = Storage(storage.fs, storage.path("exp"), storage.path("exp"))  # as a worker sees it
    assert committed_versions(rooted) == ["step-000002", "step-000004"]


def test_a_rank_downloads_only_its_own_shards_and_rng():
    from trainer.versions.checkpoint import rank_needs

    assert rank_needs("deepspeed/state/mp_rank_00_model_states.pt", 1)
    assert rank_needs("deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt", 1)
    assert not rank_needs("deepspeed/state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", 1)
    assert rank_needs("deepspeed/state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", 0)
    assert rank_needs("rng/rank-1.json", 1) and not rank_needs("rng/rank-0.json", 1)
    assert not rank_needs("weights/model.pt", 0)
    assert rank_needs("trainer_state.json", 1) and rank_needs("tokenizer/tokenizer.json", 3)


def test_pruning_removes_the_marker_before_the_files(storage, monkeypatch):
    from trainer.versions.checkpoint import committed_versions, delete_version

    calls = []
    real_delete_dir = storage.delete_dir
    monkeypatch.setattr(storage, "delete_dir", lambda rel: (calls.append(("dir", rel)), real_delete_dir(rel)))
    real_delete_file = storage.delete_file
    monkeypatch.setattr(storage, "delete_file", lambda rel: (calls.append(("file", rel)), real_delete_file(rel)))
    assert delete_version(storage, "step-000002", "exp")
    assert calls == [("file", "exp/step-000002/COMMITTED"), ("dir", "exp/step-000002")]
    assert committed_versions(storage, "exp") == ["step-000004"]


def test_the_registry_ranks_only_versions_scored_at_their_own_step():
    evaluated = {"step": 4, "split": "validation", "primary": {"a": "accuracy", "s": "rougeL"},
                 "tasks": {"a": {"accuracy": 0.8, "macro_f1": 0.7}, "s": {"rouge1": 0.5, "rougeL": 0.4}}}
    assert scores_of(evaluated, 4) == {"a": {"metric": "accuracy", "value": 0.8}, "s": {"metric": "rougeL", "value": 0.4}}
    assert scores_of(evaluated, 5) is None  # saved a step after the evaluation: other weights
    scores = {"step-000004": scores_of(evaluated, 4),
              "step-000008": {"a": {"metric": "accuracy", "value": 0.9}},  # only one task scored
              "step-000012": {"a": {"metric": "accuracy", "value": 0.6}, "s": {"metric": "rougeL", "value": 0.5}}}
    reg = registry("step-000012", ["step-000004", "step-000008", "step-000012"], scores)
    assert reg["best"]["a"]["version"] == "step-000008" and reg["best"]["s"]["version"] == "step-000012"
    assert reg["overall"] == {"version": "step-000004", "score": pytest.approx(0.6)}  # 0.6 vs 0.55
    # a pruned version is never named, and keep_best protects each task's best and the overall one
    reg = registry("step-000012", ["step-000004", "step-000012"], scores)
    assert reg["best"]["a"]["version"] == "step-000004" and "step-000008" not in json.dumps(reg)
    assert protected(scores, ["step-000004", "step-000008", "step-000012"]) == \
        {"step-000004", "step-000008", "step-000012"}


def test_tags_name_versions_and_resolve_like_them(storage):
    from launcher.versions import format_versions, tag_version, untag, version_table

    assert tag_version(storage, "exp", "best:b", "prod") == "step-000004"
    assert pick_version(storage, "exp", "prod") == "step-000004"
    for bad in ("latest", "best", "step-000002", "9lives", "has space"):
        with pytest.raises(UserError, match=f"tag '{bad}': use a letter"):
            tag_version(storage, "exp", "latest", bad)
    with pytest.raises(UserError, match="'step-000006' of 'exp' not found"):
        tag_version(storage, "exp", "step-000006", "unfinished")
    rows = version_table(storage, "exp")
    assert [(r["version"], r["marks"], r["tags"]) for r in rows] == [
        ("step-000002", ["best", "best:a"], []), ("step-000004", ["latest", "best:b"], ["prod"])]
    assert rows[0]["scores"] == {"a": 0.9, "b": 0.4}
    assert "latest, best:b, prod" in format_versions(rows)
    assert untag(storage, "exp", "prod") == "step-000004"
    with pytest.raises(UserError, match="'exp' has no tag 'prod' \\(tags: none\\)"):
        untag(storage, "exp", "prod")


def test_a_version_whose_task_name_is_a_path_is_refused_before_it_becomes_one(tmp_path):
    """tasks.json is read from shared storage: a crafted task name ('../../x') would make export
    write heads/../../x.safetensors outside --out. No name a job could not have is accepted."""
    import json

    from trainer.errors import UserError
    from trainer.inference.version_io import load_version

    folder = tmp_path / "crafted" / "step-000001"
    folder.mkdir(parents=True)
    (folder / "COMMITTED").write_text("ok\n")
    (folder / "tasks.json").write_text(json.dumps({"kind": "heads", "encoding": "heads", "tasks": {
        "../../escaped": {"type": "classification", "labels": ["a", "b"]}}}))
    with pytest.raises(UserError, match=r"tasks.json: task name '../../escaped' must be letters, digits, '_' or '-'"):
        load_version(folder)
    assert not (tmp_path / "escaped.safetensors").exists()


def test_a_lora_versions_frozen_base_is_read_rounded_as_a_bf16_run_held_it():
    """The demo trains in bf16: DeepSpeed cast its base, and the in-training validation read that.
    Read in fp32, its test scores moved (QA exact match 0.300 -> 0.286)."""
    import torch

    from trainer.inference.version_io import as_trained

    model = torch.nn.Linear(4, 4)
    model.weight.requires_grad_(False)  # the frozen base
    model.weight.data = torch.tensor([[1.0 + 2 ** -12] * 4] * 4)  # not a bf16 number
    trained = model.bias.detach().clone()
    as_trained(model, "fp32")
    assert model.weight[0, 0].item() == 1.0 + 2 ** -12
    as_trained(model, "bf16")
    assert model.weight.dtype == torch.float32 and model.weight[0, 0].item() == 1.0  # rounded as bf16 holds it
    assert torch.equal(model.bias, trained)  # what was trained comes from the version itself
