"""Paths the user names, and the folders the run writes: `~` and `$VARIABLE` mean what a shell makes of them wherever
the flag comes from (a file of flags too), an empty text flag is one line naming it, a folder the run cannot write is
refused before any long work, and a folder that stops taking writes during the run ends it in one line that names the
folder and the newest checkpoint that verifies, with nothing saved before lost."""

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from helpers import FAST, REPO, SMALL_UNET, run_training

from checkpoints.checkpointing import verify_checkpoint
from training.args import PATH_FLAGS, ArgumentError, TrainingArguments, parse_args
from training.preflight import check_output_paths

TINY_RUN = ["--model_config_name_or_path", "unet.json", "--resolution", "8", "--train_batch_size", "4", *FAST]


def parse_error(capsys, argv) -> str:
    """The last line of `parse_args(argv)`'s error, which must exit with status 2."""
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def last_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


# `~` and variables ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["yaml", "json", "command-line"])
def test_home_and_variables_in_every_path_flag_are_expanded(tmp_path, monkeypatch, source):
    """A `~` in a file of flags became a folder named `~` in the working folder (a shell expands it only on a command
    line); so did `$VARIABLE`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.chdir(tmp_path)
    values = {name: f"~/{name}" if index % 2 else f"$SCRATCH/{name}" for index, name in enumerate(PATH_FLAGS)}
    values["dataset_name"] = "${SCRATCH}/dataset_name"  # one of the two; the other is given as --train_data_dir
    values.pop("train_data_dir")
    if source == "command-line":
        argv = [item for name, value in values.items() for item in (f"--{name}", value)]
    else:
        path = tmp_path / f"flags.{source}"
        path.write_text(json.dumps(values))  # JSON is YAML too
        argv = [str(path)]
    args = parse_args(argv)
    for name, value in values.items():
        expected = value.replace("~", str(tmp_path / "home")).replace("${SCRATCH}", str(tmp_path / "scratch"))
        assert getattr(args, name) == expected.replace("$SCRATCH", str(tmp_path / "scratch")), name
    assert parse_args(["--train_data_dir", "~/images"]).train_data_dir == str(tmp_path / "home" / "images")
    assert parse_args(["--resume_from_checkpoint", "latest"]).resume_from_checkpoint == "latest"
    assert parse_args(["--dataset_name", "uoft-cs/cifar10"]).dataset_name == "uoft-cs/cifar10"


@pytest.mark.parametrize(
    "flag, value, names",
    [
        ("--output_dir", "$NO_SUCH_VARIABLE_HERE/run", "$NO_SUCH_VARIABLE_HERE"),
        ("--cache_dir", "${NO_SUCH_VARIABLE_HERE}/cache", "${NO_SUCH_VARIABLE_HERE}"),
        ("--logging_dir", "~no-such-user-here/logs", "~no-such-user-here"),
    ],
)
def test_a_path_that_cannot_be_expanded_is_one_line_naming_it(capsys, flag, value, names):
    line = parse_error(capsys, [flag, value])
    assert flag in line and f"'{value}'" in line and names in line, line


@pytest.mark.slow
def test_a_file_of_flags_with_home_paths_trains_into_the_home_folder(tmp_path):
    """The whole script: the run from a file of `~` paths writes under $HOME, and no folder named `~` appears."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "unet.json").write_text(json.dumps(SMALL_UNET))
    flags = {"model_config_name_or_path": "~/unet.json", "output_dir": "~/run", "logging_dir": "~/logs"}
    flags.update(resolution=8, train_batch_size=4, max_train_steps=1, ddpm_num_steps=50, ddpm_num_inference_steps=2)
    flags.update(eval_batch_size=2)
    (tmp_path / "flags.json").write_text(json.dumps(flags))
    result = run_training(tmp_path, ["flags.json"], processes=0, check=False, env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (home / "run" / "model_index.json").is_file() and any((home / "logs").iterdir())
    assert not (tmp_path / "~").exists()


# Empty text flags -------------------------------------------------------------------------------------------------
# (A flag with choices refuses '' as argparse does, already one line naming it.)
TEXT_FLAGS = [
    f.name
    for f in dataclasses.fields(TrainingArguments)
    if f.type in ("str | None", "str") and "choices" not in f.metadata
]


@pytest.mark.parametrize("source", ["command-line", "file"])
@pytest.mark.parametrize("name", TEXT_FLAGS)
def test_an_empty_text_flag_is_one_line_naming_it(tmp_path, capsys, name, source):
    """An empty text flag (`--output_dir ""`, `--dataset_name ""`, ...) was taken as given, to fail later with a message
    that did not name it, or not at all; now it is refused at once, naming it."""
    argv = [f"--{name}", ""]
    if source == "file":
        (tmp_path / "flags.yaml").write_text(f'{name}: ""\n')
        argv = [str(tmp_path / "flags.yaml")]
    line = parse_error(capsys, argv)
    assert f"--{name} '' is empty" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--output_dir", "--dataset_name"])
def test_the_script_refuses_an_empty_path_at_once(tmp_path, flag):
    (tmp_path / "unet.json").write_text(json.dumps(SMALL_UNET))
    result = run_training(tmp_path, [*TINY_RUN, "--max_train_steps", "1", flag, ""], processes=0, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{flag} '' is empty" in last_line(result)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["unet.json"]


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
def test_a_read_only_logging_dir_stops_the_script_before_the_data(tmp_path, read_only):
    (tmp_path / "unet.json").write_text(json.dumps(SMALL_UNET))
    logs = read_only / "existing" / "logs"
    args = [*TINY_RUN, "--max_train_steps", "1", "--output_dir", "out", "--logging_dir", str(logs)]
    result = run_training(tmp_path, args, processes=0, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result)
    assert f"--logging_dir '{logs}' cannot be written" in line and "read-only" in line, line
    assert "Data:" not in result.stderr and not (tmp_path / "out").exists()


# A folder that stops taking writes during the run -----------------------------------------------------------------
# The output folder is made immutable (`chattr +i`, which stops root too) right after checkpoint-2 is written, in the
# training process: a real EPERM on the next file created there, at a known point of the run. (`mount -o remount,ro`
# cannot serve mid-run: the kernel refuses it, busy, while the run holds its lock file and event log open for writing.)
IMMUTABLE_AFTER_FIRST_CHECKPOINT = """
import subprocess, sys
sys.path.insert(0, {repo!r})
import train_ddpm

save = train_ddpm.save


def save_then_freeze(accelerator, args, *rest):
    path = save(accelerator, args, *rest)
    subprocess.run(["chattr", "+i", args.output_dir], check=True)
    return path


train_ddpm.save = save_then_freeze
train_ddpm.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "sample-grid"])
def test_an_output_folder_that_stops_taking_files_names_the_newest_good_checkpoint(tmp_path, mount_tmpfs, what):
    """A write refused under --output_dir during the run was a traceback that named no checkpoint to resume; it is
    now one line naming the folder, the error and the checkpoint that verifies, which is kept intact."""
    (tmp_path / "unet.json").write_text(json.dumps(SMALL_UNET))
    output = mount_tmpfs(8192) / "run"  # a tmpfs: `chattr +i` works there, and the unmount undoes it
    script = tmp_path / "immutable_after_checkpoint.py"
    script.write_text(IMMUTABLE_AFTER_FIRST_CHECKPOINT.format(repo=str(REPO)))
    args = [*TINY_RUN, "--checkpointing_steps", "2", "--max_train_steps", "6", "--output_dir", str(output)]
    if what == "sample-grid":  # the next write is the grid of step 3, not checkpoint-4
        args += ["--save_images_steps", "3"]
    result = run_training(tmp_path, args, processes=0, script=script, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith(f"train_ddpm.py: error: Cannot write under --output_dir '{output}'"), line
    assert "Operation not permitted" in line and "may not create files in" in line
    assert f"{output / 'checkpoint-2'} is the newest intact checkpoint (it verifies)" in line
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2"]
    verify_checkpoint(str(output / "checkpoint-2"))
