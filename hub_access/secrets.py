"""Credentials stay secret, whatever carried them, and published text names no local file system.

Tokens are masked by VALUE, not by the flag that carried them: the value of `--hub_token`, of `HF_TOKEN` and
`HUGGING_FACE_HUB_TOKEN`, and the token of the `huggingface-cli login` are replaced by `***` in log records (whatever
logger writes them), in uncaught exceptions, in argparse errors, in the model card's command line and in every
public config (tracker hparams, `trainer_state.json`, the card's table).

Paths are made public by `public_path`: a path under the working folder becomes relative to it, any other absolute
path (or one that climbs out with `..`) is reduced to its base name. Hub ids pass unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Iterable
from typing import Any

MASK = "***"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MIN_TOKEN_LENGTH = 8
"""Shorter values are not masked (a Hub token has 37 characters): masking `1` everywhere would garble every line."""
TOKEN_FLAGS = ("--hub_token", "--hub-token")
PATH_FLAGS = ("output_dir", "train_data_dir", "dataset_name", "cache_dir", "model_config_name_or_path")
PATH_FLAGS += ("resume_from_checkpoint", "logging_dir", "pipeline")
"""Flags of both scripts whose values may be local paths (Hub ids pass `public_path` unchanged)."""

_registered: set[str] = set()


def known_tokens(*explicit: str | None) -> list[str]:
    """`explicit` tokens, those of the environment variables and the huggingface_hub login; longest first."""
    tokens = {token for token in explicit if token}
    tokens.update(os.environ.get(name) or "" for name in TOKEN_ENV_VARS)
    try:
        from huggingface_hub import get_token

        tokens.add(get_token() or "")
    except Exception:  # no login, an unreadable token file: nothing to mask
        pass
    return sorted({token for token in tokens if len(token) >= MIN_TOKEN_LENGTH}, key=len, reverse=True)


HUB_TOKEN_PATTERN = re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{34}(?![A-Za-z0-9_])")
"""What a Hub access token looks like: `hf_` and 34 letters and digits, a word of its own. Masked wherever it
appears (`redact`), known or not: a value refused by argparse is echoed in its error."""


def register(*tokens: str | None) -> list[str]:
    """Add `tokens` (and every `known_tokens`) to those this process masks everywhere; returns them all."""
    _registered.update(known_tokens(*tokens))
    return sorted(_registered, key=len, reverse=True)


def redact(text: str, tokens: Iterable[str] | None = None) -> str:
    """`text` with every token (by default those `register`ed and `known_tokens`) replaced by `***`."""
    if tokens is None:
        tokens = sorted(_registered.union(known_tokens()), key=len, reverse=True)
    for token in tokens:
        if token:
            text = text.replace(token, MASK)
    return HUB_TOKEN_PATTERN.sub(MASK, text)


def redact_values(value: Any, tokens: Iterable[str]) -> Any:
    """`value` (str, or a dict / list / tuple of them) with the tokens masked in every string."""
    tokens = list(tokens)
    if isinstance(value, str):
        return redact(value, tokens)
    if isinstance(value, dict):
        return {key: redact_values(item, tokens) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(item, tokens) for item in value)
    return value


def is_local_path(value: str) -> bool:
    """Whether a `--dataset_name` / model id names a local path rather than a Hub id."""
    return os.path.isabs(os.path.expanduser(value)) or value.startswith((".", "~")) or os.path.exists(value)


def public_path(value: str | None) -> str | None:
    """
    A path fit to publish: relative to the working folder if it lies under it, otherwise its base name. Relative
    paths that stay under the working folder and Hub ids are returned unchanged.
    """
    if not value or not is_local_path(value):
        return value
    expanded = os.path.expanduser(value)
    cwd = os.getcwd()
    absolute = os.path.normpath(os.path.abspath(expanded))
    relative = os.path.relpath(absolute, cwd)
    if cwd != os.path.dirname(cwd) and relative != ".." and not relative.startswith(".." + os.sep):
        return relative  # under the working folder ("." for the folder itself)
    return os.path.basename(absolute) or relative


def public_dataset_name(dataset_name: str | None, train_data_dir: str | None) -> str | None:
    """The dataset as a model card names it: a Hub id, a local folder under the working folder, or `None`."""
    name = dataset_name or train_data_dir
    if name is None or (dataset_name is not None and not is_local_path(dataset_name)):
        return name
    public = public_path(name)
    # The card links a name that is not an existing path to the Hub: a base name of a folder elsewhere is left out.
    return public if os.path.exists(public) else None


def public_argv(argv: Iterable[str], tokens: Iterable[str]) -> list[str]:
    """`argv` with the tokens masked (by value, and after a token flag) and path values made public."""
    tokens, result, mask_next, path_next = list(tokens), [], False, False
    path_flags = {f"--{name}" for name in PATH_FLAGS} | {f"--{name.replace('_', '-')}" for name in PATH_FLAGS}
    for arg in argv:
        if mask_next:
            arg = MASK
        elif path_next or (not arg.startswith("-") and os.path.isabs(os.path.expanduser(arg))):
            arg = public_path(arg)  # a path flag's value, or a config file given by absolute path
        elif arg.startswith("-"):
            flag, equals, value = arg.partition("=")
            if equals and flag in TOKEN_FLAGS:
                arg = f"{flag}={MASK}"
            elif equals and (flag in path_flags or os.path.isabs(os.path.expanduser(value))):
                arg = f"{flag}={public_path(value)}"
        mask_next, path_next = arg in TOKEN_FLAGS, arg in path_flags
        result.append(redact(arg, tokens))
    return result


def _redact_record(record: logging.LogRecord, tokens: list[str]) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a broken format: leave it to the handler to report
        return
    redacted = redact(message, tokens)
    if redacted != message:
        record.msg, record.args = redacted, ()
    if record.exc_info and not record.exc_text:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_text = redact(text, tokens)


_factory_installed = False


def mask_logs_and_errors() -> None:
    """
    From now on, mask the registered tokens (and whatever looks like a Hub token) in every log record of this process (whatever logger, handler or library
    writes it, tracebacks attached to records included) and in uncaught exceptions. Idempotent.
    """
    global _factory_installed
    if _factory_installed:
        return
    _factory_installed = True
    previous_factory = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous_factory(*args, **kwargs)
        _redact_record(record, sorted(_registered, key=len, reverse=True))  # and anything shaped like a Hub token
        return record

    logging.setLogRecordFactory(factory)

    def excepthook(kind, value, tb) -> None:
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(redact(text, sorted(_registered, key=len, reverse=True)))

    sys.excepthook = excepthook
