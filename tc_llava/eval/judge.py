"""LLM-as-judge for the VideoChatGPT benchmark and zero-shot video QA.

The upstream Video-ChatGPT scripts call gpt-3.5-turbo, ``ast.literal_eval`` the reply and
loop forever until every item parses. Here every item gets a bounded number of attempts;
what still fails is recorded as failed (with its last raw reply or error) and counted by
the scoring, never silently dropped and never retried forever within a run.

Two judges share one interface, :meth:`Judge.score_items`:

- :class:`OpenAIJudge` speaks the OpenAI chat-completions protocol over the standard
  library (any compatible server: OpenAI, vLLM, llama.cpp, ...), with a thread pool,
  per-request timeout and exponential backoff with jitter that honours ``Retry-After``.
- :class:`LocalJudge` runs any Hugging Face causal LM from a local path, greedily.

Every judged item is appended to a JSONL cache (:mod:`tc_llava.eval.jsonl`) as soon as it
is done, so an interrupted or repeated run only asks for what is missing, and a run whose
verdicts are all cached never contacts the judge. A dead or broken endpoint (no connection,
5xx, empty or garbled bodies, replies without a verdict) stops the run early
(:class:`CircuitBreaker`) instead of costing every remaining item its full retry budget, and
:meth:`Judge.preflight` lets the eval app find a missing key, an unreachable server or a model
the server lacks before it generates anything. The cache
file name carries the judge model and the prompt hash (:meth:`Judge.cache_path`): another
judge or another prompt never reuses these judgements.
"""

from __future__ import annotations

import ast
import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import re
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tc_llava.eval import jsonl
from tc_llava.provenance import model_hash

log = logging.getLogger(__name__)

VCG_SCHEMA: tuple[str, ...] = ("score",)
QA_SCHEMA: tuple[str, ...] = ("pred", "score")
MAX_SCORE = 5

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_DIGITS = re.compile(r"\s*\d+\s*")


