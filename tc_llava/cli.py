"""What the command-line apps share: a user's mistake is one line, not a traceback."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

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


def composition_message(e: Exception) -> str:
    """Hydra's multi-line composition error as one line: its lines joined, an option list as a comma list."""
    lines = [line.strip().rstrip(".") for line in str(e).splitlines() if line.strip()]
    if isinstance(e, MissingConfigException) and e.options:
        lines = [lines[0], f"available: {', '.join(e.options)}"]
    return "; ".join(lines)


@contextlib.contextmanager
def one_line_composition_errors() -> Iterator[None]:
    """Hydra's own errors in composing the config (an unknown option or key, a malformed override) as one
    line and exit status 1, around a ``@hydra.main`` app.

    Hydra prints these as multi-line blocks itself; under ``HYDRA_FULL_ERROR=1`` it raises them, and
    that is how they are caught here. A user who set ``HYDRA_FULL_ERROR`` gets Hydra's own report.
    """
    if os.environ.get("HYDRA_FULL_ERROR"):
        yield
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (ConfigCompositionException, OverrideParseException) as e:
        print(f"{type(e).__name__}: {composition_message(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that both stop an app the same way."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(how_to_continue: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's stop; torchrun forwards it to every rank) end the app with
    one line, ``stopped by SIGTERM: <how_to_continue()>``, from the main rank, and exit 128 + the signal number."""
    def stop(signum: int, frame: object) -> None:
        # Loader workers stopped by the same signal trip torch's SIGCHLD handler, which would raise again
        # while the stack unwinds (in a DataLoader's __del__, as an "Exception ignored" traceback): from the
        # first signal on, neither it nor a second Ctrl-C raises.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        log.debug("traceback", exc_info=True)
        if os.environ.get("RANK", "0") == "0":
            log.error("stopped by %s: %s", signal.Signals(signum).name, how_to_continue())
        sys.exit(128 + signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
