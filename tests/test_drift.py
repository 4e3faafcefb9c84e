"""Resuming a name with a changed job: refused with the differences, or a new experiment, or continued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import job_dict
from launcher.drift import schedule_note, training_differences
from launcher.jobfile import dump_job, parse_job, resolve
from launcher.run import check_drift
from trainer.spec import StorageSpec
from trainer.errors import UserError
from trainer.versions.storage import open_storage


def spec_with(**train):
    job = job_dict(Path("/data"))
    job["train"].update(train)
    return resolve(parse_job(job))


@pytest.fixture
def storage(tmp_path):
    """Experiment 'tiny' with a committed step-000004 trained with lr 1e-3 over 10 linear steps."""
    storage = open_storage(StorageSpec(path=str(tmp_path)))
    trained = spec_with(lr=1e-3, steps=10)
    trained.train.precision = "fp32"  # what `auto` would have resolved to
    storage.write_text("tiny/step-000004/job.yaml", dump_job(trained))
    storage.write_json("tiny/step-000004/trainer_state.json", {"step": 4, "world_size": 2})
    storage.write_text("tiny/step-000004/COMMITTED", "ok\n")
    return storage


def test_a_changed_learning_rate_is_refused_with_the_difference_named(storage):
    with pytest.raises(UserError) as err:
        check_drift(spec_with(lr=5e-4, steps=10), storage, "step-000004", "refuse")
    message = str(err.value)
    assert "'tiny' would resume from step-000004" in message
    assert "train.lr: 0.001 -> 0.0005" in message and "--new" in message and "--allow-changes" in message


def test_what_does_not_shape_training_may_change(storage, capsys):
    spec = spec_with(lr=1e-3, steps=10, eval_every=7, checkpoint_every=3, keep_last=2, log_every=5)
    spec.train.precision = "auto"
    spec.scaling.placement = "spread"
    assert check_drift(spec, storage, "step-000004", "refuse") == (spec, "step-000004")
    assert capsys.readouterr().err == ""


def test_new_starts_a_fresh_experiment_and_allow_continues_with_the_changes(storage, capsys):
    changed = spec_with(lr=5e-4, steps=10)
    fresh, version = check_drift(changed, storage, "step-000004", "new")
    assert fresh.name == "tiny-2" and version is None
    storage.write_text("tiny-2/job.yaml", "taken\n")
    assert check_drift(changed, storage, "step-000004", "new")[0].name == "tiny-3"
    kept, version = check_drift(changed, storage, "step-000004", "allow")
    assert kept.name == "tiny" and version == "step-000004"
    assert "continuing with a change: train.lr: 0.001 -> 0.0005" in capsys.readouterr().err


def test_raising_steps_says_what_happens_to_the_learning_rate(storage, capsys):
    spec = spec_with(lr=1e-3, steps=20)
    check_drift(spec, storage, "step-000004", "refuse")
    err = capsys.readouterr().err
    # Linear decay over 10 steps put step 4 at 0.6 of the peak; over 20 steps it is 0.8.
    assert "train.steps 10 -> 20" in err and "from 6.00e-04 to 8.00e-04" in err
    constant = {"lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0}
    assert schedule_note({**constant, "steps": 10}, {**constant, "steps": 20}, 4) is None


def test_differences_cover_tasks_model_and_weighting():
    old = json.loads(json.dumps(spec_with().model_dump(mode="json")))
    new = json.loads(json.dumps(old))
    new["tasks"]["sentiment"]["weight"] = 2.0
    new["model"]["max_length"] = 32
    new["loss_weighting"]["strategy"] = "dwa"
    del new["tasks"]["summary"]
    lines = training_differences(old, new)
    assert "tasks.sentiment.weight: 1.0 -> 2.0" in lines and "model.max_length: 64 -> 32" in lines
    assert "loss_weighting.strategy: static -> dwa" in lines
    assert any(line.startswith("tasks.summary.type: generation -> (absent)") for line in lines)


def test_a_field_added_after_the_version_was_written_is_drift_only_when_set_otherwise():
    """A version written by an older mtl holds no value for a field added since: left at its
    default (which keeps the old behaviour) it is no change; set to anything else, it is one."""
    new = json.loads(json.dumps(spec_with().model_dump(mode="json")))
    old = json.loads(json.dumps(new))
    del old["loss_weighting"]["lr"], old["tasks"]["sentiment"]["weight"], old["train"]["early_stopping"]
    assert training_differences(old, new) == []
    new["loss_weighting"]["lr"] = 0.5
    new["tasks"]["sentiment"]["weight"] = 3.0
    assert training_differences(old, new) == ["loss_weighting.lr: (absent) -> 0.5",
                                              "tasks.sentiment.weight: (absent) -> 3.0"]


def test_a_version_from_before_token_normalised_losses_trained_per_micro_batch():
    """train.loss_normalization came with a default (tokens) that trains differently from what
    versions written before it did: resuming one under the default is a change, under micro_batch none."""
    new = json.loads(json.dumps(spec_with().model_dump(mode="json")))
    old = json.loads(json.dumps(new))
    del old["train"]["loss_normalization"]
    assert training_differences(old, new) == [
        "train.loss_normalization: micro_batch (before the field existed) -> tokens"]
    new["train"]["loss_normalization"] = "micro_batch"
    assert training_differences(old, new) == []


def test_a_version_from_before_even_draws_drew_its_plans_at_random():
    new = json.loads(json.dumps(spec_with().model_dump(mode="json")))
    old = json.loads(json.dumps(new))
    del old["mixture"]["draw"]
    assert training_differences(old, new) == ["mixture.draw: random (before the field existed) -> even"]
    new["mixture"]["draw"] = "random"
    assert training_differences(old, new) == []


def test_device_knobs_of_the_deepspeed_file_may_change():
    """overlap_comm and pin_memory move the same numbers at another time: a version written when the
    shipped files said false resumes under their "auto"."""
    job = json.loads(json.dumps(spec_with().model_dump(mode="json")))
    old_ds = {"zero_optimization": {"stage": 3, "overlap_comm": False, "offload_param": {"device": "cpu",
                                                                                         "pin_memory": False}}}
    new_ds = json.loads(json.dumps(old_ds).replace("false", '"auto"'))
    assert training_differences(job, job, old_ds, new_ds) == []
    new_ds["zero_optimization"]["offload_param"]["device"] = "none"
    assert training_differences(job, job, old_ds, new_ds) == [
        "deepspeed file.zero_optimization.offload_param.device: cpu -> none"]


def test_the_deepspeed_file_is_compared_by_content_not_by_path(storage, tmp_path):
    """`mtl submit` ships the DeepSpeed file under another path (and a shipped path is gone later):
    a version records the file's content, and only a change of content is a change."""
    from trainer.model.ds_config import read_ds_config

    trained = spec_with(lr=1e-3, steps=10)
    storage.write_json("tiny/step-000004/deepspeed.json", read_ds_config(trained.deepspeed))
    copied = tmp_path / "shipped" / "deepspeed.json"
    copied.parent.mkdir()
    copied.write_text(json.dumps(read_ds_config(trained.deepspeed)))
    moved = trained.model_copy(update={"deepspeed": str(copied)})
    assert check_drift(moved, storage, "step-000004", "refuse") == (moved, "step-000004")

    changed = read_ds_config(trained.deepspeed)
    changed["zero_optimization"]["stage"] = 1
    copied.write_text(json.dumps(changed))
    stage = read_ds_config(trained.deepspeed)["zero_optimization"]["stage"]
    with pytest.raises(UserError, match=rf"deepspeed file.zero_optimization.stage: {stage} -> 1"):
        check_drift(moved, storage, "step-000004", "refuse")


