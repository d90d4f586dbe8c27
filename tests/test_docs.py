"""Every train_ddpm.py / evaluate_ddpm.py command in README.md and docs/*.md parses with today's flags."""

import re
import shlex
from pathlib import Path

import pytest

import evaluate_ddpm
from training.args import parse_args as parse_training_args

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PARSERS = {"train_ddpm.py": parse_training_args, "evaluate_ddpm.py": evaluate_ddpm.parse_args}


def commands_in(markdown: str) -> list[tuple[str, list[str]]]:
    """(script, its arguments) of each command of a script in the shell code blocks of `markdown`: line
    continuations joined, comments dropped, `accelerate launch` options and `python` before the script skipped, and
    a command ending at `&&`, `;` or `|`."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", markdown, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # not shell (a Python line with an unmatched quote)
                continue
            command = None
            for word in words:
                if word in ("&&", ";", "|", "||"):
                    command = None
                elif command is not None:
                    command[1].append(word)
                elif Path(word).name in PARSERS:
                    command = (Path(word).name, [])
                    commands.append(command)
    return commands


def check_command(script: str, args: list[str]) -> None:
    """Parse like the script does, without running anything; `SystemExit` (argparse's) when a flag is wrong."""
    PARSERS[script](args)


def documented_commands() -> list[tuple[str, str, list[str]]]:
    return [(page.name, script, args) for page in PAGES for script, args in commands_in(page.read_text())]


def test_the_readme_and_docs_hold_commands_of_both_scripts():
    found = {(page, script) for page, script, _ in documented_commands()}
    assert {("README.md", "train_ddpm.py"), ("README.md", "evaluate_ddpm.py")} <= found
    assert len(documented_commands()) >= 10


@pytest.mark.parametrize(
    "page,script,args", documented_commands(), ids=lambda value: value if isinstance(value, str) else None
)
def test_documented_command_parses_with_todays_flags(page, script, args, monkeypatch):
    monkeypatch.chdir(REPO)  # configs/... as the commands name them
    check_command(script, args)


def test_extraction_joins_continuations_and_skips_the_launcher():
    markdown = (
        "text `train_ddpm.py --not_in_a_block`\n```bash\n"
        "accelerate launch --multi_gpu --num_processes 8 train_ddpm.py configs/ddpm-cifar10.yaml \\\n"
        "    --output_dir run1   # a comment --bad\n"
        "pip install -e . && python evaluate_ddpm.py --pipeline x --seed 1 | tee log\n"
        "```\n```\ntrain_ddpm.py      the training script (a layout block, not shell)\n```\n"
    )
    assert commands_in(markdown) == [
        ("train_ddpm.py", ["configs/ddpm-cifar10.yaml", "--output_dir", "run1"]),
        ("evaluate_ddpm.py", ["--pipeline", "x", "--seed", "1"]),
    ]


def test_a_renamed_flag_in_a_documented_command_fails(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    readme = (REPO / "README.md").read_text()
    renamed = readme.replace("--output_dir", "--output_directory")
    assert renamed != readme
    failures = 0
    for script, args in commands_in(renamed):
        if "--output_directory" in args:
            with pytest.raises(SystemExit) as raised:
                check_command(script, args)
            assert raised.value.code == 2 and "--output_directory" in capsys.readouterr().err
            failures += 1
    assert failures >= 1
