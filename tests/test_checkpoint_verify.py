"""A damaged or hostile checkpoint is refused, never half-loaded; an export killed midway leaves the
previous one loadable. Real checkpoints of real short runs of train_ddpm.py (the small U-Net of test_train.py on the
embedded digits), damaged on disk, then resumed by real runs."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from helpers import (
    FAST,
    REPO,
    RUN_TIMEOUT,
    SMALL_UNET,
    launch_command,
    one_thread,
    run_env,
    run_training,
    trainer_state,
)
from safetensors.torch import load_file, save_file

from checkpoints.checkpointing import (
    CheckpointError,
    read_object_state,
    resolve_resume_checkpoint,
    verify_checkpoint,
)
from checkpoints.verify import (
    MANIFEST_NAME,
    TRAINER_STATE_NAME,
    TrainerState,
    file_digest,
    model_mismatch,
    write_manifest,
)

RUN = ["--model_config_name_or_path", "unet.json", "--train_batch_size", "8", "--checkpointing_steps", "2", *FAST]
EXPORT = [Path("model_index.json"), Path("unet") / "config.json", Path("unet") / "diffusion_pytorch_model.safetensors"]
EXPORT += [Path("scheduler") / "scheduler_config.json"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("integrity")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


@pytest.fixture(scope="module")
def base_run(workdir) -> Path:
    """4 steps, checkpoints at 2 and 4, the export of step 4: the uninterrupted reference."""
    run_training(workdir, [*RUN, "--max_train_steps", "4", "--output_dir", "base"], processes=0)
    return workdir / "base"


def train_here(workdir: Path, *args: str):
    """`train_ddpm.main` in this process (a test marked fresh_process: accelerate's state is process-wide)."""
    import train_ddpm

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with one_thread():  # as the script runs (OMP_NUM_THREADS=1)
            return train_ddpm.main(["--cpu", "--cache_dir", str(workdir / "in-process-cache"), *args])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def fresh_base_run(workdir) -> Path:
    """The run of `base_run`, trained in the fresh process for the tests there (which compare nothing with
    `base_run`: the two are never mixed)."""
    assert "DDPM_TESTS_FRESH_PROCESS_REPORTS" in os.environ, "mark its tests @pytest.mark.fresh_process"
    train_here(workdir, *RUN, "--max_train_steps", "4", "--output_dir", "fresh-base")
    return workdir / "fresh-base"


def resume_here_ok(output: Path, checkpoint: str, steps: int = 4, *flags: str):
    """A resume in this process that must succeed."""
    args = [*RUN, "--max_train_steps", str(steps), "--output_dir", str(output), "--resume_from_checkpoint", checkpoint]
    return train_here(output.parent, *args, *flags)


def resume_here(output: Path, checkpoint: str, steps: int) -> str:
    """A resume in this process that must be refused: its one line (SystemExit with a message is exit status 1)."""
    args = [*RUN, "--max_train_steps", str(steps), "--output_dir", str(output), "--resume_from_checkpoint", checkpoint]
    with pytest.raises(SystemExit) as exited:
        train_here(output.parent, *args)
    assert isinstance(exited.value.code, str) and "\n" not in exited.value.code, exited.value.code
    return exited.value.code


def copy_run(base: Path, workdir: Path, name: str) -> Path:
    output = workdir / name
    shutil.copytree(base, output)
    shutil.rmtree(output / "logs")
    return output


def resume(workdir: Path, output: Path, checkpoint: str, steps: int = 4, script=None):
    args = [*RUN, "--max_train_steps", str(steps), "--output_dir", str(output), "--resume_from_checkpoint", checkpoint]
    return run_training(workdir, args, processes=0, script=script, check=False)


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


class Payload:
    """Unpickled with weights_only=False, it creates the marker file: code from the checkpoint runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    path.unlink()
    torch.save(Payload(marker), path)  # the format accelerate's files have: a torch zip holding the pickle


@pytest.mark.slow
@pytest.mark.fresh_process
# What a checkpoint holds ---------------------------------------------------------------------------------------------
def test_a_checkpoint_holds_no_pickle_of_ours_and_a_manifest_of_every_file(fresh_base_run):
    checkpoint = fresh_base_run / "checkpoint-4"
    files = sorted(path.name for path in checkpoint.iterdir())
    assert files == sorted(
        ["ema.safetensors", "lr_scheduler.json", MANIFEST_NAME, "model.safetensors", "optimizer.bin"]
        + ["random_states_0.pkl", TRAINER_STATE_NAME]
    )
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == sorted(set(files) - {MANIFEST_NAME})
    for name, entry in manifest["files"].items():
        assert entry == {"size": (checkpoint / name).stat().st_size, "sha256": file_digest(str(checkpoint / name))}
    ema = read_object_state(str(checkpoint), "ema")
    assert ema["num_updates"] == 4 and len(ema["shadow_params"]) == len(load_file(checkpoint / "model.safetensors"))
    assert read_object_state(str(checkpoint), "lr_scheduler")["last_epoch"] == 4
    verify_checkpoint(str(checkpoint))


@pytest.mark.slow
@pytest.mark.fresh_process
# Damage ------------------------------------------------------------------------------------------------------------
def test_truncated_random_states_latest_skips_it_and_ends_bitwise_equal(workdir, fresh_base_run, caplog):
    """The issue's case: truncating random_states_0.pkl of the newest checkpoint gave a silent resume with other
    weights. Now `latest` skips it with a warning naming the file, resumes from checkpoint-2 and ends equal (both
    runs in the fresh process, on one thread)."""
    caplog.set_level(logging.INFO)
    output = copy_run(fresh_base_run, workdir, "truncated-rng")
    damaged = output / "checkpoint-4" / "random_states_0.pkl"
    damaged.write_bytes(damaged.read_bytes()[:100])
    resume_here_ok(output, "latest")
    assert f"Skipping {output / 'checkpoint-4'}: it does not verify: {damaged} has 100 bytes" in caplog.text
    assert f"Resumed from {output / 'checkpoint-2'}: step 2" in caplog.text
    for name in ("model.safetensors", "optimizer.bin", "ema.safetensors", "random_states_0.pkl"):
        expected = (fresh_base_run / "checkpoint-4" / name).read_bytes()
        assert (output / "checkpoint-4" / name).read_bytes() == expected, name
    assert (output / EXPORT[2]).read_bytes() == (fresh_base_run / EXPORT[2]).read_bytes()
    verify_checkpoint(str(output / "checkpoint-4"))  # rewritten whole


@pytest.mark.slow
@pytest.mark.fresh_process
def test_a_named_damaged_checkpoint_is_refused_with_one_line_naming_the_file(workdir, fresh_base_run):
    output = copy_run(fresh_base_run, workdir, "truncated-optimizer")
    damaged = output / "checkpoint-4" / "optimizer.bin"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    before = snapshot(output)
    line = resume_here(output, "checkpoint-4", steps=6)
    assert line.startswith(f"train_ddpm.py: error: {damaged} has ")
    assert "truncated or altered" in line
    assert snapshot(output) == before  # nothing loaded, nothing written, the damaged checkpoint kept for inspection


@pytest.mark.fresh_process
def test_latest_refuses_when_no_checkpoint_verifies(workdir, fresh_base_run):
    output = copy_run(fresh_base_run, workdir, "all-damaged")
    (output / "checkpoint-2" / "ema.safetensors").write_bytes(b"not the ema")
    (output / "checkpoint-4" / MANIFEST_NAME).unlink()
    (output / "checkpoint-4" / "model.safetensors").write_bytes(b"{}")
    with pytest.raises(
        CheckpointError,
        match=r"None of the 2 checkpoint\(s\) .*checkpoint-4 has no manifest.json.*overwrite_output_dir",
    ):
        resolve_resume_checkpoint(str(output), "latest")


@pytest.mark.slow
@pytest.mark.fresh_process
# Hostile files -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("manifest", ["replaced", "regenerated"])
def test_a_payload_in_every_file_runs_nothing_and_is_refused(workdir, fresh_base_run, manifest):
    """Every file of checkpoint-4 replaced by a pickle that would create a marker; the attacker also rewrites the
    manifest to match (or plants the payload in it too). The resume stops with exit 1; no code ran."""
    output, marker = copy_run(fresh_base_run, workdir, f"payload-{manifest}"), workdir / f"pwned-{manifest}"
    checkpoint = output / "checkpoint-4"
    for path in checkpoint.iterdir():
        if path.name != MANIFEST_NAME or manifest == "replaced":
            plant(path, marker)
    if manifest == "regenerated":
        (checkpoint / MANIFEST_NAME).unlink(missing_ok=True)
        write_manifest(str(checkpoint))
    line = resume_here(output, "checkpoint-4", steps=6)
    assert not marker.exists()
    assert line.startswith(f"train_ddpm.py: error: {checkpoint}") and not (output / "checkpoint-6").exists()


@pytest.mark.fresh_process
def test_each_planted_file_is_refused_under_a_regenerated_manifest(workdir, fresh_base_run):
    """One file at a time, so that no check hides behind an earlier one: each is refused, naming it; nothing runs."""
    marker = workdir / "pwned-one"
    for name in sorted(
        path.name for path in (fresh_base_run / "checkpoint-4").iterdir() if path.name != MANIFEST_NAME
    ):
        output = copy_run(fresh_base_run, workdir, f"payload-{name}")
        checkpoint = output / "checkpoint-4"
        plant(checkpoint / name, marker)
        (checkpoint / MANIFEST_NAME).unlink(missing_ok=True)
        write_manifest(str(checkpoint))
        with pytest.raises(CheckpointError, match=f"{checkpoint / name} cannot be "):
            verify_checkpoint(str(checkpoint))
        assert not marker.exists(), name
        shutil.rmtree(output)


@pytest.mark.fresh_process
def test_a_checkpoint_without_a_manifest_is_refused_in_one_line(workdir, fresh_base_run):
    """Checkpoints written before the manifest (no manifest.json) are not read: the line says so and what to do."""
    output = copy_run(fresh_base_run, workdir, "no-manifest")
    (output / "checkpoint-4" / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(str(output / "checkpoint-4"))
    message = str(error.value)
    assert "\n" not in message and f"{output / 'checkpoint-4'} has no {MANIFEST_NAME}" in message
    assert "written before the manifest are not read" in message and "--overwrite_output_dir" in message


@pytest.mark.slow
def test_random_states_accelerate_cannot_restore_are_a_warning_and_an_error(workdir, base_run):
    """A random_states_0.pkl that loads safely but is not what accelerate expects (manifest regenerated): accelerate
    only logs "Could not load random states" at INFO and goes on; that message now reaches the user, and the resume
    stops instead of continuing with other random numbers."""
    output = copy_run(base_run, workdir, "rng-unrestorable")
    checkpoint = output / "checkpoint-4"
    torch.save({"step": 0}, checkpoint / "random_states_0.pkl")
    (checkpoint / MANIFEST_NAME).unlink(missing_ok=True)
    write_manifest(str(checkpoint))
    result = resume(workdir, output, "checkpoint-4", steps=6)
    assert "WARNING" in result.stderr and "Could not load random states" in result.stderr
    assert result.returncode == 1
    assert error_line(result).startswith(f"train_ddpm.py: error: {checkpoint / 'random_states_0.pkl'} cannot be")
    assert not (output / "checkpoint-6").exists()


# Verified once ---------------------------------------------------------------------------------------------------------
COUNT_HASHES = """
import os, sys
sys.path.insert(0, {repo!r})
import train_ddpm


def counted(file_digest):
    def digest(path):
        with open({log!r}, "a") as log:  # one short line per write: appends of both processes do not mix
            log.write(os.path.realpath(path) + "\\n")
        return file_digest(path)

    return digest


for name, module in list(sys.modules.items()):  # wherever the checkpoint room keeps its SHA-256 of a file
    if name.startswith("checkpoints.") and hasattr(module, "file_digest"):
        module.file_digest = counted(module.file_digest)
train_ddpm.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 0])
def test_a_resume_hashes_each_checkpoint_file_once_in_all(workdir, base_run, processes):
    """Every process verified the checkpoint it resumed, and the load verified it again: on 8 processes a resume
    hashed each file 16 times. The main process verifies once and shares the result (2: `accelerate launch` on two
    CPU processes; 0: one process)."""
    log, script = workdir / f"hashed-{processes}.txt", workdir / f"count_hashes_{processes}.py"
    script.write_text(COUNT_HASHES.format(repo=str(REPO), log=str(log)))
    if processes:
        output, step = workdir / "hashed-two", 2
        run_training(workdir, [*RUN, "--cpu", "--max_train_steps", "2", "--output_dir", str(output)], processes=2)
        args = [*RUN, "--cpu", "--max_train_steps", "4", "--output_dir", str(output), "--resume_from_checkpoint"]
        result = run_training(workdir, [*args, "latest"], processes=2, script=script)
        assert "MULTI_CPU: 2 process(es)" in result.stderr
    else:
        output, step = copy_run(base_run, workdir, "hashed-one"), 4
        result = resume(workdir, output, "latest", steps=6, script=script)
        assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = output / f"checkpoint-{step}"
    assert f"Resumed from {checkpoint}: step {step}" in result.stderr
    files = sorted(os.path.realpath(path) for path in checkpoint.iterdir() if path.name != MANIFEST_NAME)
    read = [path for path in log.read_text().splitlines() if not os.path.dirname(path).endswith(".tmp")]
    assert sorted(read) == files  # the checkpoints the run writes are hashed in checkpoint-N.tmp


