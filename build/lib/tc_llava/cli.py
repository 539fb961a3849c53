"""What the command-line apps share: a user's mistake is one line, not a traceback."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def one_line_errors(*errors: type[BaseException]) -> Iterator[None]:
    """Turn ``errors`` (bad settings, bad data, a refused run dir, a run stopped to keep its state
    clean) into one logged line and exit status 1; the traceback goes to the debug log
    (``hydra.verbose=true``), and a DataLoader worker's own traceback with it."""
    try:
        yield
    except errors as e:
        log.debug("traceback", exc_info=True)
        if getattr(e, "worker_traceback", None):
            log.debug("in the DataLoader worker: %s", e.worker_traceback)
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(1)
