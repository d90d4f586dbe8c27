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
from helpers import REPO, SMALL_UNET, run_env

import evaluate_ddpm
from command_line.fields import POSITIVE, RANGE, flag, flag_ranges
from training.args import TrainingArguments, parse_args


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("errors")
    (folder / "unet.json").write_text(json.dumps(SMALL_UNET))
    return folder


def last_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


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


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("train_ddpm.py", ["--train_batch_size", "0"], "--train_batch_size 0 is out of range: it must be > 0."),
        ("train_ddpm.py", ["--adam_beta1", "1.5"], "--adam_beta1 1.5 is out of range: it must be in [0, 1)."),
        ("train_ddpm.py", ["--ddpm_num_steps", "0"], "--ddpm_num_steps 0 is out of range: it must be > 0."),
        ("train_ddpm.py", ["--preprocessing_num_workers", "0"], "--preprocessing_num_workers 0 is out of range: it must be > 0."),
        ("evaluate_ddpm.py", ["--pipeline", "missing", "--batch_size", "0"], "--batch_size 0 is out of range: it must be > 0."),
    ],
)  # fmt: skip
def test_a_flag_out_of_range_stops_the_script_at_once_with_one_line(workdir, script, flags, message):
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / script), *flags, "--output_dir", "never"], cwd=workdir,
                            env=run_env(workdir), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_line(result) == f"{script}: error: {message}"
    assert time.monotonic() - started < 60 and not (workdir / "never").exists()