# The export ----------------------------------------------------------------------------------------------------------
PAUSE_IN_EXPORT = """
import sys, time
sys.path.insert(0, {repo!r})
import safetensors.torch

save_file = safetensors.torch.save_file


def paused_save_file(tensors, filename, *args, **kwargs):
    save_file(tensors, filename, *args, **kwargs)
    if str(filename).endswith("diffusion_pytorch_model.safetensors"):  # the export's weights written, the rest not
        open({marker!r}, "w").close()
        time.sleep(600)


safetensors.torch.save_file = paused_save_file
import train_ddpm

train_ddpm.main()
"""


def kill_in_export(workdir: Path, args: list[str], marker: Path) -> None:
    script = workdir / "pause_in_export.py"
    script.write_text(PAUSE_IN_EXPORT.format(repo=str(REPO), marker=str(marker)))
    process = subprocess.Popen(
        launch_command(script, args, processes=0),
        cwd=workdir,
        env=run_env(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the export"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()


@pytest.mark.slow
def test_a_run_killed_while_exporting_leaves_the_previous_export_loadable(workdir, base_run):
    output = copy_run(base_run, workdir, "killed-export")
    before = {path: (base_run / path).read_bytes() for path in EXPORT}
    args = [*RUN, "--max_train_steps", "6", "--output_dir", str(output), "--resume_from_checkpoint", "latest"]
    kill_in_export(workdir, args, workdir / "in-export")
    assert trainer_state(output / "checkpoint-6").global_step == 6  # it got as far as the export of step 6
    assert {path: (output / path).read_bytes() for path in EXPORT} == before  # the export of step 4, whole
    pipeline = DDPMPipeline.from_pretrained(output)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert images[0].size == (8, 8)


@pytest.mark.slow
def test_a_first_export_killed_midway_leaves_no_partial_pipeline(workdir):
    output = workdir / "killed-first-export"
    kill_in_export(workdir, [*RUN, "--max_train_steps", "2", "--output_dir", str(output)], workdir / "in-first")
    assert (output / "checkpoint-2").is_dir()
    visible = sorted(path.name for path in output.iterdir() if not path.name.startswith("."))
    assert visible == ["checkpoint-2", "logs", "samples"]  # no model_index.json, unet/ or scheduler/


# The output folder's other checkpoints --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.fresh_process
def test_a_users_backup_copy_of_a_checkpoint_is_kept_and_can_be_resumed(workdir, fresh_base_run, caplog):
    """`checkpoint-4.bak` (a user's copy) was deleted by every run as "incomplete", and refused by name."""
    caplog.set_level(logging.INFO)
    output = copy_run(fresh_base_run, workdir, "backup")
    shutil.copytree(output / "checkpoint-4", output / "checkpoint-4.bak")
    before = snapshot(output / "checkpoint-4.bak")
    resume_here_ok(output, "checkpoint-4.bak", 6)
    assert f"Resumed from {output / 'checkpoint-4.bak'}: step 4" in caplog.text
    assert "Removing" not in caplog.text and snapshot(output / "checkpoint-4.bak") == before
    assert resolve_resume_checkpoint(str(output), "latest").path == str(output / "checkpoint-6")


@pytest.mark.slow
@pytest.mark.fresh_process
def test_the_total_limit_never_deletes_good_checkpoints_for_a_damaged_newer_one(workdir, fresh_base_run, caplog):
    """With checkpoint-4 damaged, `latest` resumes checkpoint-2 and writes checkpoint-3; --checkpoints_total_limit 1
    deleted 2 and 3 and kept the damaged 4, so every later resume failed: all work lost."""
    caplog.set_level(logging.INFO)
    output = copy_run(fresh_base_run, workdir, "limit")
    (output / "checkpoint-4" / "model.safetensors").write_bytes(b"0123456789")
    resume_here_ok(output, "latest", 3, "--checkpointing_steps", "3", "--checkpoints_total_limit", "1")
    assert f"Resumed from {output / 'checkpoint-2'}: step 2" in caplog.text
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert resolve_resume_checkpoint(str(output), "latest").path == str(output / "checkpoint-3")


@pytest.mark.fresh_process
def test_a_checkpoint_under_another_steps_name_does_not_verify(workdir, fresh_base_run, caplog):
    """A stale copy named `checkpoint-9` was taken for step 9: every `latest` went back to its step 2."""
    output = copy_run(fresh_base_run, workdir, "renamed")
    shutil.copytree(output / "checkpoint-2", output / "checkpoint-9")
    with pytest.raises(CheckpointError, match="checkpoint-9 holds step 2 .*Rename it checkpoint-2"):
        verify_checkpoint(str(output / "checkpoint-9"))
    assert resolve_resume_checkpoint(str(output), "latest").path == str(output / "checkpoint-4")
    assert "Skipping" in caplog.text and "checkpoint-9 holds step 2" in caplog.text


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"global_step": -5}, "global_step is -5, not a whole number >= 0"),
        ({"global_step": "4"}, "global_step is '4', not a whole number >= 0"),
        ({"epoch": 1.5}, "epoch is 1.5, not a whole number"),
        ({"num_processes": 0}, "num_processes is 0, not a whole number >= 1"),
        ({"training_args": []}, "training_args is not an object"),
        ([1, 2], "it holds a JSON list, not an object"),
    ],
)
def test_a_trainer_state_of_impossible_values_is_refused_naming_them(tmp_path, values, problem):
    """A crafted (or pre-manifest) trainer_state.json with a negative or text step made checkpoint--4 folders, or a
    TypeError traceback."""
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    state = {"global_step": 4, **values} if isinstance(values, dict) else values
    (checkpoint / TRAINER_STATE_NAME).write_text(json.dumps(state))
    write_manifest(str(checkpoint))
    with pytest.raises(CheckpointError, match=re.escape(problem)):
        verify_checkpoint(str(checkpoint))


