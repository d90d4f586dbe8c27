import json
import os
import re

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from checkpoints.checkpointing import (
    TRAINER_STATE_NAME,
    CheckpointError,
    TrainerState,
    changed_objective,
    check_fresh_start,
    find_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    prepare_output_dir,
    register_checkpoint_state,
    remove_checkpoints,
    remove_incomplete_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from checkpoints.verify import verify_checkpoint, write_manifest
from training.args import parse_args, public_config
from training.ema import EMA


@pytest.fixture
def accelerator(request):
    # accelerate's state is process-wide: the tests that build an Accelerator run in a fresh process (conftest.py).
    assert request.node.get_closest_marker("fresh_process"), "mark the test @pytest.mark.fresh_process"
    return Accelerator(cpu=True)


@pytest.fixture
def prepared(accelerator):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model.parameters())
    register_checkpoint_state(accelerator, "ema", ema)
    return model, optimizer, ema


def _train_step(model, optimizer, ema):
    loss = model(torch.ones(4, 3)).pow(2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    ema.update(model.parameters())


@pytest.mark.fresh_process
def test_save_checkpoint_writes_a_complete_folder_and_no_temporary_one(tmp_path, accelerator, prepared):
    model, optimizer, ema = prepared
    state = TrainerState(global_step=7, epoch=1, batches_in_epoch=3, training_args={"seed": 0})
    path = save_checkpoint(accelerator, str(tmp_path), state, list(model.parameters()))
    assert path == str(tmp_path / "checkpoint-7")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-7"]
    files = set(os.listdir(path))
    assert {TRAINER_STATE_NAME, "model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= files
    assert {"ema.safetensors", "manifest.json"} <= files  # the EMA in safetensors, not pickled
    assert not [name for name in files if name.startswith("custom_checkpoint")]
    saved = json.loads((tmp_path / "checkpoint-7" / TRAINER_STATE_NAME).read_text())
    assert saved["global_step"] == 7 and saved["batches_in_epoch"] == 3 and saved["training_args"] == {"seed": 0}


@pytest.mark.fresh_process
def test_load_checkpoint_restores_model_optimizer_ema_and_trainer_state(tmp_path, accelerator, prepared):
    model, optimizer, ema = prepared
    _train_step(model, optimizer, ema)
    save_checkpoint(accelerator, str(tmp_path), TrainerState(global_step=1, skipped_nonfinite_steps=2), [])
    saved_weights = [p.detach().clone() for p in model.parameters()]
    saved_ema = [p.clone() for p in ema.shadow_params]
    _train_step(model, optimizer, ema)
    _train_step(model, optimizer, ema)
    state = load_checkpoint(accelerator, verify_checkpoint(str(tmp_path / "checkpoint-1")))
    assert state.global_step == 1 and state.skipped_nonfinite_steps == 2
    for restored, saved in zip(model.parameters(), saved_weights, strict=True):
        assert torch.equal(restored, saved)
    for restored, saved in zip(ema.shadow_params, saved_ema, strict=True):
        assert torch.equal(restored, saved)
    assert ema.num_updates == 1
    assert optimizer.state_dict()["state"][0]["step"].item() == 1


@pytest.mark.fresh_process
def test_total_limit_keeps_the_newest_checkpoints(tmp_path, accelerator, prepared):
    model, _, _ = prepared
    for step in (2, 4, 6):
        save_checkpoint(accelerator, str(tmp_path), TrainerState(global_step=step), [], total_limit=2)
    assert [step for step, _ in find_checkpoints(str(tmp_path))] == [4, 6]


@pytest.mark.fresh_process
def test_saving_a_step_again_replaces_the_old_checkpoint(tmp_path, accelerator, prepared):
    save_checkpoint(accelerator, str(tmp_path), TrainerState(global_step=3, epoch=0), [])
    save_checkpoint(accelerator, str(tmp_path), TrainerState(global_step=3, epoch=5), [])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]
    assert TrainerState.load(str(tmp_path / "checkpoint-3" / TRAINER_STATE_NAME)).epoch == 5


@pytest.mark.fresh_process
def test_non_finite_weights_are_never_written(tmp_path, accelerator, prepared):
    model, _, _ = prepared
    save_checkpoint(accelerator, str(tmp_path), TrainerState(global_step=1), list(model.parameters()))
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        save_checkpoint(accelerator, str(tmp_path), TrainerState(global_step=2), list(model.parameters()))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]


def _fake_checkpoint(folder, name, complete=True):
    path = folder / name
    path.mkdir()
    save_file({"weight": torch.zeros(2)}, str(path / "model.safetensors"))
    if complete:
        TrainerState(global_step=int(name.split("-")[1].split(".")[0])).save(str(path / TRAINER_STATE_NAME))
        write_manifest(str(path))
    return path


