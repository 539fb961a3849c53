"""What a rule parameter may be, checked where the rule is made.

The same numbers arrive from Hydra configs and command-line overrides (``rope.gamma=abc`` is
a string there, ``rope.gamma=nan`` a float NaN), from Python callers, and from a checkpoint's
config.json (whose JSON may hold NaN too). The rules and the pooling check theirs in their
constructors through these helpers, so every path refuses the same values with one message.
Bools are refused as numbers and numeric strings are never converted: either would hide a
wrong config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class ParamError(ValueError):
    """``field must be expected, got value``; :meth:`at` says the same of another location."""

    def __init__(self, field: str, expected: str, value: Any) -> None:
        self.field, self.expected, self.value = field, expected, value
        super().__init__(self.at(field))

    def at(self, where: str) -> str:
        """The message with ``where`` (e.g. ``.../config.json: tc_llava.rope.gamma``) in place of the field."""
        return f"{where} must be {self.expected}, got {self.value!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(field: str, value: Any, minimum: float = 0.0) -> float:
    """``value`` as a float, if it is a finite int or float of at least ``minimum``."""
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value < minimum:
        raise ParamError(field, f"a finite number >= {minimum:g}", value)
    return float(value)


def integer(field: str, value: Any, minimum: int = 0) -> int:
    """``value``, if it is an int of at least ``minimum``."""
    if not _is_int(value) or value < minimum:
        raise ParamError(field, f"an integer >= {minimum}", value)
    return value


def integers(field: str, value: Any, axes: tuple[str, ...], minimum: int = 0) -> tuple[int, ...]:
    """``value`` as a tuple, if it is a list (or ListConfig) of one int of at least ``minimum`` per axis."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != len(axes)
            or not all(_is_int(v) and v >= minimum for v in value)):
        raise ParamError(field, f"{len(axes)} integers >= {minimum} ({', '.join(axes)})", value)
    return tuple(value)
