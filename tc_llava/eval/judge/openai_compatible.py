""":class:`OpenAIJudge`: any OpenAI-compatible chat-completions server, over the standard library."""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from tc_llava.eval.judge.base import Judge
from tc_llava.eval.judge.breaker import ItemJudgeError, JudgeError, TransientJudgeError, UnreachableError

log = logging.getLogger(__name__)

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
            message = f"HTTP {exc.code} from {url}" + (f": {detail}" if detail.strip() else "")
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