TINY_RUN = ["--model_config_name_or_path", "unet.json", "--resolution", "8", "--train_batch_size", "4", *FAST]


# 1. A full disk ------------------------------------------------------------------------------------------------
CHECKPOINTED_RUN = [*TINY_RUN, "--checkpointing_steps", "2"]


@pytest.fixture(scope="module")
def one_channel_run(workdir) -> Path:
    """Checkpoint-2 of a 1-channel run on the embedded digits, trained in the fresh process (its tests' only)."""
    assert "DDPM_TESTS_FRESH_PROCESS_REPORTS" in os.environ, "mark its tests @pytest.mark.fresh_process"
    train_here(workdir, *CHECKPOINTED_RUN, "--max_train_steps", "2", "--output_dir", "one-channel")
    return workdir / "one-channel"


# 4. Resuming a checkpoint of another model -------------------------------------------------------------------------
def small_unet(channels: int, widths=(8, 16)) -> UNet2DModel:
    config = {key: value for key, value in SMALL_UNET.items() if key != "_class_name"}
    return UNet2DModel(**{**config, "block_out_channels": list(widths)}, sample_size=8, in_channels=channels,
                       out_channels=channels)  # fmt: skip


def test_a_model_of_other_shapes_is_named_by_the_flag_that_differs_from_the_header_alone(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    save_file(small_unet(1).state_dict(), str(checkpoint / "model.safetensors"))
    saved_args = {"num_channels": None, "model_preset": None, "model_config_name_or_path": "unet.json"}
    TrainerState(global_step=2, training_args=saved_args).save(str(checkpoint / TRAINER_STATE_NAME))
    write_manifest(str(checkpoint))
    verified = verify_checkpoint(str(checkpoint))  # the shapes come from the header, read when verifying
    assert model_mismatch(verified, small_unet(1).state_dict(), saved_args) is None
    message = model_mismatch(verified, small_unet(3).state_dict(), {**saved_args, "num_channels": 3})
    assert message == (
        f"{checkpoint} holds a model of another shape than this run's: it was written with --num_channels 1 (this "
        "run: --num_channels 3). Resume with the flags of the run that wrote it, or train this model in a new "
        "--output_dir (or start over with --overwrite_output_dir)."
    )
    # The same flags, another model: the config file changed in place; the parameters are named instead.
    message = model_mismatch(verified, small_unet(1, (8, 24)).state_dict(), saved_args)
    assert "its parameters differ: " in message and " is [16] there, [24] here" in message
    assert "(has unet.json changed since?)" in message


@pytest.mark.slow
@pytest.mark.fresh_process
@pytest.mark.parametrize(
    "flags, named",
    [
        (["--num_channels", "3"], "--num_channels 1 (this run: --num_channels 3)"),
        (["--variance_type", "learned_range"], "--variance_type fixed_small (this run: --variance_type learned_range)"),
        (["--model_config_name_or_path", "wide.json"], "--model_config_name_or_path unet.json (this run: "
         "--model_config_name_or_path wide.json)"),
    ],
)  # fmt: skip
def test_resuming_a_checkpoint_of_another_model_names_the_flag_and_loads_nothing(
    workdir, one_channel_run, monkeypatch, flags, named
):
    """In the fresh process: a refusal ends in one line (SystemExit with its message: exit status 1, as the script
    runs of this file pin), before the data."""
    import train_ddpm

    def no_data(*args, **kwargs):
        raise AssertionError("the run reached the data")

    monkeypatch.setattr(train_ddpm, "load_pixels", no_data)  # refused from the header before the data cache is built
    (workdir / "wide.json").write_text(json.dumps({**SMALL_UNET, "block_out_channels": [8, 24]}))
    before = {path: path.read_bytes() for path in (one_channel_run / "checkpoint-2").iterdir()}
    args = [*CHECKPOINTED_RUN, "--max_train_steps", "4", "--output_dir", str(one_channel_run)]
    with pytest.raises(SystemExit) as exited:
        train_here(workdir, *args, "--resume_from_checkpoint", "latest", *flags)
    assert exited.value.code == (
        f"train_ddpm.py: error: {one_channel_run / 'checkpoint-2'} holds a model of another shape than this run's: it "
        f"was written with {named}. Resume with the flags of the run that wrote it, or train this model in a new "
        "--output_dir (or start over with --overwrite_output_dir)."
    )
    assert {path: path.read_bytes() for path in (one_channel_run / "checkpoint-2").iterdir()} == before
    assert sorted(path.name for path in one_channel_run.glob("checkpoint-*")) == ["checkpoint-2"]
