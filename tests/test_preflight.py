"""What training checks before any long work starts (training/preflight.py): the output folders (in the way,
unwritable, inside the training images, holding an earlier export), the memory one step needs and the Hub repo of
--push_to_hub. Each fault ends in one line that
names it and says what to do, and leaves nothing behind."""

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest
import torch
from helpers import FAST, SMALL_UNET, one_thread, run_training

from checkpoints.checkpointing import (
    CheckpointError,
    check_fresh_start,
)
from training.args import ArgumentError, parse_args
from training.preflight import check_output_paths, check_step_memory, device_memory

TOKEN = "hf_" + "Q" * 34
TINY_RUN = [
    "--model_config_name_or_path",
    "unet.json",
    "--resolution",
    "8",
    "--train_batch_size",
    "4",
    "--max_train_steps",
    "2",
    *FAST,
]


def test_files_in_the_way_of_the_output_folders_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x")
    cases = {
        ("--output_dir", "afile"): "--output_dir 'afile' is a file, not a folder",
        ("--output_dir", "afile/run"): "--output_dir 'afile/run' lies under '{}', which is a file".format(
            tmp_path / "afile"
        ),
        ("--logging_dir", str(tmp_path / "afile")): "--logging_dir 'ddpm-output/../afile' is a file",
    }
    cases[("--logging_dir", str(tmp_path / "afile"))] = f"--logging_dir '{tmp_path / 'afile'}' is a file"
    for (flag, value), message in cases.items():
        with pytest.raises(ArgumentError, match=re.escape(message)):
            check_output_paths(parse_args([flag, value]))
    check_output_paths(parse_args(["--output_dir", "new/run"]))
    assert not Path("new").exists()  # a check writes nothing


