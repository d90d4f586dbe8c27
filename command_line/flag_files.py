"""Flag files: a JSON or YAML file of flags as a script's first argument, optionally followed by flags that override
its keys (`train_ddpm.py configs/ddpm-cifar10.yaml --output_dir run1`). A file's keys become flags, so its values are
checked as the command line's; a fault exits with status 2 and one line that names the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
from collections.abc import Iterable
from typing import Any

import yaml
from transformers import HfArgumentParser

from command_line.parsing import parse_strictly
from hub_access.secrets import redact

CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")
_MERGE = "tag:yaml.org,2002:merge"


def parse_flags_or_file(parser: HfArgumentParser, argv: list[str] | None = None) -> tuple:
    r"""
    The dataclasses of `parser` from the flags in `argv` (`sys.argv[1:]` by default), or from a single JSON or YAML
    file with the same keys (`train_ddpm.py config.yaml`, `evaluate_ddpm.py evaluation.json`), optionally followed by
    flags that override the file's (`train_ddpm.py config.yaml --output_dir run1`: a flag after the file wins over
    the file's key of the same flag).

    A file's keys become flags (`learning_rate: 1e-4` is `--learning_rate=1e-4`), so its values are checked exactly
    as on the command line (types, choices); a file that cannot be read, is not a mapping, or has an unknown key
    exits with status 2 and one line that names the file (and the key meant, for a misspelled one).

    Args:
        parser (`transformers.HfArgumentParser`): The parser of the script's argument dataclasses.
        argv (`list[str]`, *optional*): The arguments; `sys.argv[1:]` when `None`.

    Returns:
        `tuple`: One instance of each of the parser's dataclasses.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith(CONFIG_FILE_SUFFIXES):
        path, given = argv[0], argv[1:]
        overridden = {  # the fields the flags after the file set: the command line wins over the file's key
            parser._option_string_actions[arg.partition("=")[0]].dest
            for arg in given
            if arg.partition("=")[0] in parser._option_string_actions
        }
        report = parser.error

        def error(message: str) -> None:  # a key or path may hold a token; name the file unless the flag is given
            flag = re.search(r"--[\w-]+", message)
            action = parser._option_string_actions.get(flag.group(0)) if flag else None
            given_flags = {arg.partition("=")[0] for arg in given}
            from_file = flag is None or (action.dest not in overridden if action else flag.group(0) not in given_flags)
            report(redact(f"{path}: {message}" if from_file else message))

        parser.error = error
        argv = flags_of_file(parser, path, skip=overridden) + given
    return parse_strictly(parser, argv)  # no abbreviated flags, and no token in an error message


class _FlagsLoader(yaml.SafeLoader):
    """
    YAML whose scalars all stay strings but `null` (merge keys `<<` still work), for argparse to type as it types the
    command line: YAML 1.1 would read `010` as 8 and `12:30` as 750 (base 60), silently. A key given twice is an error.
    """

    def construct_mapping(self, node, deep=False):
        keys = [key for key, _ in node.value if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE]
        repeated = _repeated_key((key.value, key) for key in keys)
        if repeated is not None:
            raise yaml.constructor.ConstructorError(None, None, _given_twice(repeated[0]), repeated[1].start_mark)
        return super().construct_mapping(node, deep=deep)


_FlagsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag.endswith((":null", ":merge"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _repeated_key(pairs: Iterable[tuple[Any, Any]]) -> tuple[Any, Any] | None:
    """The first (key, value) pair whose key came before: the one check of duplicate keys, in JSON and YAML."""
    seen = set()
    for key, value in pairs:
        if key in seen:
            return key, value
        seen.add(key)
    return None


def _given_twice(key: Any) -> str:
    return f"the key '{key}' is given twice"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    repeated = _repeated_key(pairs)
    if repeated is not None:
        raise ValueError(_given_twice(repeated[0]))
    return dict(pairs)


def flags_of_file(parser: HfArgumentParser, path: str, skip: set[str] = frozenset()) -> list[str]:
    """
    The flags that the JSON or YAML file at `path` holds, as command-line arguments (`parser.error` on a fault),
    leaving out the keys in `skip` (those the command line sets after the file).
    """
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        parser.error(f"cannot read this {kind} file of flags ({reason}).")
    try:
        if kind == "JSON":
            values = json.loads(text, object_pairs_hook=_unique_keys)
        else:
            values = yaml.load(text, Loader=_FlagsLoader)  # a SafeLoader: no Python objects
    except (ValueError, yaml.YAMLError) as error:
        mark = getattr(error, "problem_mark", None)  # YAML's line and column; JSON's message holds its own
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        parser.error(f"not valid {kind}: {problem}{where}.")
    if values is None or values == {}:
        parser.error("holds no flags. Pass at least one, or run the script without arguments for its defaults.")
    if not isinstance(values, dict):
        parser.error(
            f"holds a {kind} {type(values).__name__}, not a mapping of flag names to values (e.g. "
            "`learning_rate: 0.0001`)."
        )
    fields = {field.name: field for dataclass in parser.dataclass_types for field in dataclasses.fields(dataclass)}
    unknown = []
    for key in (key for key in values if key not in fields):
        meant = difflib.get_close_matches(str(key).lstrip("-").replace("-", "_"), list(fields), n=1)
        unknown.append(f"'{key}' (did you mean {meant[0]}?)" if meant else f"'{key}'")
    if unknown:
        parser.error(f"unknown key(s): {', '.join(unknown)}. The keys are the flags' names, without the dashes.")
    argv = []
    for key, value in values.items():
        takes_list = "list[" in str(fields[key].type)
        if value is None:
            continue  # the flag's default
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)):
            parser.error(f"the value of '{key}' must be a single value{' or a list of values' if takes_list else ''}.")
        if isinstance(value, list) and not takes_list:
            parser.error(f"the value of '{key}' is a list, but --{key} takes a single value.")
        if key in skip:
            continue  # a flag after the file sets it
        if isinstance(value, list):
            argv += [f"--{key}", *(_flag_value(item) for item in value)]
        else:
            argv.append(f"--{key}={_flag_value(value)}")  # `=`: a value may start with a dash
    return argv


def _flag_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
