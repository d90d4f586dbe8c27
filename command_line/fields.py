"""Flags declared with their bounds, and the defaults both scripts share.

A numeric flag's range sits in its field's metadata (`flag(0, help=..., range=POSITIVE)`); `first_range_error` walks
the fields of either script's dataclass. A range is `(low, high, closed_low, closed_high)`, `None` unbounded; a flag
left unset (`None`) passes, a NaN or an infinity never does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

Range = tuple[float | None, float | None, bool, bool]

POSITIVE: Range = (0, None, False, False)
ZERO_OR_MORE: Range = (0, None, True, False)
UNIT_OPEN_ABOVE: Range = (0, 1, True, False)
UNIT_CLOSED: Range = (0, 1, True, True)
SEED: Range = (0, 2**32 - 1, True, True)  # numpy's seeds (accelerate's set_seed seeds numpy too)

RANGE = "range"
"""The metadata key of a field's range (`FlagParser` keeps it from argparse)."""


def flag(default: Any = None, help: str = "", **kwargs) -> Any:
    """A dataclass field of a flag: its default, its `--help` line, and argparse's keywords or its `range`."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def describe(bounds: Range) -> str:
    low, high, closed_low, closed_high = bounds
    if high is None:
        return f"{'>=' if closed_low else '>'} {_number(low)}"
    left = "[" if closed_low else "("
    right = "]" if closed_high else ")"
    return f"in {left}{_number(low)}, {_number(high)}{right}"


def range_error(name: str, value: Any, bounds: Range) -> str | None:
    """The message for `--name value` outside `bounds`, or `None` if it lies inside (or is unset)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    low, high, closed_low, closed_high = bounds
    for item in values:
        if item is None or isinstance(item, bool):
            continue
        inside = math.isfinite(item)
        if inside and low is not None:
            inside = item >= low if closed_low else item > low
        if inside and high is not None:
            inside = item <= high if closed_high else item < high
        if not inside:
            return f"--{name} {item} is out of range: it must be {describe(bounds)}."
    return None


def flag_ranges(dataclass: Any) -> dict[str, Range]:
    """The ranges declared in the fields of `dataclass` (a class or an instance), in the order of the fields."""
    return {item.name: item.metadata[RANGE] for item in dataclasses.fields(dataclass) if RANGE in item.metadata}


def first_range_error(values: Any) -> str | None:
    """The first `range_error` among the fields of the dataclass instance `values`, or `None`."""
    for name, bounds in flag_ranges(values).items():
        message = range_error(name, getattr(values, name), bounds)
        if message is not None:
            return message
    return None


# Defaults both scripts share ------------------------------------------------------------------------------------------
FEATURE_EXTRACTOR_NAMES = ("digits", "inception")
"""The names of `evaluation.FEATURE_EXTRACTORS`, as plain argparse choices (tests/test_evaluate_cli.py keeps the two
equal)."""


def no_dataset_given(dataset_name: str | None, train_data_dir: str | None) -> bool:
    """Whether neither `--dataset_name` nor `--train_data_dir` is given: the run uses the embedded digits."""
    return dataset_name is None and train_data_dir is None


def default_feature_extractor(dataset_name: str | None, train_data_dir: str | None) -> str:
    """The feature network of FID/KID/precision/recall: `digits` for the embedded digits, `inception` otherwise."""
    return "digits" if no_dataset_given(dataset_name, train_data_dir) else "inception"
