"""Judge parsing, the HTTP judge against a real local server, the local-LM judge, scoring.

The server is a real ``http.server`` on 127.0.0.1 (port 0) speaking chat completions,
scripted per item: good, malformed, 429 with Retry-After, 500, 400, slow (past the
client timeout), a connection closed without a reply. Requests are counted on the server,
so resume is checked by what the server actually saw. A dead endpoint is a port nothing
listens on.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tc_llava.configs import CONFIG_DIR
from tc_llava.eval.judge import (
    QA_SCHEMA,
    UNPARSEABLE,
    VCG_SCHEMA,
    JudgeError,
    JudgeResult,
    LocalJudge,
    OpenAIJudge,
    PromptTemplate,
    load_prompts,
    parse_judge_reply,
    read_cache,
)
from tc_llava.eval.judge.openai_compatible import _retry_after_seconds
from tc_llava.eval.scoring import (
    index_items,
    load_predictions,
    run_videochatgpt,
    run_zeroshot_qa,
    summarize_videochatgpt,
    summarize_zeroshot_qa,
)

PROMPTS = CONFIG_DIR / "judge" / "prompts"
KEY_ENV = "TC_LLAVA_TEST_JUDGE_KEY"
SERVED = ("judge-test", "judge-other", "judge-a", "judge-b")  # the test server's GET /v1/models

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- parsing

PARSE_CASES = [
    # (reply, schema, expected)
    ("{'score': 4}", VCG_SCHEMA, {"score": 4}),
    ('{"score": 3}', VCG_SCHEMA, {"score": 3}),
    ("  {'score': 0}\n", VCG_SCHEMA, {"score": 0}),
    ("```python\n{'score': 5}\n```", VCG_SCHEMA, {"score": 5}),
    ('```json\n{"pred": "yes", "score": 4}\n```', QA_SCHEMA, {"pred": "yes", "score": 4}),
    ("Here is my evaluation: {'score': 2}", VCG_SCHEMA, {"score": 2}),
    ("{'score': 3}\n\nThe prediction misses the second event.", VCG_SCHEMA, {"score": 3}),
    ("{'pred': 'no', 'score': 1}", QA_SCHEMA, {"pred": "no", "score": 1}),
    ("{'pred': 'Yes', 'score': 5}", QA_SCHEMA, {"pred": "yes", "score": 5}),
    ("{'score': 4.0}", VCG_SCHEMA, {"score": 4}),
    ("{'score': '4'}", VCG_SCHEMA, {"score": 4}),
    (
        '{"pred": "yes", "score": 4, "reason": "it\'s a paraphrase {sort of}"}',
        QA_SCHEMA,
        {"pred": "yes", "score": 4},
    ),
    ("{'score': 3} ... to repeat: {'score': 3}", VCG_SCHEMA, {"score": 3}),
    ('{"score": 4, "confident": true}', VCG_SCHEMA, {"score": 4}),
    ("{'pred': 'yes', 'score': 4}", VCG_SCHEMA, {"score": 4}),
    ("[{'score': 4}]", VCG_SCHEMA, {"score": 4}),
    # rejected
    ("4", VCG_SCHEMA, None),
    ("Score: 4/5", VCG_SCHEMA, None),
    ("", VCG_SCHEMA, None),
    ("{'score': 4.8}", VCG_SCHEMA, None),
    ("{''score': 4.8}", VCG_SCHEMA, None),
    ("{'score': 6}", VCG_SCHEMA, None),
    ("{'score': -1}", VCG_SCHEMA, None),
    ("{'score': 'four'}", VCG_SCHEMA, None),
    ("{'score': True}", VCG_SCHEMA, None),
    ("{'score': None}", VCG_SCHEMA, None),
    ("{'rating': 4}", VCG_SCHEMA, None),
    ("{'score': 4", VCG_SCHEMA, None),
    ("{'score': 2} or maybe {'score': 4}", VCG_SCHEMA, None),
    ('{"evaluation": {"score": 4}}', VCG_SCHEMA, None),
    ("{'score': 4}", QA_SCHEMA, None),
    ("{'pred': 'maybe', 'score': 3}", QA_SCHEMA, None),
    ("{'pred': True, 'score': 3}", QA_SCHEMA, None),
    ("{'pred': 'yes', 'score': 4.5}", QA_SCHEMA, None),
    ("{'score': __import__('os').getcwd()}", VCG_SCHEMA, None),
]


@pytest.mark.parametrize("reply,schema,expected", PARSE_CASES)
def test_parse_judge_reply(reply, schema, expected):
    assert parse_judge_reply(reply, schema) == expected


def test_parse_rejects_non_text():
    assert parse_judge_reply(None) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- prompts


def test_prompt_files_are_pinned_and_render_verbatim():
    vcg = load_prompts(PROMPTS / "videochatgpt.yaml")
    qa = load_prompts(PROMPTS / "zeroshot_qa.yaml")
    assert list(vcg) == ["CI", "DO", "CU", "TU", "CO"] and list(qa) == ["qa"]
    assert all(p.schema == ("score",) for p in vcg.values()) and qa["qa"].schema == (
        "pred",
        "score",
    )
    assert vcg["CO"].fields == ("Q1", "Q2", "A", "pred1", "pred2")
    # Upstream's exact bytes: changing them changes scores, hashes and cache files.
    assert {k: p.sha for k, p in {**vcg, **qa}.items()} == {
        "CI": "cb9b2008ce",
        "DO": "491906eb6f",
        "CU": "5e55db364e",
        "TU": "98b374b28e",
        "CO": "ed8fcd23d6",
        "qa": "94066a7c94",
    }
    msgs = vcg["CI"].render({"Q": "What {A} happens?", "A": "A dog runs.", "pred": "{Q}"})
    assert (
        msgs[0]["role"] == "system"
        and "Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus"
        in msgs[0]["content"]
    )
    assert (
        "Question: What {A} happens?\nCorrect Answer: A dog runs.\nPredicted Answer: {Q}\n\n"
        in msgs[1]["content"]
    )
    assert msgs[1]["content"].endswith(
        "INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. "
        "Only provide the Python dictionary string. For example, your response "
        "should look like this: {''score': 4.8}."
    )
    with pytest.raises(KeyError, match=r"item 'v_0' lacks field\(s\) \['pred'\]"):
        vcg["TU"].render({"Q": "q", "A": "a"}, "v_0")


# --------------------------------------------------------------------------- HTTP server


class ChatServer:
    """Scripted chat-completions server; each item's reply script is keyed by its question.

    ``script[key]`` is a list of actions used one per request (the last one repeats):
    ``("reply", text)``, ``("status", code, headers)``, ``("slow", seconds, text)``,
    ``("body", raw_bytes)``, ``("close",)`` (hang up without a reply). ``GET /v1/models``
    lists ``models`` (None: 404, a server without that route); GETs are not counted.
    """

    def __init__(self, script, key_of, models=SERVED):
        self.script, self.key_of, self.models = script, key_of, models
        self.requests = defaultdict(list)  # key -> [arrival time]
        self.bodies, self.auth, self.gets = [], [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.gets.append(self.path)
                if self.path != "/v1/models" or server.models is None:
                    return self._send(404, b'{"error": "not found"}')
                models = [{"id": m, "object": "model"} for m in server.models]
                self._send(200, json.dumps({"object": "list", "data": models}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = server.key_of(body)
                with server.lock:
                    server.bodies.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    n = len(server.requests[key])
                    server.requests[key].append(time.monotonic())
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.path != "/v1/chat/completions":
                        return self._send(404, b'{"error": "not found"}')
                    actions = server.script[key]
                    self._act(actions[min(n, len(actions) - 1)])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code, payload, headers=None):
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _act(self, action):
                kind = action[0]
                if kind == "status":
                    return self._send(action[1], b'{"error": {"message": "scripted"}}', action[2])
                if kind == "body":
                    return self._send(200, action[1])
                if kind == "close":
                    return  # HTTP/1.0: the connection closes with nothing sent
                if kind == "slow":
                    time.sleep(action[1])
                text = action[-1]
                completion = {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]
                }
                self._send(200, json.dumps(completion).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def count(self, key=None):
        return sum(map(len, self.requests.values())) if key is None else len(self.requests[key])

    def reset_counts(self):
        self.requests.clear()


def _question_of(body) -> str:
    user = body["messages"][-1]["content"]
    match = re.search(r"^Question(?: 1)?: (.*)$", user, re.M)
    return match[1] if match else ""


@pytest.fixture
def chat_server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(KEY_ENV, "test-key")
    servers = []

    def start(script, key_of=_question_of, models=SERVED):
        server = ChatServer(script, key_of, models)
        server.thread.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


def _judge(base_url, **overrides) -> OpenAIJudge:
    cfg = OmegaConf.load(CONFIG_DIR / "judge" / "openai.yaml")
    cfg.merge_with(
        dict(
            base_url=base_url,
            api_key_env=KEY_ENV,
            model="judge-test",
            concurrency=4,
            timeout_s=0.4,
            max_retries=3,
            backoff_base_s=0.01,
            backoff_max_s=2.0,
            backoff_jitter=0.1,
        ),
        overrides,
    )
    from hydra.utils import instantiate

    return instantiate(cfg)


def _items(keys):
    return {
        f"v{i}_0": {"video_name": f"v{i}", "Q": k, "A": "a dog runs", "pred": "a dog"}
        for i, k in enumerate(keys)
    }


def test_http_judge_retries_failures_and_resume(chat_server, tmp_path):
    script = {
        "good": [("reply", "{'score': 4}")],
        "fenced": [("reply", '```json\n{"score": 3}\n```')],
        "malformed_then_good": [
            ("reply", "I would rate it 2 out of 5."),
            ("reply", "{'score': 2}"),
        ],
        "never_parses": [("reply", "Score: four")],
        "rate_limited": [("status", 429, {"Retry-After": "1"}), ("reply", "{'score': 5}")],
        "error_then_good": [("status", 500, {}), ("status", 503, {}), ("reply", "{'score': 1}")],
        "always_500": [("status", 500, {})],
        "slow_then_good": [("slow", 1.2, "{'score': 0}"), ("reply", "{'score': 3}")],
        "bad_request": [("status", 400, {})],
        "bad_body": [("body", b"<html>gateway</html>"), ("reply", "{'score': 5}")],
    }
    server = chat_server(script)
    judge = _judge(server.base_url, max_consecutive_failures=100)  # per-item retries, not the breaker
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["CI"]
    items = _items(script)
    cache = judge.cache_path(tmp_path, "videochatgpt_CI", prompt)
    assert cache.name == f"videochatgpt_CI.judge-test.{prompt.sha}.jsonl"

    t0 = time.monotonic()
    results = {r.id: r for r in judge.score_items(items, prompt, cache)}
    assert time.monotonic() - t0 < 15
    by_key = {items[i]["Q"]: r for i, r in results.items()}
    assert list(results) == list(items)

    expected_ok = {
        "good": (4, 1),
        "fenced": (3, 1),
        "malformed_then_good": (2, 2),
        "rate_limited": (5, 2),
        "error_then_good": (1, 3),
        "slow_then_good": (3, 2),
        "bad_body": (5, 2),
    }
    for key, (score, attempts) in expected_ok.items():
        r = by_key[key]
        assert (r.status, r.parsed, r.attempts) == ("ok", {"score": score}, attempts), key
        assert server.count(key) == attempts, key

    never = by_key["never_parses"]
    assert never.status == "failed" and never.raw == "Score: four" and never.attempts == 4
    assert "unparseable" in never.error and server.count("never_parses") == 4
    assert by_key["always_500"].status == "failed" and "HTTP 500" in by_key["always_500"].error
    assert server.count("always_500") == 4 and by_key["always_500"].raw is None
    assert by_key["bad_request"].status == "failed" and "HTTP 400" in by_key["bad_request"].error
    assert server.count("bad_request") == 1  # not retryable

    waited = server.requests["rate_limited"][1] - server.requests["rate_limited"][0]
    assert waited >= 0.95, "Retry-After: 1 must be honoured"
    assert server.max_in_flight > 1, "requests should run concurrently"
    assert set(server.auth) == {"Bearer test-key"}
    assert all(
        b["model"] == "judge-test" and b["temperature"] == 0 and b["max_tokens"] == 64
        for b in server.bodies
    )

    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == len(items)
    assert {r["status"] for r in rows} == {"ok", "failed"}
    assert all(
        set(r) == {"id", "status", "parsed", "raw", "error", "attempts", "input_sha"} for r in rows
    )

    # Resume: finished items are not asked again; failed ones are retried.
    server.reset_counts()
    script["never_parses"] = [("reply", "{'score': 2}")]
    script["always_500"] = [("reply", "{'score': 2}")]
    again = {r.id: r for r in judge.score_items(items, prompt, cache)}
    assert server.count() == 3
    assert {k for k in script if server.count(k)} == {"never_parses", "always_500", "bad_request"}
    assert all(again[i].cached for i in items if items[i]["Q"] in expected_ok)
    assert again["v3_0"].status == "ok" and not again["v3_0"].cached

    server.reset_counts()
    script["bad_request"] = [("reply", "{'score': 1}")]
    judge.score_items(items, prompt, cache)
    server.reset_counts()
    final = judge.score_items(items, prompt, cache)
    assert server.count() == 0 and all(r.ok and r.cached for r in final)

    # A crash mid-write leaves a torn last line: skipped, and the next record starts a
    # new line. A changed prediction is a different judge input: it is judged again.
    with cache.open("a") as f:
        f.write('{"id": "v0_0", "status": "o')
    changed = dict(items)
    changed["v0_0"] = {**items["v0_0"], "pred": "a cat"}
    judge.score_items(changed, prompt, cache)
    assert server.count() == 1 and server.count("good") == 1
    server.reset_counts()
    assert all(r.cached for r in judge.score_items(changed, prompt, cache))
    assert server.count() == 0


def test_http_judge_other_model_or_prompt_uses_other_cache(chat_server, tmp_path):
    server = chat_server({"q": [("reply", "{'score': 4}")]})
    prompts = load_prompts(PROMPTS / "videochatgpt.yaml")
    items = _items(["q"])
    a, b = _judge(server.base_url), _judge(server.base_url, model="judge-other")
    paths = {
        a.cache_path(tmp_path, "t", prompts["CI"]),
        a.cache_path(tmp_path, "t", prompts["DO"]),
        b.cache_path(tmp_path, "t", prompts["CI"]),
    }
    assert len(paths) == 3
    for judge, dim in ((a, "CI"), (a, "DO"), (b, "CI"), (a, "CI")):
        judge.score_items(items, prompts[dim], judge.cache_path(tmp_path, "t", prompts[dim]))
    assert server.count() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_http_judge_connection_refused_is_bounded(monkeypatch):
    """One item against a refused connection: its attempts, then failed (fewer than the breaker's N)."""
    monkeypatch.setenv(KEY_ENV, "k")
    judge = _judge(_dead_url(), max_retries=2)
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["TU"]
    result = judge.judge_one("q", prompt.render(_items(["q"])["v0_0"]), prompt.schema)
    assert result.status == "failed" and result.attempts == 3 and "127.0.0.1" in result.error


def _dead_url() -> str:
    """A base URL on a loopback port nothing listens on: every connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_http_judge_breaker_stops_after_n_connection_failures_and_resumes(chat_server, tmp_path):
    """The endpoint starts hanging up mid-run: exactly N requests fail, then the run stops."""
    keys = [f"q{i}" for i in range(12)]
    script = {k: [("reply", "{'score': 4}")] if i < 3 else [("close",)] for i, k in enumerate(keys)}
    server = chat_server(script)
    judge = _judge(server.base_url, concurrency=1, max_retries=5)  # N from configs/judge/openai.yaml
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["CI"]
    items, cache = _items(keys), tmp_path / "c.jsonl"
    stopped = rf"judge stopped: 5 requests in a row to {re.escape(server.base_url)} failed \(5 x no connection; "
    with pytest.raises(JudgeError, match=stopped + r".*RemoteDisconnected"):
        judge.score_items(items, prompt, cache)
    # without the breaker: 3 + 9 items x 6 attempts, each item's backoff slept in full
    assert server.count() == 3 + 5 and server.count("q3") == 5
    assert judge.max_consecutive_failures == 5
    statuses = {i: r.status for i, r in read_cache(cache).items()}
    assert statuses == {f"v{i}_0": "ok" for i in range(3)}

    server.reset_counts()
    for k in keys[3:]:
        script[k] = [("reply", "{'score': 2}")]
    results = judge.score_items(items, prompt, cache)
    assert server.count() == 9 and all(r.ok for r in results)
    assert [r.cached for r in results] == [True] * 3 + [False] * 9


def test_http_judge_dead_endpoint_stops_at_once(chat_server, tmp_path):
    """A dead endpoint is found by the preflight; one that dies after it, by the breaker."""
    url = _dead_url()
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["CI"]
    items, cache = _items([f"q{i}" for i in range(40)]), tmp_path / "c.jsonl"
    with pytest.raises(JudgeError, match=rf"judge\.base_url={re.escape(url)}: cannot reach {re.escape(url)}/models"):
        _judge(url).score_items(items, prompt, cache)

    server = chat_server({})
    # per item, retries would sleep 0.1 * (1 + 2 + 4 + 8 + 16) = 3.1 s: 40 items on 4 threads, 31 s
    judge = _judge(server.base_url, max_retries=5, backoff_base_s=0.1, backoff_jitter=0.0)
    judge.ready()
    server.httpd.shutdown()
    server.httpd.server_close()
    t0 = time.monotonic()
    stopped = rf"5 requests in a row to {re.escape(server.base_url)} failed \(5 x no connection; .*refused"
    with pytest.raises(JudgeError, match=stopped):
        judge.score_items(items, prompt, cache)
    assert time.monotonic() - t0 < 2.0
    assert read_cache(cache) == {}  # stopped items are not recorded as failed


def test_http_judge_breaker_keeps_verdicts_finished_meanwhile(chat_server, tmp_path):
    """A verdict in flight on another thread when the breaker opens is still cached."""
    script = {
        "slow": [("slow", 0.6, "{'score': 5}")],
        "gone": [("close",)],
        "later": [("reply", "{'score': 1}")],
    }
    server = chat_server(script)
    judge = _judge(server.base_url, concurrency=2, max_retries=5, timeout_s=5)
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["CI"]
    cache = tmp_path / "c.jsonl"
    with pytest.raises(JudgeError, match="5 requests in a row"):
        judge.score_items(_items(["slow", "gone", "later"]), prompt, cache)
    assert (server.count("slow"), server.count("gone"), server.count("later")) == (1, 5, 0)
    cached = read_cache(cache)
    assert list(cached) == ["v0_0"] and cached["v0_0"].parsed == {"score": 5}


# What a judge that answers but never usefully sends, every time -> the failure kind the breaker counts.
BROKEN = {
    "HTTP 502": ("status", 502, {}),
    "HTTP 429": ("status", 429, {}),
    "HTTP 400": ("status", 400, {}),
    "empty body": ("body", b""),
    "not a chat completion": ("body", b'{"choices": [{"message": {"content": "{\'score\': 4'),
    UNPARSEABLE: ("reply", "I would rather not score this answer."),
    "TimeoutError": ("slow", 2.5, "{'score': 4}"),  # past the client's timeout_s
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_http_judge_breaker_counts_every_failed_reply(kind, chat_server, tmp_path):
    """A server that answers, but never with a verdict, stops the run after N failed requests in a row."""
    keys = [f"q{i}" for i in range(20)]
    server = chat_server({k: [BROKEN[kind]] for k in keys})
    # without the breaker each item makes 6 requests, sleeping 0.2 * (1 + 2 + 4 + 8 + 16) s between
    # them when the failure is retried with backoff: 20 items on 4 threads, about 31 s
    judge = _judge(server.base_url, max_retries=5, backoff_base_s=0.2, backoff_jitter=0.0, timeout_s=1.5)
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["CI"]
    cache = tmp_path / "c.jsonl"
    t0 = time.monotonic()
    with pytest.raises(JudgeError) as info:
        judge.score_items(_items(keys), prompt, cache)
    assert time.monotonic() - t0 < 10
    message = str(info.value)
    stopped = (rf"judge stopped: 5 requests in a row to {re.escape(server.base_url)} failed "
               rf"\(5 x {re.escape(kind)}; judge\.max_consecutive_failures=5\); last: [^\n]+\. "
               r"Verdicts so far are cached: re-run once the judge answers")
    assert re.fullmatch(stopped, message), message
    assert 5 <= server.count() <= 5 + 3  # the 5 counted, and at most one in flight on each other thread
    # no verdict was lost or made up; items cut short (and a 400's failed ones) are asked again next run
    assert all(r.status == "failed" for r in read_cache(cache).values())
    assert len(read_cache(cache)) == (4 if kind == "HTTP 400" else 0)  # a 400 fails its item at once


def test_http_judge_breaker_counts_failures_of_any_kind_until_a_verdict(chat_server, tmp_path):
    """Failures of different kinds add up; a verdict in between starts the count again."""
    script = {
        "flaky_a": [("status", 502, {})] * 3 + [("reply", "{'score': 4}")],
        "flaky_b": [("body", b"")] * 3 + [("reply", "{'score': 2}")],
        "broken_a": [("status", 502, {})],
        "broken_b": [("body", b"")],
        "after": [("reply", "{'score': 1}")],
    }
    server = chat_server(script)
    judge = _judge(server.base_url, concurrency=1, max_retries=3, backoff_base_s=0.01)
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["CI"]
    cache = tmp_path / "c.jsonl"
    stopped = r"5 requests in a row to .* failed \(4 x HTTP 502, 1 x empty body; .*last: .*expected a chat completion"
    with pytest.raises(JudgeError, match=stopped):
        judge.score_items(_items(script), prompt, cache)
    assert {k: server.count(k) for k in script} == {"flaky_a": 4, "flaky_b": 4, "broken_a": 4, "broken_b": 1,
                                                    "after": 0}
    cached = read_cache(cache)
    assert {i: (r.status, r.parsed) for i, r in cached.items()} == {
        "v0_0": ("ok", {"score": 4}), "v1_0": ("ok", {"score": 2}), "v2_0": ("failed", None)}


def test_score_stage_with_every_verdict_cached_needs_no_judge(chat_server, tmp_path):
    """stage=score from a complete verdict cache: the judge's endpoint may be down, the numbers are the same."""
    from hydra import compose, initialize_config_dir

    from tc_llava.eval.__main__ import run

    from conftest import CONFIGS

    replies = {"q0": "{'pred': 'yes', 'score': 4}", "q1": "{'pred': 'no', 'score': 1}",
               "q2": "{'pred': 'yes', 'score': 5}"}
    server = chat_server({q: [("reply", r)] for q, r in replies.items()})
    run_dir = tmp_path / "run"
    records = [{"id": k, "video_name": f"v{k}", "Q": q, "A": "a", "pred": "p"} for k, q in enumerate(replies)]
    (run_dir / "predictions").mkdir(parents=True)
    (run_dir / "predictions" / "activitynet.json").write_text(json.dumps(records))

    def score(base_url):
        overrides = ["benchmark=zeroshot_qa", "benchmark.dataset=activitynet", f"benchmark.root={tmp_path}",
                     "benchmark.stage=score", f"run_dir={run_dir}", "model=pretrained",
                     f"model.checkpoint={tmp_path / 'unused'}", f"judge.base_url={base_url}",
                     "judge.api_key_env=null", "judge.model=judge-test"]
        with initialize_config_dir(str(CONFIGS), version_base=None):
            return run(compose("eval", overrides=overrides))

    first = score(server.base_url)
    assert server.count() == 3 and (first["judged"], first["accuracy"], first["mean_score"]) == (3, 2 / 3, 10 / 3)
    url = _dead_url()
    again = score(url)
    assert again["judge"]["base_url"] == url
    numbers = ("accuracy", "mean_score", "yes", "no", "judged", "failed", "failed_ids")
    assert {k: again[k] for k in numbers} == {k: first[k] for k in numbers}
    assert json.loads((run_dir / "results.json").read_text())["mean_score"] == 10 / 3
    assert server.count() == 3 and server.gets == ["/v1/models"]  # the first run's preflight only


def test_http_judge_404_names_url_and_model(chat_server, tmp_path):
    server = chat_server({"q": [("status", 404, {})]})
    judge = _judge(server.base_url, api_key_env=None)
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["CI"]
    with pytest.raises(JudgeError) as info:
        judge.score_items(_items(["q"]), prompt, tmp_path / "c.jsonl")
    message = str(info.value)
    assert f"HTTP 404 from {server.base_url}/chat/completions" in message
    assert "judge.model=judge-test" in message and "None" not in message


def test_http_judge_preflight(chat_server, monkeypatch):
    """GET /models settles it when it lists the model; otherwise one chat request decides."""
    server = chat_server({})
    _judge(server.base_url).preflight()
    assert server.gets == ["/v1/models"] and server.count() == 0  # nothing billed

    server = chat_server({"": [("reply", "ok")]}, models=None)  # no /models route: not fatal
    _judge(server.base_url).preflight()
    assert server.gets == ["/v1/models"] and server.count() == 1

    server = chat_server({"": [("status", 503, {})]}, models=None)  # up, but busy: going on
    _judge(server.base_url).preflight()

    server = chat_server({"": [("status", 404, {})]}, models=("another-model",))
    chat_url = re.escape(f"{server.base_url}/chat/completions")
    with pytest.raises(JudgeError, match=rf"HTTP 404 from {chat_url}.*judge\.model=judge-test"):
        _judge(server.base_url).preflight()

    server = chat_server({"": [("status", 400, {})]}, models=None)
    refused = r"judge\.model=judge-test: a one-line chat request was refused.*HTTP 400"
    with pytest.raises(JudgeError, match=refused):
        _judge(server.base_url).preflight()

    url = _dead_url()
    unreachable = rf"judge\.base_url={re.escape(url)}: cannot reach {re.escape(url)}/models"
    with pytest.raises(JudgeError, match=unreachable):
        _judge(url).preflight()

    server = chat_server({})
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=rf"environment variable {KEY_ENV} is not set"):
        _judge(server.base_url).preflight()
    assert server.gets == [] and server.count() == 0


