"""Reading a verdict out of a judge's reply: never ``eval``, never a guess.

Upstream's scripts ``ast.literal_eval`` the whole reply and loop until it parses; here a reply
either holds one valid verdict for the prompt's schema or counts as unparseable.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import Any

VCG_SCHEMA: tuple[str, ...] = ("score",)
QA_SCHEMA: tuple[str, ...] = ("pred", "score")
MAX_SCORE = 5
_DIGITS = re.compile(r"\s*\d+\s*")


def _balanced_spans(text: str) -> list[str]:
    """Top-level ``{...}`` substrings, skipping braces inside quoted strings."""
    spans, depth, start, quote, i = [], 0, 0, "", 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"" and depth:
            quote = ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
        i += 1
    return spans


def _literal_dict(span: str) -> dict | None:
    """A span as a dict via ``ast.literal_eval`` (Python) or ``json`` (true/false/null)."""
    for loads in (ast.literal_eval, json.loads):
        try:
            value = loads(span)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        return value if isinstance(value, dict) else None
    return None


def _normalize_score(value: Any) -> int | None:
    """Integer 0-5; ``4.0`` and the string ``"4"`` are accepted as 4, ``4.8``/True are not.

    Integral floats and digit strings are unambiguous, and upstream's ``int(score)``
    accepted both. A fractional score (the prompt's own example is 4.8) is rejected
    rather than truncated as upstream did: the prompt asks for an integer, and silently
    flooring would bias the mean.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_SCORE:
        return value
    return None


def _validate(reply: dict, schema: Sequence[str]) -> dict | None:
    """Keep the schema keys of a reply dict if they are all present and valid."""
    out: dict[str, Any] = {}
    for key in schema:
        if key not in reply:
            return None
        if key == "score":
            out[key] = _normalize_score(reply[key])
        elif key == "pred":
            pred = reply[key]
            out[key] = pred.strip().lower() if isinstance(pred, str) else None
            if out[key] not in ("yes", "no"):
                return None
        else:
            out[key] = reply[key]
        if out[key] is None:
            return None
    return out


def parse_judge_reply(text: str, schema: Sequence[str] = VCG_SCHEMA) -> dict | None:
    """Extract the judge's verdict from its reply, or None if there is no single valid one.

    Accepts a Python dict literal or JSON object anywhere in the text (bare, inside a
    fenced code block, around prose); never calls ``eval``. The verdict must have every
    key of ``schema`` (:data:`VCG_SCHEMA` ``('score',)`` or :data:`QA_SCHEMA`
    ``('pred', 'score')``): ``score`` an integer 0-5 (see :func:`_normalize_score`),
    ``pred`` 'yes'/'no' in any case and surrounding whitespace (returned lower-case).
    Extra keys (e.g. a 'reason') are allowed and dropped. Dicts without any schema key
    are ignored; a reply with several verdicts is accepted only if they all agree; a
    nested verdict (``{"result": {"score": 4}}``) is not looked into.
    """
    if not isinstance(text, str):
        return None
    verdicts = []
    for span in _balanced_spans(text):
        reply = _literal_dict(span)
        if reply is None or not any(key in reply for key in schema):
            continue
        verdicts.append(_validate(reply, schema))
    if not verdicts or any(v is None or v != verdicts[0] for v in verdicts):
        return None
    return verdicts[0]