@pytest.mark.parametrize("output", ["images", "images/out", "images/sub/../out"])
def test_an_output_folder_inside_the_training_images_is_refused(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    Path("images").mkdir()
    for flags in (["--train_data_dir", "images"], ["--dataset_name", "./images"]):
        with pytest.raises(ArgumentError, match="lies inside the training images"):
            check_output_paths(parse_args([*flags, "--output_dir", output]))
    Path("images-2").mkdir()  # a sibling whose name starts the same is not inside
    check_output_paths(parse_args(["--train_data_dir", "images", "--output_dir", "images-2"]))
    Path("link").symlink_to("images")
    with pytest.raises(ArgumentError, match="lies inside the training images"):
        check_output_paths(parse_args(["--train_data_dir", "link", "--output_dir", "images/out"]))


@pytest.mark.parametrize(
    "entries, what",
    [
        (["model_index.json", "unet", "scheduler", "README.md"], "the export of an earlier run"),
        (["README.md"], "files that this run's export would replace (README.md)"),
        (["training_data.json"], "files that this run's export would replace (training_data.json)"),
    ],
)
def test_a_new_run_does_not_overwrite_an_earlier_export_unasked(tmp_path, entries, what):
    """An export (or a README.md of the user's) in --output_dir without checkpoints was overwritten silently."""
    for name in entries:
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("mine")
    with pytest.raises(CheckpointError, match=re.escape(what)) as error:
        check_fresh_start(str(tmp_path))
    assert "--overwrite_output_dir" in str(error.value)
    (tmp_path / "samples").mkdir()
    (tmp_path / "logs").mkdir()
    for name in entries:
        shutil.rmtree(tmp_path / name) if (tmp_path / name).is_dir() else (tmp_path / name).unlink()
    check_fresh_start(str(tmp_path))  # samples and logs alone are not an export


# Memory ----------------------------------------------------------------------------------------------------------------
def test_a_step_that_cannot_fit_the_machine_is_refused_before_the_data(monkeypatch):
    args = parse_args(["--resolution", "65536", "--train_batch_size", "16"])
    with pytest.raises(ArgumentError) as error:
        check_step_memory(args, (128, 256), torch.device("cpu"))
    assert str(error.value).startswith(
        "--resolution 65536 with --train_batch_size 16: one feature map of the net's first layer (16 x 128 x "
        "65536x65536 values of 4 bytes) alone takes 35.2 TB, more than the"
    )
    bf16 = dataclasses.replace(args, resolution=256, mixed_precision="bf16")
    check_step_memory(bf16, (128, 256), torch.device("cpu"))  # 268 MB: fine
    assert device_memory(torch.device("cpu")) == psutil.virtual_memory().total


# The whole script: faults found in seconds, nothing written --------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("preflight")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    (folder / "afile").write_text("x")
    (folder / "images").mkdir()
    return folder


# One run of the script itself pins the mechanism: exit status 1, one line, no traceback, before the data, nothing left.
@pytest.mark.slow
def test_train_ddpm_refuses_before_any_data_or_training(workdir):
    """Each was a traceback, an OOM kill or a failure after training (the push): now one line, exit 1, before the
    data cache is built, and the output folder is left as it was (here: not there). The other faults of the same
    mechanism are the in-process cases below."""
    args = [*TINY_RUN, "--output_dir", "out", "--logging_dir", "../afile"]
    result = run_training(workdir, args, processes=0, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--logging_dir 'out/../afile' is a file, not a folder" in result.stderr.strip().splitlines()[-1]
    assert "Data:" not in result.stderr and "Training" not in result.stderr
    assert not (workdir / "out").exists()


def _no_data(*args, **kwargs):
    raise AssertionError("the run reached the data")


@pytest.fixture
def in_process(request, workdir, monkeypatch):
    """`train_ddpm.main` here, in `workdir`, stopped should it reach the data: in a test marked fresh_process."""
    assert request.node.get_closest_marker("fresh_process"), "mark the test @pytest.mark.fresh_process"
    import train_ddpm

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(train_ddpm, "load_pixels", _no_data)
    return lambda *args: train_ddpm.main(["--cpu", "--cache_dir", str(workdir / "in-process-cache"), *args])


def refusal(in_process, *args) -> str:
    """The one line of an expected failure (SystemExit with a message is exit status 1 and that line on stderr)."""
    with pytest.raises(SystemExit) as exited:
        in_process(*args)
    assert isinstance(exited.value.code, str) and "\n" not in exited.value.code, exited.value.code
    return exited.value.code


@pytest.mark.slow
@pytest.mark.fresh_process
@pytest.mark.parametrize(
    "flags, env, message",
    [
        (["--push_to_hub", "--hub_model_id", "me/m"], {"HF_HUB_OFFLINE": "1"},
         "Publishing to the Hub repo 'me/m' failed: OfflineModeIsEnabled"),
        (["--resolution", "65536"], {}, "--resolution 65536 with --train_batch_size 4: one feature map"),
        (["--resume_from_checkpoint", "images"], {}, "'images' is not a checkpoint"),
    ],
    ids=["push-offline", "resolution-65536", "resume-from-a-file"],
)  # fmt: skip
def test_train_ddpm_refuses_other_faults_before_any_data_or_training(workdir, in_process, monkeypatch, flags, env,
                                                                     message):  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = refusal(in_process, *TINY_RUN, "--output_dir", "out-in-process", *flags)
    assert line.startswith("train_ddpm.py: error: ") and message in line, line
    assert not (workdir / "out-in-process").exists()


@pytest.mark.slow
@pytest.mark.fresh_process
def test_a_users_readme_in_the_output_folder_is_kept(workdir, in_process, monkeypatch):
    out = workdir / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    line = refusal(in_process, *TINY_RUN, "--output_dir", "mine")
    assert line.startswith("train_ddpm.py: error: ")
    assert "holds files that this run's export would replace (README.md)" in line
    assert sorted(path.name for path in out.iterdir()) == ["README.md"]
    assert (out / "README.md").read_text() == "my notes"
    monkeypatch.undo()  # the data back, the working folder too
    monkeypatch.chdir(workdir)
    import train_ddpm

    with one_thread():  # as the script runs (OMP_NUM_THREADS=1)
        train_ddpm.main(["--cpu", "--cache_dir", str(workdir / "in-process-cache"), *TINY_RUN, "--output_dir", "mine",
                         "--overwrite_output_dir"])  # fmt: skip
    assert (out / "model_index.json").is_file() and (out / "README.md").read_text() != "my notes"


def test_links_in_the_output_paths_are_followed_as_the_os_follows_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("deep/a").mkdir(parents=True)
    Path("deep/logs").write_text("a file")
    Path("linkdir").symlink_to("deep/a")
    with pytest.raises(ArgumentError, match=re.escape("--logging_dir 'linkdir/../logs' is a file")):
        check_output_paths(parse_args(["--output_dir", "linkdir", "--logging_dir", "../logs"]))  # deep/logs
    Path("dangling").symlink_to("nowhere")
    with pytest.raises(ArgumentError, match="--output_dir 'dangling' is a link to 'nowhere', which does not exist"):
        check_output_paths(parse_args(["--output_dir", "dangling"]))


# Folders the run cannot write -------------------------------------------------------------------------------------
@pytest.fixture
def read_only(mount_tmpfs) -> Path:
    """A real read-only file system (a small tmpfs mounted `ro`) holding a folder `existing`."""
    folder = mount_tmpfs(64)
    (folder / "existing").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return folder


@pytest.mark.parametrize(
    "flag, where",
    [
        ("--output_dir", "existing"),
        ("--output_dir", "new/run"),
        ("--logging_dir", "existing/logs"),
        ("--cache_dir", "existing"),
    ],
)
def test_a_folder_the_run_cannot_write_is_refused_by_the_preflight(tmp_path, monkeypatch, read_only, flag, where):
    """A read-only --logging_dir (or --output_dir, --cache_dir) was a traceback, after the data cache was built."""
    monkeypatch.chdir(tmp_path)
    path = str(read_only / where)
    args = parse_args(["--output_dir", path] if flag == "--output_dir" else [flag, path])
    with pytest.raises(ArgumentError) as error:
        check_output_paths(args)
    message = str(error.value)
    assert message.startswith(f"{flag} '{path}' cannot be written") and "read-only file system" in message, message
    check_output_paths(parse_args(["--output_dir", str(tmp_path / "fine")]))


@pytest.mark.slow
@pytest.mark.fresh_process
def test_a_read_only_logging_dir_stops_the_script_before_the_data(tmp_path, read_only, monkeypatch):
    import train_ddpm

    (tmp_path / "unet.json").write_text(json.dumps(SMALL_UNET))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_ddpm, "load_pixels", _no_data)
    logs = read_only / "existing" / "logs"
    args = [*TINY_RUN, "--max_train_steps", "1", "--output_dir", "out", "--logging_dir", str(logs)]
    line = refusal(lambda *a: train_ddpm.main(["--cpu", *a]), *args)
    assert f"--logging_dir '{logs}' cannot be written" in line and "read-only" in line, line
    assert not (tmp_path / "out").exists()
