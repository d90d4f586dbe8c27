"""The command line of both scripts (command_line/): every numeric flag bounded where it is declared, values out of
range refused in one line naming the flag, before any work."""

import dataclasses
import json
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from helpers import REPO, SMALL_UNET, last_line, run_env

import evaluate_ddpm
from command_line.fields import POSITIVE, RANGE, flag, flag_ranges
from training.args import TrainingArguments, parse_args


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("errors")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


# 2. Numeric flags out of range ---------------------------------------------------------------------------------------
ARGUMENTS = {"train_ddpm.py": TrainingArguments, "evaluate_ddpm.py": evaluate_ddpm.EvaluationArguments}


def number_type(hint) -> type | None:
    """`int` or `float` for a field that holds numbers (`int`, `float | None`, `list[int] | None`), else `None`."""
    if hint in (int, float):
        return hint
    return next(filter(None, map(number_type, typing.get_args(hint))), None)


def numeric_fields(arguments) -> dict[str, type]:
    hints = typing.get_type_hints(arguments)
    found = {item.name: number_type(hints[item.name]) for item in dataclasses.fields(arguments)}
    return {name: kind for name, kind in found.items() if kind is not None}


def unbounded_numeric_fields(arguments) -> list[str]:
    """The numeric fields of `arguments` that declare neither a range nor choices."""
    bounded = {item.name for item in dataclasses.fields(arguments) if {RANGE, "choices"} & set(item.metadata)}
    return [name for name in numeric_fields(arguments) if name not in bounded]


def out_of_bounds_values(item: dataclasses.Field) -> list[float]:
    low, high, _, _ = item.metadata.get(RANGE) or (min(item.metadata["choices"]), max(item.metadata["choices"]), 1, 1)
    return [
        value for value in (None if low is None else low - 1, None if high is None else high + 1) if value is not None
    ]


def out_of_bounds_cases(arguments) -> list[tuple[str, float, type]]:
    kinds = numeric_fields(arguments)
    return [
        (item.name, value, kinds[item.name])
        for item in dataclasses.fields(arguments)
        if item.name in kinds
        for value in out_of_bounds_values(item)
    ]


TRAIN_CASES = out_of_bounds_cases(TrainingArguments)


EVALUATION_CASES = out_of_bounds_cases(evaluate_ddpm.EvaluationArguments)


@pytest.mark.parametrize("script", list(ARGUMENTS))
def test_every_numeric_flag_of_both_scripts_declares_its_bounds(script):
    arguments = ARGUMENTS[script]
    assert len(numeric_fields(arguments)) >= (30 if script == "train_ddpm.py" else 8)  # the enumeration sees them
    assert unbounded_numeric_fields(arguments) == []
    assert sorted(set(flag_ranges(arguments)) - set(numeric_fields(arguments))) == []  # a range bounds a number


def test_the_bounds_check_sees_a_numeric_field_without_a_range():
    @dataclasses.dataclass
    class Flags:
        steps: int = flag(1, help="bounded", range=POSITIVE)
        rate: float | None = flag(help="unbounded")
        sizes: list[int] | None = flag(help="unbounded list")
        channels: int = flag(3, help="bounded by its choices", choices=[1, 3])
        name: str = flag("x", help="no number")
        switch: bool = flag(False, help="no number")

    assert unbounded_numeric_fields(Flags) == ["rate", "sizes"]


@pytest.mark.parametrize("name, value, kind", TRAIN_CASES, ids=[f"{case[0]}={case[1]}" for case in TRAIN_CASES])
def test_each_numeric_training_flag_out_of_range_exits_2_naming_it(name, value, kind, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([f"--{name}", str(kind(value))])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"train_ddpm.py: error: --{name} ") or error.startswith(
        f"train_ddpm.py: error: argument --{name}"
    )


@pytest.mark.parametrize(
    "name, value, kind", EVALUATION_CASES, ids=[f"{case[0]}={case[1]}" for case in EVALUATION_CASES]
)
def test_each_numeric_evaluation_flag_out_of_range_exits_2_naming_it(name, value, kind, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_ddpm.parse_args(["--pipeline", "ddpm-output", f"--{name}", str(kind(value))])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"evaluate_ddpm.py: error: --{name} ") or error.startswith(
        f"evaluate_ddpm.py: error: argument --{name}"
    )


def test_a_channel_count_out_of_the_choices_in_a_config_file_is_refused(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("num_channels: 2\n")  # a file's keys are parsed as flags: argparse checks the choices
    for script, parse in (("train_ddpm.py", parse_args), ("evaluate_ddpm.py", evaluate_ddpm.parse_args)):
        with pytest.raises(SystemExit) as exit_info:
            parse([str(config)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"{script}: error: {config}: argument --num_channels/--num-channels: invalid choice: 2 (choose from 1, "
            "3, 4)"
        )
        config.write_text("pipeline: ddpm-output\nnum_channels: 2\n")


OUT_OF_RANGE = [
    ("train_ddpm.py", ["--train_batch_size", "0"], "--train_batch_size 0 is out of range: it must be > 0."),
    ("train_ddpm.py", ["--adam_beta1", "1.5"], "--adam_beta1 1.5 is out of range: it must be in [0, 1)."),
    ("train_ddpm.py", ["--ddpm_num_steps", "0"], "--ddpm_num_steps 0 is out of range: it must be > 0."),
    ("train_ddpm.py", ["--preprocessing_num_workers", "0"], "--preprocessing_num_workers 0 is out of range: it must be > 0."),
    ("evaluate_ddpm.py", ["--pipeline", "missing", "--batch_size", "0"], "--batch_size 0 is out of range: it must be > 0."),
]  # fmt: skip


# The scripts themselves (one run of each): exit status 2, the line last, no traceback, at once, nothing written.
@pytest.mark.slow
@pytest.mark.parametrize("script, flags, message", [OUT_OF_RANGE[0], OUT_OF_RANGE[-1]])
def test_a_flag_out_of_range_stops_the_script_at_once_with_one_line(workdir, script, flags, message):
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / script), *flags, "--output_dir", "never"], cwd=workdir,
                            env=run_env(workdir), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_line(result) == f"{script}: error: {message}"
    assert time.monotonic() - started < 60 and not (workdir / "never").exists()


# Every case through the scripts' `main` (what each script runs), in this process: it stops in the parsing.
@pytest.mark.parametrize("script, flags, message", OUT_OF_RANGE)
def test_a_flag_out_of_range_stops_main_at_once_with_one_line(tmp_path, monkeypatch, capsys, script, flags, message):
    import train_ddpm

    main = {"train_ddpm.py": train_ddpm.main, "evaluate_ddpm.py": evaluate_ddpm.main}[script]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main([*flags, "--output_dir", "never"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"{script}: error: {message}"
    assert not (tmp_path / "never").exists()


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
