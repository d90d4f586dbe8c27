"""The parser of both scripts, and how they refuse flags.

`FlagParser` reads a script's dataclass (a field's `range` stays out of argparse); `parse_strictly` takes no
abbreviated flag and shows no token in an error; `flags_holding_tokens` finds the flags whose values would publish a
token. Bad flags exit with status 2 (`parser.error`); later failures with `one_line_exit`, status 1 (said once under
a launcher when every process fails alike).
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import signal
import time
from collections.abc import Iterable
from types import MappingProxyType
from typing import Any

from transformers import HfArgumentParser

from command_line.fields import RANGE
from hub_access.secrets import HUB_TOKEN_PATTERN, TOKEN_FLAGS, known_tokens, redact


class FlagParser(HfArgumentParser):
    """An `HfArgumentParser` named `prog`, taking no abbreviated flag (`--hub_tok hf_...` must not pass for
    --hub_token, nor go unmasked), whose fields may declare a `range` (checked by `fields.first_range_error`)."""

    def __init__(self, dataclass_types, prog: str, **kwargs) -> None:
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)
        self.prog = prog

    @staticmethod
    def _parse_dataclass_field(parser, field) -> None:
        if RANGE not in field.metadata:
            return HfArgumentParser._parse_dataclass_field(parser, field)
        argparse_field = copy.copy(field)
        argparse_field.metadata = MappingProxyType({k: v for k, v in field.metadata.items() if k != RANGE})
        HfArgumentParser._parse_dataclass_field(parser, argparse_field)
        field.type = argparse_field.type  # as HfArgumentParser leaves it (Optional unwrapped)


def tokens_in_argv(argv: Iterable[str]) -> list[str]:
    """The values given to `--hub_token` in `argv`, in either spelling and either form (`--flag value`, `--flag=v`)."""
    argv, found = list(argv), []
    for index, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if flag in TOKEN_FLAGS:
            if equals:
                found.append(value)
            elif index + 1 < len(argv):
                found.append(argv[index + 1])
    return found


def parse_strictly(parser, argv: list[str], look_for_args_file: bool = False) -> tuple:
    r"""
    `parser.parse_args_into_dataclasses(argv)` (a `transformers.HfArgumentParser` built with `allow_abbrev=False`)
    whose errors never show a token: unknown flags are named without their values (with the flag meant, when the
    unknown one is an abbreviation or a typo), and every other argparse error is masked by value. Errors exit with
    status 2, as argparse's.
    """
    tokens = known_tokens(*tokens_in_argv(argv))
    report = parser.error
    parser.error = lambda message: report(redact(message, tokens))
    *outputs, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=look_for_args_file
    )
    if remaining:
        options = [option for option in parser._option_string_actions if option.startswith("--")]
        options = [option for option in options if "-" not in option[2:]] or options  # not the --dash-aliases
        unknown = []
        for arg in remaining:
            if not arg.startswith("-"):
                continue
            flag = arg.partition("=")[0]
            meant = [option for option in options if option.startswith(flag)] or difflib.get_close_matches(
                flag, options, n=1
            )
            unknown.append(f"{flag} (did you mean {' or '.join(meant[:3])}?)" if meant else flag)
        values = sum(not arg.startswith("-") for arg in remaining)
        parts = [f"unrecognized flag(s): {', '.join(unknown)}"] if unknown else []
        if values:
            parts.append(f"{values} value(s) that no flag takes (not shown)")
        parser.error(
            "; ".join(parts) + ". Flags must be spelled in full (abbreviations are not accepted); values of unknown "
            "flags are not shown, as they may be credentials."
        )
    return tuple(outputs)


def flags_holding_tokens(values: dict[str, Any], allowed: Iterable[str] = ()) -> list[str]:
    """
    The names of the flags in `values` (other than `allowed`) whose string value holds a token: one that
    `known_tokens` knows (with the values of the `allowed` flags, e.g. `--hub_token`), or anything that looks like a
    Hub token. Such a value would be published: a repo id is a public name, and paths and settings go into the model
    card, trackers and checkpoints.
    """
    allowed = set(allowed)
    tokens = known_tokens(*(values[name] for name in allowed if isinstance(values.get(name), str)))
    return [
        name
        for name, value in values.items()
        if name not in allowed
        and isinstance(value, str)
        and (HUB_TOKEN_PATTERN.search(value) or any(token in value for token in tokens))
    ]


def token_in_flags_message(names: list[str]) -> str:
    """The error for `flags_holding_tokens`: names the flags, never the values."""
    flags = ", ".join(f"--{name}" for name in names)
    return (
        f"{flags} holds what looks like a Hub access token (not shown). Pass a token only with HF_TOKEN, `hf auth "
        "login` or train_ddpm.py's --hub_token: every other value can be published (a repo id is a public name; "
        "paths and settings go into the model card, metrics.json and the logs)."
    )


def launch_rank() -> int:
    """This process's rank among those a launcher started (`RANK`, which torchrun sets); 0 without a launcher. Read
    from the environment, not the Accelerator: processes that each run alone all believe they are the main one."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


OTHERS_WAIT_S = 30.0
"""How long a process other than the main one waits, before it reports an error itself, for the launcher to stop it."""


def one_line_exit(script: str, message: str, *, main_rank_only: bool = False) -> SystemExit:
    """
    The exit (status 1) of an expected failure after parsing: `<script>: error: <message>`, tokens masked.

    With `main_rank_only`, for checks that fail alike on every process of a launcher, only the main one (rank 0) says
    it: the others wait here up to `OTHERS_WAIT_S` for the launcher, which stops the rest once the main process has
    ended, and then exit with status 1 too, silently; one still running after that failed on its own, and its exit
    says so with its rank.
    """
    rank = launch_rank()
    if main_rank_only and rank != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.disable(logging.CRITICAL)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(1))  # stopped by the launcher: the same status, quietly
        time.sleep(OTHERS_WAIT_S)
        return SystemExit(f"{script}: error (process {rank}): {redact(message)}")
    return SystemExit(f"{script}: error: {redact(message)}")
