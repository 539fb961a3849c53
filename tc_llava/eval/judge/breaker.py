"""What can go wrong with a judge request, and the breaker that stops a run whose requests keep failing."""

from __future__ import annotations

import threading
from collections import Counter


class JudgeError(RuntimeError):
    """A problem no retry can fix for any item (bad key, unknown model, wrong URL)."""


class FailedReply(Exception):
    """A request that brought no verdict; ``kind`` names the failure for the :class:`CircuitBreaker`'s count."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class TransientJudgeError(FailedReply):
    """A failed request worth retrying after a delay (429, 5xx, timeout, connection, garbled body)."""

    def __init__(self, message: str, retry_after: float | None = None, kind: str = "no reply"):
        super().__init__(message, kind)
        self.retry_after = retry_after


class UnreachableError(TransientJudgeError):
    """A request that never reached the endpoint: connection refused, DNS, connect timeout, or
    the connection closed without a reply."""

    def __init__(self, message: str):
        super().__init__(message, kind="no connection")


class ItemJudgeError(FailedReply):
    """A request this item will never get through (e.g. HTTP 400): fail it, no retry."""


UNPARSEABLE = "no valid verdict in the reply"  # the kind of a reply that came back but does not parse


class CircuitBreaker:
    """Stops a judging run once ``limit`` requests in a row (all threads) brought no verdict.

    Every failed request counts, whatever failed: no connection, an HTTP error (5xx, 429, 400),
    an empty or garbled body, a timeout, a reply without a valid verdict. Against a judge that
    answers but never usefully, each item would otherwise spend its whole retry budget in
    backoff (about 31 s with the defaults, 70 minutes per 1,000 items at concurrency 8). Only
    a verdict resets the count, so a judge that fails some items and scores the rest goes on.
    Once open, every thread raises :class:`JudgeError` at its next attempt or as soon as its
    backoff is woken; a verdict already received is still returned, so none is lost.
    """

    def __init__(self, limit: int, endpoint: str):
        self.limit, self.endpoint = max(1, int(limit)), endpoint
        self.kinds: Counter[str] = Counter()  # failure kind -> count, in the current run of failures
        self.reason = ""
        self._lock = threading.Lock()
        self._open = threading.Event()

    @property
    def count(self) -> int:
        """Failed requests in a row so far."""
        return sum(self.kinds.values())

    def record(self, failure: FailedReply | None) -> None:
        """Count a failed request; None (a verdict) resets the count."""
        with self._lock:
            if self._open.is_set():
                return
            if failure is None:
                self.kinds.clear()
                return
            self.kinds[failure.kind] += 1
            if self.count >= self.limit:
                kinds = ", ".join(f"{n} x {kind}" for kind, n in self.kinds.most_common())
                last = " ".join(str(failure).split())  # one line, whatever the server sent
                self.reason = (
                    f"judge stopped: {self.count} requests in a row to {self.endpoint} failed ({kinds}; "
                    f"judge.max_consecutive_failures={self.limit}); last: {last:.300}. "
                    "Verdicts so far are cached: re-run once the judge answers"
                )
                self._open.set()

    def check(self) -> None:
        """Raise :class:`JudgeError` if the breaker is open."""
        if self._open.is_set():
            raise JudgeError(self.reason)

    def wait(self, seconds: float) -> None:
        """Sleep before a retry; wake (and raise) at once if another thread opens the breaker."""
        self._open.wait(seconds)
        self.check()
