"""The allowed ranges of numeric flags, checked before any work starts (both scripts).

A range is `(low, high, closed_low, closed_high)`; `None` is unbounded. A flag left unset (`None`) passes; a NaN or an
infinity never does. `range_error` returns the message that names the flag, its value and the range, or `None`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

Range = tuple[float | None, float | None, bool, bool]

POSITIVE: Range = (0, None, False, False)
ZERO_OR_MORE: Range = (0, None, True, False)
UNIT_OPEN_ABOVE: Range = (0, 1, True, False)
UNIT_CLOSED: Range = (0, 1, True, True)
SEED: Range = (0, 2**32 - 1, True, True)  # numpy's seeds (accelerate's set_seed seeds numpy too)


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


def first_range_error(values: Any, ranges: Mapping[str, Range]) -> str | None:
    """The first `range_error` among the flags of `ranges`, read as attributes of `values` (a dataclass)."""
    for name, bounds in ranges.items():
        message = range_error(name, getattr(values, name), bounds)
        if message is not None:
            return message
    return None