# --------------------------------------------------------------------------- parsing


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


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptTemplate:
    """One judge prompt: system text, user template with ``{field}`` slots, reply schema."""

    name: str
    system: str
    user: str
    schema: tuple[str, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        """Record keys the templates read, in order of first use."""
        found = _PLACEHOLDER.findall(self.system + "\n" + self.user)
        return tuple(dict.fromkeys(found))

    @property
    def sha(self) -> str:
        """Short hash of the exact prompt bytes and schema: part of the cache file name."""
        blob = json.dumps([self.system, self.user, list(self.schema)], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def render(self, record: Mapping[str, Any], item_id: str = "?") -> list[dict[str, str]]:
        """Chat messages for one record; values are inserted verbatim, in a single pass."""
        missing = [f for f in self.fields if f not in record]
        if missing:
            raise KeyError(
                f"prompt {self.name!r}: item {item_id!r} lacks field(s) {missing}; "
                f"expected keys {list(self.fields)}, got {sorted(record)}"
            )

        def fill(template: str) -> str:
            return _PLACEHOLDER.sub(
                lambda m: str(record[m[1]]) if m[1] in record else m[0], template
            )

        return [
            {"role": "system", "content": fill(self.system)},
            {"role": "user", "content": fill(self.user)},
        ]


def load_prompts(path: str | os.PathLike) -> dict[str, PromptTemplate]:
    """Read a prompt file (``configs/judge/prompts/*.yaml``): ``schema`` + ``prompts``."""
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    schema = cfg.get("schema") if isinstance(cfg, dict) else None
    prompts = cfg.get("prompts") if isinstance(cfg, dict) else None
    if not schema or not isinstance(prompts, dict) or not prompts:
        raise ValueError(f"{path}: expected top-level 'schema' (list) and 'prompts' (mapping)")
    out = {}
    for name, spec in prompts.items():
        if not isinstance(spec, dict) or not all(
            isinstance(spec.get(k), str) for k in ("system", "user")
        ):
            raise ValueError(f"{path}: prompts.{name} needs string fields 'system' and 'user'")
        out[name] = PromptTemplate(name, spec["system"], spec["user"], tuple(schema))
    return out


# --------------------------------------------------------------------------- judging


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


TOKEN_LIMIT_FIELDS = ("auto", "max_tokens", "max_completion_tokens")
# OpenAI's reasoning models (o1, o3, o4-mini, gpt-5*, gpt-6*) take max_completion_tokens and refuse max_tokens.
_REASONING_MODEL = re.compile(r"^(o\d|gpt-[5-9])")

# Exceptions of a request that never reached the server (urllib wraps connect-phase errors,
# DNS and connect timeouts included, in URLError; a connection closed without a reply is a
# ConnectionError). Catch HTTPError, a URLError, before these.
_NO_CONNECTION = (urllib.error.URLError, ConnectionError)


def _served_models(payload: bytes) -> set[str]:
    """Model ids of a ``GET /models`` answer (``{"data": [{"id": ...}]}``); empty if not one."""
    try:
        return {str(m["id"]) for m in json.loads(payload)["data"]}
    except (ValueError, KeyError, TypeError):
        return set()


def _retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """``retry-after-ms`` (OpenAI), or ``Retry-After`` as seconds or an HTTP date."""
    if not headers:
        return None
    if headers.get("retry-after-ms"):
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class OpenAIJudge(Judge):
    """Judge over an OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint.

    The API key is read from the environment variable ``api_key_env`` when a request is
    made, so re-scoring from a complete cache needs no key (None: send no
    ``Authorization`` header, for local servers). ``timeout_s`` bounds the connection
    and each socket read. Delays: ``backoff_base_s * 2**(k-1)``
    capped at ``backoff_max_s``, times ``1 + backoff_jitter * U(0,1)``, and at least the
    server's ``Retry-After`` (itself capped at ``backoff_max_s`` so that no header can
    stall a run). ``max_consecutive_failures`` requests in a row without a verdict, whatever
    failed, stop the run (:class:`CircuitBreaker`).
    """

    def __init__(
        self,
        model: str = "gpt-5.6-terra",
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 64,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        backoff_jitter: float = 0.25,
        max_consecutive_failures: int = 5,
        revision: str | None = None,
        token_limit_field: str = "auto",
    ):
        if token_limit_field not in TOKEN_LIMIT_FIELDS:
            raise JudgeError(f"judge.token_limit_field={token_limit_field!r}: expected one of {TOKEN_LIMIT_FIELDS}")
        self.model = model
        self.revision = revision
        self.token_limit_field = token_limit_field
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.backoff_jitter = float(backoff_jitter)
        self.max_consecutive_failures = int(max_consecutive_failures)

    def describe(self) -> dict[str, Any]:
        return {
            "type": "openai",
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def provenance(self) -> dict[str, Any]:
        return {"model": self.model, "revision": self.revision, "weights_sha256": None,
                "endpoint": "openai-compatible", "base_url": self.base_url}

    def _limit_field(self) -> str:
        """``max_completion_tokens`` for OpenAI's reasoning families, which refuse ``max_tokens``; else ``max_tokens``."""
        if self.token_limit_field != "auto":
            return self.token_limit_field
        return "max_completion_tokens" if _REASONING_MODEL.match(self.model) else "max_tokens"

    def retry_delay(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        delay *= 1 + self.backoff_jitter * random.random()
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    def _headers(self) -> dict[str, str]:
        """JSON headers with the bearer key; :class:`JudgeError` if its variable is unset."""
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise JudgeError(
                    f"judge.api_key_env: environment variable {self.api_key_env} is not set "
                    f"(set it, or api_key_env=null for a server without authentication)"
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _refused(self, message: str, code: int) -> JudgeError:
        """401/403/404 fail every item alike: say which key, URL and model were used."""
        if code == 404 and "model_not_found" in message:
            hint = (f"model not found: judge.model={self.model} is retired, renamed or not served at "
                    f"{self.base_url}; name a current model, or use the open judge (judge=served or judge=local)")
        elif code == 404:
            hint = f"no such URL, or the server does not serve judge.model={self.model}"
        elif self.api_key_env:
            hint = f"the key in {self.api_key_env} was refused for judge.model={self.model}"
        else:
            hint = "the server wants a key: set judge.api_key_env to the variable holding it"
        return JudgeError(f"{message} ({hint})")

    def preflight(self) -> None:
        """Find a missing key, a dead server or a model it lacks in one or two requests.

        ``GET {base_url}/models`` (served by OpenAI, vLLM and llama.cpp) settles it when it
        lists ``model``. When it does not (a 404 from a server without that route, a listing
        under other names, an answer in another format), one chat request with the judge's
        own settings decides. Fatal are only answers no retry changes: no connection, 401,
        403, 404 and 400; a 429, 5xx or timeout means the server is up, and the per-item
        retries deal with it.
        """
        headers = self._headers()
        url = f"{self.base_url}/models"
        payload = b""
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=self.timeout_s
            ) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise self._refused(f"HTTP {exc.code} from {url}", exc.code) from exc
        except _NO_CONNECTION as exc:
            raise JudgeError(
                f"judge.base_url={self.base_url}: cannot reach {url} ({exc}); "
                "start the server or correct the URL"
            ) from exc
        except (OSError, http.client.HTTPException):
            pass  # a slow or garbled answer is still an answer: the chat request decides
        served = _served_models(payload)
        if self.model in served:
            return
        if served:
            log.warning("judge preflight: %s/models does not list judge.model=%s (it lists %s); asking once",
                        self.base_url, self.model, ", ".join(sorted(served)[:8]))
        try:
            self.complete([{"role": "user", "content": "Reply with {'score': 0}"}])
        except UnreachableError as exc:
            raise JudgeError(f"judge.base_url={self.base_url}: cannot reach it ({exc})") from exc
        except ItemJudgeError as exc:
            raise JudgeError(
                f"judge.model={self.model}: a one-line chat request was refused, as every item "
                f"would be: {exc}"
            ) from exc
        except TransientJudgeError as exc:
            log.warning("judge preflight: %s; going on (items retry with backoff)", exc)

    def complete(self, messages: list[dict[str, str]]) -> str:
        url = f"{self.base_url}/chat/completions"
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            self._limit_field(): self.max_tokens,
        }
        request = urllib.request.Request(
            url, json.dumps(body).encode(), self._headers(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(500).decode("utf-8", "replace")
            message = f"HTTP {exc.code} from {url}: {detail}"
            kind = f"HTTP {exc.code}"
            if exc.code in (408, 409, 429) or exc.code >= 500:
                raise TransientJudgeError(message, _retry_after_seconds(exc.headers), kind) from exc
            if exc.code in (401, 403, 404):
                raise self._refused(message, exc.code) from exc
            raise ItemJudgeError(message, kind) from exc
        except _NO_CONNECTION as exc:
            raise UnreachableError(f"{type(exc).__name__} from {url}: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:  # read timeouts, malformed answers
            raise TransientJudgeError(f"{type(exc).__name__} from {url}: {exc}", kind=type(exc).__name__) from exc
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise TransientJudgeError(
                f"{url}: expected a chat completion with choices[0].message.content, "
                f"got {payload[:200]!r}",
                kind="empty body" if not payload.strip() else "not a chat completion",
            ) from exc
        return content if isinstance(content, str) else ""


def _hub_snapshot(path: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot directory (``.../snapshots/<commit>``), else None."""
    return path.name if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name) else None


class LocalJudge(Judge):
    """Judge with a local Hugging Face causal LM, greedy decoding, one item at a time.

    The tokenizer's chat template is used when it has one; otherwise the prompt is
    ``"system: {system}\\nuser: {user}\\nassistant:"``. Greedy decoding repeats itself,
    so re-asking is pointless and ``max_retries`` defaults to 0. Building it only checks
    the path: the eval app builds the judge before generating to find a wrong path early,
    and the weights load on first use (a fully cached re-score never loads them).
    """

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 64,
        max_retries: int = 0,
        model_id: str | None = None,
        revision: str | None = None,
        max_consecutive_failures: int = 5,
    ):
        if not (Path(model_path) / "config.json").is_file():
            raise JudgeError(
                f"judge.model_path={model_path}: no config.json there; expected a local "
                "Hugging Face model directory (config, weights and tokenizer)"
            )
        self.model_path = str(model_path)
        self.model = Path(model_path).resolve().name
        self.model_id, self.revision = model_id, revision
        snapshot = _hub_snapshot(Path(model_path).resolve())
        if revision and snapshot and snapshot != revision:
            raise JudgeError(f"judge.revision={revision}: judge.model_path={model_path} is the hub snapshot {snapshot}; "
                             "download the pinned revision or set judge.revision to the one you judge with")
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = int(max_new_tokens)
        self.max_retries = int(max_retries)
        self.max_consecutive_failures = int(max_consecutive_failures)
        self.concurrency = 1

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=False)  # a download is data, never code

    @cached_property
    def lm(self) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype),
                                                  trust_remote_code=False)
        return lm.to(self.device).eval()

    def describe(self) -> dict[str, Any]:
        return {
            "type": "local",
            "model": self.model,
            "model_path": self.model_path,
            "base_url": None,
            "temperature": 0.0,
            "max_new_tokens": self.max_new_tokens,
        }

    @cached_property
    def weights_sha256(self) -> str | None:
        """SHA-256 over the judge's config and weight files (read once per process; 15 GB at 7B)."""
        return model_hash(self.model_path)["sha256"]

    def provenance(self) -> dict[str, Any]:
        return {"model": self.model_id or self.model, "revision": self.revision,
                "weights_sha256": self.weights_sha256, "endpoint": "local-transformers", "model_path": self.model_path}

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def complete(self, messages: list[dict[str, str]]) -> str:
        import torch

        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        enc = self.tokenizer(
            self.prompt_text(messages), return_tensors="pt", add_special_tokens=not has_template
        )
        enc = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}
        pad_id = self.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.lm.generate(
                **enc,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad_id if pad_id is not None else self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
