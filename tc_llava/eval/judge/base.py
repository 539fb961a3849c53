"""The judge interface: bounded attempts per item, a breaker per run, verdicts cached as they come."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tc_llava.eval import jsonl
from tc_llava.eval.judge.breaker import (
    UNPARSEABLE, CircuitBreaker, FailedReply, ItemJudgeError, TransientJudgeError,
)
from tc_llava.eval.judge.parsing import parse_judge_reply
from tc_llava.eval.judge.prompts import PromptTemplate

log = logging.getLogger(__name__)


@dataclass
class JudgeResult:
    """Outcome for one item, as stored in the JSONL cache (``cached`` is not stored)."""

    id: str
    status: str  # "ok" or "failed"
    parsed: dict | None
    raw: str | None
    error: str | None
    attempts: int
    input_sha: str
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_record(self) -> dict[str, Any]:
        """The cache line's fields: all but ``cached``."""
        row = asdict(self)
        row.pop("cached")
        return row


def _messages_sha(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "judge"


def _cached_result(row: Any) -> JudgeResult:
    """A cache line's result; KeyError/TypeError (not a result, an unusable id) make the line unreadable."""
    hash(row["id"])  # an unhashable id (a list, an object) is as unusable as none
    return JudgeResult(**row, cached=True)


def read_cache(cache_path: str | os.PathLike) -> dict[str, JudgeResult]:
    """Last record per item id; a torn last line (crash mid-write) is skipped."""
    return {result.id: result for result in jsonl.read(cache_path, _cached_result)}


class Judge:
    """Base judge: subclasses implement :meth:`complete` (one attempt, raw reply text).

    Retry policy: each item gets ``1 + max_retries`` attempts in total. A transient error
    waits :meth:`retry_delay`; an unparseable reply is re-asked at once; an
    :class:`ItemJudgeError` fails the item immediately; a :class:`JudgeError` aborts the
    run (items judged so far stay in the cache), as do ``max_consecutive_failures``
    requests in a row that bring no verdict (:class:`CircuitBreaker`).
    """

    model: str
    max_retries: int = 0
    concurrency: int = 1
    max_consecutive_failures: int = 5
    _ready: bool = False  # preflight passed (see ready())

    def complete(self, messages: list[dict[str, str]]) -> str:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What to record next to every score: the judge changes the numbers."""
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        """Which weights judged: model id, revision or weights hash, and the kind of endpoint.

        Recorded beside :meth:`describe` in every result file; a closed API model can only name
        its dated snapshot, an open one its revision (and, run locally, the hash of its weights).
        """
        raise NotImplementedError

    def retry_delay(self, attempt: int, retry_after: float | None) -> float:
        return 0.0

    def preflight(self) -> None:
        """Raise :class:`JudgeError` now on what would fail every item, before any generation.

        Nothing by default: a judge whose constructor checks its inputs is ready once built.
        """

    def ready(self) -> None:
        """:meth:`preflight`, once per judge, when the first item needs judging: a scoring whose
        verdicts are all cached never contacts the judge, and needs no key or server."""
        if not self._ready:
            self.preflight()
            self._ready = True

    def cache_path(self, cache_dir: str | os.PathLike, task: str, prompt: PromptTemplate) -> Path:
        """``{cache_dir}/{task}.{judge model}.{prompt hash}.jsonl``."""
        return Path(cache_dir) / f"{_slug(task)}.{_slug(self.model)}.{prompt.sha}.jsonl"

    def breaker(self) -> CircuitBreaker:
        """A fresh breaker for one run of :meth:`score_items`, named by the judge's endpoint."""
        where = self.describe()
        endpoint = where.get("base_url") or where["model"]
        return CircuitBreaker(self.max_consecutive_failures, endpoint)

    def judge_one(
        self,
        item_id: str,
        messages: list[dict[str, str]],
        schema: Sequence[str],
        breaker: CircuitBreaker | None = None,
    ) -> JudgeResult:
        """Ask until the reply parses or the attempt budget is spent; an open ``breaker`` raises."""
        breaker = breaker or self.breaker()
        sha = _messages_sha(messages)
        raw = error = None
        attempts = 1 + max(0, self.max_retries)
        for attempt in range(1, attempts + 1):
            breaker.check()
            try:
                reply = self.complete(messages)
            except TransientJudgeError as exc:
                breaker.record(exc)
                breaker.check()
                error = str(exc)
                if attempt < attempts:
                    breaker.wait(self.retry_delay(attempt, exc.retry_after))
                continue
            except ItemJudgeError as exc:
                breaker.record(exc)
                breaker.check()
                return JudgeResult(item_id, "failed", None, raw, str(exc), attempt, sha)
            parsed = parse_judge_reply(reply, schema)
            if parsed is not None:
                breaker.record(None)
                return JudgeResult(item_id, "ok", parsed, reply, None, attempt, sha)
            raw, error = reply, f"unparseable reply for schema {list(schema)}"
            breaker.record(FailedReply(f"{error}: {reply[:200]!r}", UNPARSEABLE))
            breaker.check()
        return JudgeResult(item_id, "failed", None, raw, error, attempts, sha)

    def score_items(
        self,
        items: Mapping[str, Mapping[str, Any]],
        prompt: PromptTemplate,
        cache_path: str | os.PathLike,
    ) -> list[JudgeResult]:
        """Judge every item (id -> record), resuming from and appending to ``cache_path``.

        An item whose cache record is ``ok`` for the same rendered messages is not asked
        again; failed items, and items whose prediction changed since, are. Results come
        back in item order. The judge is contacted only if an item is left to judge, after
        :meth:`ready`. Only this thread writes the cache, one line per finished item;
        when the run aborts (:class:`JudgeError`, an open breaker, Ctrl-C), items finished by
        other threads meanwhile are written before the error propagates.
        """
        messages = {item_id: prompt.render(rec, item_id) for item_id, rec in items.items()}
        cache = read_cache(cache_path)
        done = {
            item_id: cache[item_id]
            for item_id, msgs in messages.items()
            if item_id in cache
            and cache[item_id].ok
            and cache[item_id].input_sha == _messages_sha(msgs)
        }
        todo = [item_id for item_id in messages if item_id not in done]
        log.info(
            "%s: %d cached, %d to judge with %s",
            Path(cache_path).name,
            len(done),
            len(todo),
            self.model,
        )
        if todo:
            self.ready()
            with (
                jsonl.Appender(cache_path) as out,
                ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool,
            ):
                def keep(result: JudgeResult) -> None:
                    out.write(result.to_record())
                    done[result.id] = result

                breaker = self.breaker()
                futures = [
                    pool.submit(self.judge_one, i, messages[i], prompt.schema, breaker)
                    for i in todo
                ]
                try:
                    for future in as_completed(futures):
                        keep(future.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    for future in futures:
                        finished = future.done() and not future.cancelled()
                        if finished and future.exception() is None:
                            if future.result().id not in done:
                                keep(future.result())
                    raise
        results = [done[item_id] for item_id in items]
        failed = sum(not r.ok for r in results)
        log.info("%s: %d judged, %d failed", Path(cache_path).name, len(results) - failed, failed)
        return results