def test_latest_skips_broken_and_temporary_folders_and_they_are_removed(tmp_path, caplog):
    _fake_checkpoint(tmp_path, "checkpoint-2")
    _fake_checkpoint(tmp_path, "checkpoint-10")
    _fake_checkpoint(tmp_path, "checkpoint-12", complete=False)  # killed before trainer_state.json
    _fake_checkpoint(tmp_path, "checkpoint-14.tmp")  # killed before the rename
    (tmp_path / "samples").mkdir()
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")  # numeric, not lexical, order
    with caplog.at_level("WARNING"):
        assert resolve_resume_checkpoint(str(tmp_path), "latest").path == str(tmp_path / "checkpoint-10")
    assert "checkpoint-12" in caplog.text and "checkpoint-14.tmp" in caplog.text
    removed = remove_incomplete_checkpoints(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint-12", "checkpoint-14.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-2", "samples"]


def test_resume_paths_latest_none_or_named(tmp_path):
    assert resolve_resume_checkpoint(str(tmp_path), None) is None
    assert resolve_resume_checkpoint(str(tmp_path), "latest") is None  # nothing yet: a fresh start, as the peer
    _fake_checkpoint(tmp_path, "checkpoint-5")
    _fake_checkpoint(tmp_path, "checkpoint-6", complete=False)
    expected = str(tmp_path / "checkpoint-5")
    assert resolve_resume_checkpoint(str(tmp_path), "checkpoint-5").path == expected  # a name inside output_dir
    assert resolve_resume_checkpoint(str(tmp_path), expected).path == expected
    with pytest.raises(CheckpointError, match=r"not found.*checkpoint-5"):
        resolve_resume_checkpoint(str(tmp_path), "checkpoint-7")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(str(tmp_path), "checkpoint-6")


def test_a_fresh_start_is_refused_only_where_complete_checkpoints_exist(tmp_path):
    check_fresh_start(str(tmp_path / "missing"))
    _fake_checkpoint(tmp_path, "checkpoint-3", complete=False)  # removed at start anyway
    (tmp_path / "samples").mkdir()
    check_fresh_start(str(tmp_path))
    _fake_checkpoint(tmp_path, "checkpoint-500")
    with pytest.raises(CheckpointError, match=r"1 checkpoint of an earlier run .*checkpoint-500.*latest.*overwrite"):
        check_fresh_start(str(tmp_path))


def test_remove_checkpoints_removes_every_checkpoint_folder_and_nothing_else(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp"):
        _fake_checkpoint(tmp_path, name, complete=name != "checkpoint-12.tmp")
    (tmp_path / "samples").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "checkpoint-notes.txt").write_text("a file, not a checkpoint")
    removed = remove_checkpoints(str(tmp_path))
    assert sorted(os.path.basename(path) for path in removed) == ["checkpoint-10", "checkpoint-12.tmp", "checkpoint-2"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-notes.txt", "model_index.json", "samples"]


def test_resuming_from_a_folder_that_is_no_checkpoint_says_so(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(CheckpointError, match="'.*images' is not a checkpoint \\(a checkpoint is a folder named"):
        resolve_resume_checkpoint(str(tmp_path / "out"), str(images))
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="is not a complete checkpoint .*probably interrupted"):
        resolve_resume_checkpoint(str(tmp_path / "out"), "checkpoint-3")


def test_resuming_a_checkpoint_of_another_folder_keeps_this_folders_files(tmp_path):
    """Resuming `other/checkpoint-2` into a folder that holds an export or a README.md overwrote them silently."""
    (tmp_path / "other" / "checkpoint-2").mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    with pytest.raises(
        CheckpointError, match=re.escape("holds files that this run's export would replace (README.md)")
    ):
        prepare_output_dir(None, str(out), str(tmp_path / "other" / "checkpoint-2"), overwrite=False)
    prepare_output_dir(None, str(out), str(out / "checkpoint-2"), overwrite=False)  # its own run goes on


def test_a_named_checkpoint_is_verified_when_resolved(tmp_path):
    """A named checkpoint that does not verify was refused only when loaded, after the data cache was built."""
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    save_file({"weight": torch.zeros(4)}, str(checkpoint / "model.safetensors"))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    write_manifest(str(checkpoint))
    assert resolve_resume_checkpoint(str(tmp_path), str(checkpoint)).path == str(checkpoint)
    save_file({"weight": torch.ones(4)}, str(checkpoint / "model.safetensors"))  # same size, other bytes
    with pytest.raises(CheckpointError, match="model.safetensors"):
        resolve_resume_checkpoint(str(tmp_path), str(checkpoint))


def test_resuming_with_another_objective_is_named(monkeypatch):
    """Resuming with another --prediction_type or schedule went on without a word (the export then described
    weights trained for another process)."""
    saved = TrainerState(training_args=public_config(parse_args([])))
    config = public_config(parse_args(["--prediction_type", "sample", "--ddpm_beta_schedule", "squaredcos_cap_v2"]))
    assert changed_objective(saved, config) == [
        "--prediction_type epsilon -> sample",
        "--ddpm_beta_schedule linear -> squaredcos_cap_v2",
    ]
    assert changed_objective(saved, public_config(parse_args(["--learning_rate", "1e-5"]))) == []
