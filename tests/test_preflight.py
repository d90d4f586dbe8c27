"""What is checked before any long work starts: a file of flags, the output folder, tokens in the wrong flag, the
memory one step needs, the Hub repo of --push_to_hub and the checkpoint to resume. Each fault ends in one line that
names it and says what to do, and leaves nothing behind."""

import json

import pytest

import evaluate_ddpm
from training.args import parse_args

TOKEN = "hf_" + "Q" * 34


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
    ("scalar.yaml", "8\n", "scalar.yaml: holds a YAML int, not a mapping"),
    ("broken.json", "{bad", "broken.json: not valid JSON: Expecting property name enclosed in double quotes"),
    ("broken.yaml", "a: [1\n", "broken.yaml: not valid YAML: expected ',' or ']', but got '<stream end>' at line 2"),
    ("typo.yaml", "resolutoin: 8\n", "typo.yaml: unknown key(s): 'resolutoin' (did you mean resolution?)"),
    ("type.yaml", "resolution: abc\n", "type.yaml: argument --resolution: invalid int value: 'abc'"),
    ("nested.yaml", "resolution: {a: 1}\n", "nested.yaml: the value of 'resolution' must be a single value"),
    ("missing.yaml", None, "missing.yaml: cannot read this YAML file of flags (No such file or directory)"),
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


def test_a_token_in_a_file_of_flags_never_reaches_an_error(tmp_path, capsys):
    path = tmp_path / "flags.yaml"
    path.write_text(f"hub_token: {TOKEN}\nnum_epochs: many\n")
    line = parse_error(capsys, parse_args, [str(path)])
    assert "invalid int value: 'many'" in line and TOKEN not in capsys.readouterr().err
