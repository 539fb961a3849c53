"""Append-only JSON-lines caches (the runner's generations, the judge's verdicts), and reading a
record file given either as one JSON list or as JSON lines.

Both must survive a crash at any moment, so each record is one line, written and flushed
as soon as it exists: a killed run loses at most the line being written. Reading skips
such a torn line (and any other unreadable one) with a warning, and appending to a file
whose last write was torn first ends that line, so the next record starts on its own.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from tc_llava.data.files import read_text

log = logging.getLogger(__name__)

T = TypeVar("T")


def read(path: str | os.PathLike, parse: Callable[[Any], T]) -> Iterator[T]:
    """``parse`` of each line's JSON, in file order; nothing for a missing file.

    A line that is not JSON, or that ``parse`` rejects with ``KeyError``/``TypeError`` (a
    record without its id, not an object), is logged and skipped.
    """
    path = Path(path)
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = parse(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                log.warning("%s:%d: unreadable cache line skipped (%s)", path, lineno, exc)
                continue
            yield record


def load_records(path: Path) -> Any:
    """A file of records as users write them: one JSON document (a list), or one JSON object per line.
    A file that is not UTF-8 is one line naming it and the byte offset (:func:`tc_llava.data.files.read_text`)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _torn(path: Path) -> bool:
    """True for a file whose last write was cut off: it does not end with a newline."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class Appender:
    """Appends one JSON object per line to ``path``, flushing each; a torn last line is ended first."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = _torn(path)
        self._file = path.open("a", encoding="utf-8")
        if torn:
            self._file.write("\n")

    def write(self, record: Mapping[str, Any]) -> None:
        """One record, on disk (as far as the OS is concerned) when this returns."""
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
