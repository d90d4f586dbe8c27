"""What is checked before any long work starts: a file of flags, the output folder, tokens in the wrong flag, the
memory one step needs, the Hub repo of --push_to_hub and the checkpoint to resume. Each fault ends in one line that
names it and says what to do, and leaves nothing behind."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from helpers import FAST, SMALL_UNET, run_training
from safetensors.torch import save_file

import evaluate_ddpm
from checkpoints.checkpointing import (
    CheckpointError,
    TrainerState,
    changed_objective,
    check_fresh_start,
    prepare_output_dir,
    resolve_resume_checkpoint,
)
from checkpoints.verify import write_manifest
from training.args import ArgumentError, parse_args, public_config
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


def parse_error(capsys, parse, argv) -> str:
    """The one-line error of `parse(argv)`, which must exit with status 2 (argparse's convention)."""
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# A file of flags ------------------------------------------------------------------------------------------------------
FLAG_FILES = [
    ("list.json", "[1, 2]", "list.json: holds a JSON list, not a mapping of flag names to values"),
    ("list.yaml", "- 1\n- 2\n", "list.yaml: holds a YAML list, not a mapping"),
    ("scalar.yaml", "8\n", "scalar.yaml: holds a YAML str, not a mapping"),
    ("broken.json", "{bad", "broken.json: not valid JSON: Expecting property name enclosed in double quotes"),
    ("broken.yaml", "a: [1\n", "broken.yaml: not valid YAML: expected ',' or ']', but got '<stream end>' at line 2"),
    ("typo.yaml", "resolutoin: 8\n", "typo.yaml: unknown key(s): 'resolutoin' (did you mean resolution?)"),
    ("type.yaml", "resolution: abc\n", "type.yaml: argument --resolution: invalid int value: 'abc'"),
    ("nested.yaml", "resolution: {a: 1}\n", "nested.yaml: the value of 'resolution' must be a single value"),
    ("missing.yaml", None, "missing.yaml: cannot read this YAML file of flags (No such file or directory)"),
    ("twice.yaml", "seed: 1\nseed: 2\n", "twice.yaml: not valid YAML: the key 'seed' is given twice at line 2"),
    ("twice.json", '{"seed": 1, "seed": 2}', "twice.json: not valid JSON: the key 'seed' is given twice"),
    (
        "list-value.json",
        '{"seed": [1, 2]}',
        "list-value.json: the value of 'seed' is a list, but --seed takes a single value",
    ),
    ("empty.yaml", "", "empty.yaml: holds no flags. Pass at least one, or run the script without arguments"),
    ("on.yaml", "center_crop: on\n", "on.yaml: argument --center_crop/--center-crop: Truthy value expected: got on"),
]


@pytest.mark.parametrize("script", ["train", "evaluate"])
@pytest.mark.parametrize("name, content, message", FLAG_FILES, ids=[case[0] for case in FLAG_FILES])
def test_a_bad_file_of_flags_is_one_line_naming_the_file(tmp_path, capsys, script, name, content, message):
    """Both scripts read a file of flags the same way: a file that is not a mapping, not valid, misspelled or of the
    wrong types ends in one argparse error (status 2) that names the file (was a traceback)."""
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    parse = parse_args if script == "train" else evaluate_ddpm.parse_args
    line = parse_error(capsys, parse, [str(path)])
    assert message in line, line


def test_a_file_of_flags_is_read_as_the_command_line(tmp_path):
    """Keys are flags: YAML's `1e-4` (a string to YAML 1.1) is the float 1e-4, booleans switch, lists are nargs,
    null keeps the default, and a value may start with a dash."""
    path = tmp_path / "flags.yaml"
    path.write_text(
        "learning_rate: 1e-4\ncenter_crop: true\nrandom_flip: false\nnum_epochs: 3\neval_split: null\n"
        "local_rank: -1\nhub_model_id: me/model\n"
    )
    args = parse_args([str(path)])
    assert (args.learning_rate, args.center_crop, args.random_flip, args.num_epochs) == (1e-4, True, False, 3)
    assert (args.eval_split, args.local_rank, args.hub_model_id) == (None, -1, "me/model")
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps({"pipeline": "p", "interpolation_timesteps": [1, 5], "center_crop": True}))
    args = evaluate_ddpm.parse_args([str(path)])
    assert (args.pipeline, args.interpolation_timesteps, args.center_crop) == ("p", [1, 5], True)


def test_yaml_scalars_are_read_as_the_command_line_reads_them(tmp_path):
    """YAML 1.1 reads `010` as 8 and `12:30` as 750 (base 60): a folder named so went elsewhere, silently."""
    path = tmp_path / "flags.yaml"
    path.write_text("output_dir: 010\nlogging_dir: 12:30\nseed: 0x10\nhub_model_id: yes\n")
    with pytest.raises(SystemExit):  # `0x10` is no int to argparse, as on the command line
        parse_args([str(path)])
    path.write_text("output_dir: 010\nlogging_dir: 12:30\nhub_model_id: yes\ncenter_crop: yes\n")
    args = parse_args([str(path)])
    assert (args.output_dir, args.logging_dir, args.hub_model_id, args.center_crop) == ("010", "12:30", "yes", True)