def test_http_judge_auth_errors_abort(chat_server, tmp_path):
    server = chat_server({"q": [("status", 401, {})]})
    judge = _judge(server.base_url)
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["CI"]
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge.score_items(_items(["q"]), prompt, tmp_path / "c.jsonl")
    assert server.count() == 1


def test_http_judge_missing_key_names_the_variable_and_cache_needs_none(
    chat_server, tmp_path, monkeypatch
):
    server = chat_server({"q": [("reply", "{'score': 4}")]})
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["CI"]
    judge = _judge(server.base_url)
    judge.score_items(_items(["q"]), prompt, tmp_path / "c.jsonl")
    monkeypatch.delenv(KEY_ENV)
    (cached,) = judge.score_items(_items(["q"]), prompt, tmp_path / "c.jsonl")
    assert cached.cached and cached.parsed == {"score": 4}
    with pytest.raises(JudgeError, match=KEY_ENV):
        judge.score_items(_items(["q", "new"]), prompt, tmp_path / "c.jsonl")
    assert server.count() == 1


def test_retry_delay_backoff_and_retry_after_cap(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    judge = OpenAIJudge(
        api_key_env=KEY_ENV, backoff_base_s=0.5, backoff_max_s=3.0, backoff_jitter=0.0
    )
    assert [judge.retry_delay(k, None) for k in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    assert judge.retry_delay(1, 2.5) == 2.5
    assert judge.retry_delay(1, 3600) == 3.0


def test_retry_after_header_forms():
    assert _retry_after_seconds({"retry-after": "2"}) == 2.0
    assert _retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < _retry_after_seconds({"retry-after": soon}) <= 30
    assert (
        _retry_after_seconds({"retry-after": "soon"}) is None and _retry_after_seconds(None) is None
    )


def test_run_scoring_records_judge_and_prompts(chat_server, tmp_path):
    def key_of(body):
        system = body["messages"][0]["content"]
        for dim, marker in (
            ("CI", "factual accuracy"),
            ("DO", "detail orientation"),
            ("CU", "contextual"),
            ("TU", "temporal understanding"),
            ("CO", "consistency of"),
            ("qa", "meaningfully"),
        ):
            if marker in system:
                return dim
        return "?"

    score = {"CI": 4, "DO": 3, "CU": 5, "TU": 2, "CO": 1}
    script = {d: [("reply", f"{{'score': {s}}}")] for d, s in score.items()}
    script["qa"] = [("reply", "{'pred': 'yes', 'score': 4}")]
    server = chat_server(script, key_of)
    judge = _judge(server.base_url)
    generic = [
        {"video_name": "v1", "Q": "q", "A": "a", "pred": "p"},
        {"video_name": "v1", "Q": "q2", "A": "a", "pred": "p"},
    ]
    consistency = [
        {"video_name": "v2", "Q1": "q", "Q2": "q'", "A": "a", "pred1": "p", "pred2": "p'"}
    ]
    paths = {}
    for name, records in (
        ("generic", generic),
        ("temporal", generic[:1]),
        ("consistency", consistency),
    ):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(records))
    out = run_videochatgpt(judge, paths, tmp_path / "cache", tmp_path / "vcg.json")
    assert json.loads((tmp_path / "vcg.json").read_text()) == json.loads(json.dumps(out))
    assert out["judge"] == {
        "type": "openai",
        "model": "judge-test",
        "base_url": server.base_url,
        "temperature": 0.0,
        "max_tokens": 64,
    }
    assert out["prompts"]["sha"]["CI"] == "cb9b2008ce"
    assert {d: v["mean_score"] for d, v in out["dimensions"].items()} == score
    assert out["mean_of_dimensions"] == pytest.approx(3.0)
    assert out["item_weighted_mean"] == pytest.approx((4 * 2 + 3 * 2 + 5 * 2 + 2 + 1) / 8)
    assert server.count() == 8

    qa = run_zeroshot_qa(judge, paths["generic"], tmp_path / "cache", "msvd")
    assert (qa["accuracy"], qa["mean_score"], qa["judged"], qa["failed"]) == (1.0, 4.0, 2, 0)
    assert qa["judge"]["model"] == "judge-test" and qa["prompts"]["sha"] == {"qa": "94066a7c94"}
    assert Path(qa["cache"]).name.startswith("zeroshot_msvd.judge-test.94066a7c94")


# --------------------------------------------------------------------------- local judge


@pytest.fixture(scope="module")
def tiny_judge_path(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tc_llava.model.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("tiny_judge")
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_judge_garbage_is_failed_not_hung(tiny_judge_path, tmp_path):
    from hydra.utils import instantiate

    cfg = OmegaConf.load(CONFIG_DIR / "judge" / "local.yaml")
    cfg.merge_with({"model_path": str(tiny_judge_path), "max_new_tokens": 8})
    judge = instantiate(cfg)
    assert isinstance(judge, LocalJudge) and judge.describe()["model"] == tiny_judge_path.name
    prompt = load_prompts(PROMPTS / "videochatgpt.yaml")["CO"]
    items = {
        f"v{i}_0": {
            "video_name": f"v{i}",
            "Q1": "q",
            "Q2": "q",
            "A": "a",
            "pred1": "p",
            "pred2": str(i),
        }
        for i in range(3)
    }
    cache = judge.cache_path(tmp_path, "videochatgpt_CO", prompt)
    results = judge.score_items(items, prompt, cache)
    assert [r.status for r in results] == ["failed"] * 3
    assert all(
        isinstance(r.raw, str) and r.attempts == 1 and "unparseable" in r.error for r in results
    )
    assert summarize_videochatgpt({"CO": results})["dimensions"]["CO"] == {
        "mean_score": None,
        "judged": 0,
        "failed": 3,
        "failed_ids": list(items),
    }
    assert len(read_cache(cache)) == 3
    assert judge.prompt_text(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    ) == ("system: S\nuser: U\nassistant:")


def test_local_judge_checks_its_path_and_loads_on_first_use(tiny_judge_path, tmp_path):
    """The eval app builds the judge before generating: that must cost no weights."""
    judge = LocalJudge(str(tiny_judge_path))
    assert "lm" not in vars(judge) and "tokenizer" not in vars(judge)
    with pytest.raises(JudgeError, match=rf"judge\.model_path={tmp_path}: no config\.json there"):
        LocalJudge(str(tmp_path))


def test_local_judge_scripted_generation_is_parsed(tiny_judge_path, tmp_path, monkeypatch):
    import torch

    judge = LocalJudge(str(tiny_judge_path), max_new_tokens=16)
    judge.tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    seen = []

    def scripted_generate(input_ids, **kwargs):
        seen.append(judge.tokenizer.decode(input_ids[0]))
        reply = judge.tokenizer(
            "{'pred': 'yes', 'score': 4}", add_special_tokens=False, return_tensors="pt"
        )
        return torch.cat([input_ids, reply["input_ids"]], dim=1)

    monkeypatch.setattr(judge.lm, "generate", scripted_generate)
    prompt = load_prompts(PROMPTS / "zeroshot_qa.yaml")["qa"]
    items = index_items([{"video_name": "v", "Q": "q", "A": "a", "pred": "p"}] * 2)
    results = judge.score_items(items, prompt, tmp_path / "c.jsonl")
    assert [r.parsed for r in results] == [{"pred": "yes", "score": 4}] * 2
    assert seen[0].startswith("<|im_start|>system\nYou are an intelligent chatbot")
    assert seen[0].endswith("<|im_start|>assistant\n")
    summary = summarize_zeroshot_qa(results)
    assert (summary["accuracy"], summary["mean_score"], summary["failed"]) == (1.0, 4.0, 0)


# --------------------------------------------------------------------------- scoring


def _results(dim, scores, failed=0, preds=None):
    out = [
        JudgeResult(
            f"{dim}{i}",
            "ok",
            {"score": s, **({"pred": preds[i]} if preds else {})},
            "",
            None,
            1,
            "",
        )
        for i, s in enumerate(scores)
    ]
    return out + [
        JudgeResult(f"{dim}x{i}", "failed", None, "junk", "unparseable", 3, "")
        for i in range(failed)
    ]


def test_summarize_videochatgpt_hand_computed():
    results = {
        "CI": _results("CI", [5, 3, 4], failed=1),
        "DO": _results("DO", [2, 3]),
        "CU": _results("CU", [4]),
        "TU": _results("TU", [1, 2, 3, 2]),
        "CO": _results("CO", [3, 3], failed=1),
    }
    out = summarize_videochatgpt(results)
    assert {d: v["mean_score"] for d, v in out["dimensions"].items()} == {
        "CI": 4.0,
        "DO": 2.5,
        "CU": 4.0,
        "TU": 2.0,
        "CO": 3.0,
    }
    assert out["dimensions"]["CI"] == {
        "mean_score": 4.0,
        "judged": 3,
        "failed": 1,
        "failed_ids": ["CIx0"],
    }
    assert out["mean_of_dimensions"] == pytest.approx(15.5 / 5)
    assert out["item_weighted_mean"] == pytest.approx(35 / 12)
    assert (out["judged"], out["failed"]) == (12, 2)
    partial = summarize_videochatgpt({k: v for k, v in results.items() if k != "CO"})
    assert partial["mean_of_dimensions"] is None and partial["item_weighted_mean"] == pytest.approx(
        29 / 10
    )


def test_summarize_zeroshot_qa_hand_computed():
    results = _results("q", [5, 4, 1, 2, 3], failed=1, preds=["yes", "yes", "no", "no", "yes"])
    out = summarize_zeroshot_qa(results)
    assert (out["accuracy"], out["yes"], out["no"]) == (0.6, 3, 2)
    assert (out["mean_score"], out["judged"], out["failed"]) == (3.0, 5, 1)
    assert summarize_zeroshot_qa([])["accuracy"] is None


def test_predictions_loading_and_ids(tmp_path):
    records = [
        {"video_name": "v1", "Q": "a"},
        {"video_name": "v2", "Q": "b"},
        {"video_name": "v1", "Q": "c"},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    loaded = load_predictions(tmp_path / "p.jsonl", ["video_name", "Q"])
    assert list(index_items(loaded)) == ["v1_0", "v2_0", "v1_1"]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"bad\.json: record 0 lacks field\(s\) \['pred'\]"):
        load_predictions(tmp_path / "bad.json", ["video_name", "Q", "pred"])


def test_prompt_template_hash_changes_with_text():
    a = PromptTemplate("x", "sys", "Q: {Q}", ("score",))
    assert a.sha != PromptTemplate("x", "sys ", "Q: {Q}", ("score",)).sha
    assert a.sha != PromptTemplate("x", "sys", "Q: {Q}", ("pred", "score")).sha
