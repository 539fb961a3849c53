"""Reading the text files users hand us (record lists, question files) with errors one line long.

Python's ``UnicodeDecodeError`` carries the whole undecodable input, and frameworks that
report an exception by its ``repr`` (Hydra's ``instantiate``) print all of it: a 700 kB file
became one 700,000-character line. :func:`read_text` names the file, the byte offset and the
encoding expected instead.
"""

from __future__ import annotations

import os
from pathlib import Path


class EncodingError(ValueError):
    """A text file that is not in the expected encoding; the message names the file and byte offset."""


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The text of ``path``, or :class:`EncodingError` saying where its bytes stop being ``encoding``."""
    path = Path(path)
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        byte = e.object[e.start : e.start + 1].hex()
        raise EncodingError(f"{path}: not {e.encoding} text: byte 0x{byte} at byte offset {e.start} ({e.reason}); "
                            f"expected {encoding}: re-save the file as {encoding}") from None