@pytest.mark.parametrize("script", ["train", "evaluate"])
@pytest.mark.parametrize(
    "argv, content",
    [
        (["--resolution", TOKEN], None),
        (["--num_channels", TOKEN], None),
        (None, f"resolution: {TOKEN}\n"),
        (None, f"{TOKEN}: 1\n"),
    ],
    ids=["int-flag", "choice-flag", "int-in-a-file", "a-key"],
)
def test_a_token_shaped_value_is_never_echoed_by_an_error(tmp_path, capsys, script, argv, content):
    """argparse echoes the value it refuses: a token there (not otherwise known to this process) was printed."""
    if content is not None:
        (tmp_path / "flags.yaml").write_text(content)
        argv = [str(tmp_path / "flags.yaml")]
    parse = parse_args if script == "train" else evaluate_ddpm.parse_args
    line = parse_error(capsys, parse, argv)
    assert "***" in line and TOKEN not in line + capsys.readouterr().err


def test_a_long_name_that_starts_like_a_token_is_not_one():
    for name in ("runs/hf_cifar10baselinelr2e4batch128ema9999", "xhf_" + "a" * 34, "hf_" + "a" * 33):
        assert parse_args(["--output_dir", name]).output_dir == name


def test_a_token_in_a_file_of_flags_never_reaches_an_error(tmp_path, capsys):
    path = tmp_path / "flags.yaml"
    path.write_text(f"hub_token: {TOKEN}\nnum_epochs: many\n")
    line = parse_error(capsys, parse_args, [str(path)])
    assert "invalid int value: 'many'" in line and TOKEN not in capsys.readouterr().err


# Tokens in the wrong flag ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags",
    [
        ["--hub_model_id", f"me/{TOKEN}"],
        ["--hub_model_id", TOKEN],
        ["--output_dir", f"runs/{TOKEN}"],
        ["--dataset_name", TOKEN, "--hub_token", TOKEN],
    ],
    ids=["in-a-repo-id", "as-a-repo-id", "in-a-path", "also-given-as-token"],
)
def test_a_token_in_a_flag_that_is_published_is_refused_without_showing_it(capsys, flags):
    """A repo id is a public name, and paths and settings go into the card: a token there is refused, naming the
    flag, never the value (was pushed to a repo named by it, and masked only in some places)."""
    line = parse_error(capsys, parse_args, flags)
    assert f"{flags[0]} holds what looks like a Hub access token (not shown)" in line
    assert TOKEN not in capsys.readouterr().err + line


def test_a_known_token_in_another_flag_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "my-own-secret-value")
    line = parse_error(capsys, parse_args, ["--hub_model_id", "me/my-own-secret-value"])
    assert "--hub_model_id holds what looks like a Hub access token" in line and "my-own-secret" not in line
    assert parse_args(["--hub_model_id", "me/model", "--hub_token", TOKEN]).hub_model_id == "me/model"


# The output folder -----------------------------------------------------------------------------------------------------
def test_an_absolute_logging_dir_is_published_by_its_base_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path.parent / "elsewhere-logs"
    config = public_config(parse_args(["--logging_dir", str(elsewhere)]))
    assert config["logging_dir"] == "elsewhere-logs"
    assert public_config(parse_args(["--logging_dir", str(tmp_path / "a" / "logs")]))["logging_dir"] == "a/logs"
    assert public_config(parse_args([]))["logging_dir"] == "logs"


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


def test_resuming_from_a_folder_that_is_no_checkpoint_says_so(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(CheckpointError, match="'.*images' is not a checkpoint \\(a checkpoint is a folder named"):
        resolve_resume_checkpoint(str(tmp_path / "out"), str(images))
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="is not a complete checkpoint .*probably interrupted"):
        resolve_resume_checkpoint(str(tmp_path / "out"), "checkpoint-3")


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


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, env, message",
    [
        (["--logging_dir", "../afile"], {}, "--logging_dir 'out/../afile' is a file, not a folder"),
        (["--push_to_hub", "--hub_model_id", "me/m"], {"HF_HUB_OFFLINE": "1"},
         "Publishing to the Hub repo 'me/m' failed: OfflineModeIsEnabled"),
        (["--resolution", "65536"], {}, "--resolution 65536 with --train_batch_size 4: one feature map"),
        (["--resume_from_checkpoint", "images"], {}, "'images' is not a checkpoint"),
    ],
    ids=["logging-dir-is-a-file", "push-offline", "resolution-65536", "resume-from-a-file"],
)  # fmt: skip
def test_train_ddpm_refuses_before_any_data_or_training(workdir, flags, env, message):
    """Each was a traceback, an OOM kill or a failure after training (the push): now one line, exit 1, before the
    data cache is built, and the output folder is left as it was (here: not there)."""
    args = [*TINY_RUN, "--output_dir", "out", *flags]
    result = run_training(workdir, args, processes=0, check=False, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Data:" not in result.stderr and "Training" not in result.stderr
    assert not (workdir / "out").exists()


@pytest.mark.slow
def test_a_users_readme_in_the_output_folder_is_kept(workdir):
    out = workdir / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    result = run_training(workdir, [*TINY_RUN, "--output_dir", "mine"], processes=0, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "holds files that this run's export would replace (README.md)" in result.stderr.splitlines()[-1]
    assert sorted(path.name for path in out.iterdir()) == ["README.md"]
    assert (out / "README.md").read_text() == "my notes"
    run_training(workdir, [*TINY_RUN, "--output_dir", "mine", "--overwrite_output_dir"], processes=0)
    assert (out / "model_index.json").is_file() and (out / "README.md").read_text() != "my notes"


def test_evaluate_refuses_a_token_in_its_flags(capsys):
    """metrics.json's settings hold every flag of evaluate_ddpm.py: a token there is refused, never shown."""
    line = parse_error(capsys, evaluate_ddpm.parse_args, ["--pipeline", f"me/{TOKEN}"])
    assert "evaluate_ddpm.py: error: --pipeline holds what looks like a Hub access token (not shown)" in line
    assert TOKEN not in line


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