def test_a_version_without_its_deepspeed_file_compares_the_path(storage, tmp_path):
    trained = spec_with(lr=1e-3, steps=10)
    elsewhere = tmp_path / "other.json"
    elsewhere.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(UserError, match="deepspeed: "):
        check_drift(trained.model_copy(update={"deepspeed": str(elsewhere)}), storage, "step-000004", "refuse")


def test_a_change_that_moves_the_heads_into_groups_of_their_own_cannot_continue(tmp_path, capsys):
    """lr_scale and head_warmup_steps give each head optimizer groups of its own: a version trained
    without them holds its optimizer state in the other layout, so --allow-changes refuses (before
    anything starts) while a change of the scale itself, on both sides apart, continues."""
    storage = open_storage(StorageSpec(path=str(tmp_path)))

    def heads(**train):
        job = job_dict(Path("/data"), kind="heads", tasks=("sentiment", "qa"))
        job["train"].update(steps=10, **train)
        return resolve(parse_job(job))

    storage.write_text("tiny/step-000004/job.yaml", dump_job(heads()))
    storage.write_json("tiny/step-000004/trainer_state.json", {"step": 4, "world_size": 2})
    with pytest.raises(UserError, match="optimizer groups of their own .* Run with --new"):
        check_drift(heads(head_warmup_steps=2), storage, "step-000004", "allow")
    storage.write_text("tiny/step-000004/job.yaml", dump_job(heads(head_warmup_steps=2)))
    scaled = heads(head_warmup_steps=2)
    scaled.tasks["qa"].lr_scale = 5.0
    assert check_drift(scaled, storage, "step-000004", "allow") == (scaled, "step-000004")
    assert "continuing with a change: tasks.qa.lr_scale: 1.0 -> 5.0" in capsys.readouterr().err
