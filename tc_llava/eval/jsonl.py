"""Append-only JSON-lines caches (the runner's generations, the judge's verdicts), and reading a
record file given either as one JSON list or as JSON lines.

Both must survive a crash at any moment, so each record is one line, written and flushed
as soon as it exists: a killed run loses at most the line being written. Reading drops such
a torn last line (cut anywhere, inside a multi-byte UTF-8 character too) and skips any other
unreadable one, counted in one warning per file; appending to a file whose last write was
torn first cuts that fragment off, so the next record starts on its own line. A full disk
is a :class:`DiskFullError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
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


class DiskFullError(OSError):
    """The disk filled up while writing a named file."""


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn ENOSPC while writing ``path`` into a :class:`DiskFullError` naming it (a bare ``write`` names no file)."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC or isinstance(e, DiskFullError):
            raise
        raise DiskFullError(errno.ENOSPC, f"disk full (no space left on device) while writing {path}; "
                            "free space and rerun (finished work is kept)", str(path)) from e


def read(path: str | os.PathLike, parse: Callable[[Any], T]) -> Iterator[T]:
    """``parse`` of each line's JSON, in file order; nothing for a missing file.

    A last line without its newline that does not parse is torn (a crash cut it) and dropped;
    any other line that is not UTF-8 JSON, or that ``parse`` rejects with ``KeyError``/``TypeError``
    (a record without its id, not an object), is skipped. Both are counted in one warning.
    """
    path = Path(path)
    if not path.exists():
        return
    torn, skipped = 0, []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                record = parse(json.loads(text))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                if raw.endswith(b"\n"):
                    skipped.append(lineno)
                else:
                    torn += 1
                continue
            yield record
    if torn or skipped:
        log.warning("%s: dropped %d torn last line(s) (cut by a crash) and skipped %d unreadable line(s)%s",
                    path, torn, len(skipped), f" (lines {skipped[:5]})" if skipped else "")


def load_records(path: Path) -> Any:
    """A file of records as users write them: one JSON document (a list), or one JSON object per line.
    A file that is not UTF-8 is one line naming it and the byte offset (:func:`tc_llava.data.files.read_text`)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _cut_torn_tail(path: Path) -> None:
    """End a file whose last write was cut off: a fragment that is no JSON record is cut off
    (the reader drops it too), a complete record that only lacks its newline gets it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:].decode("utf-8"))
            f.write(b"\n")
        except (UnicodeDecodeError, json.JSONDecodeError):
            f.truncate(start)


class Appender:
    """Appends one JSON object per line to ``path``, flushing each; a torn last line is cut off first."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = Path(path)
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            _cut_torn_tail(path)
            self._file = path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """One record, on disk (as far as the OS is concerned) when this returns."""
        with writing(self.path):
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        with writing(self.path):
            self._file.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
