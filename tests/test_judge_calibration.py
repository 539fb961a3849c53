"""The judge that exists: the default config names the pinned open model, the OpenAI config a current
model that is asked the way reasoning models must be asked and a retired one fails fast, every
result records which weights judged, and ``stage=calibrate`` gives hand-computed agreement.

The servers are real ``http.server`` instances on 127.0.0.1 speaking OpenAI's chat-completions
protocol, with OpenAI's own "model_not_found" answer for a model they do not serve.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tc_llava.eval import calibrate
from tc_llava.eval.__main__ import run
from tc_llava.eval.judge import JudgeError, JudgeResult, LocalJudge, OpenAIJudge
from tc_llava.provenance import model_hash

from conftest import CONFIGS

QWEN, QWEN_REVISION = "Qwen/Qwen2.5-7B-Instruct", "a09a35458c702b33eeacc393d103063234e8bc28"
pytestmark = pytest.mark.timeout(120)


class OpenAILike:
    """Serves ``models``; a chat request for another model gets OpenAI's 404 ``model_not_found``.

    Replies ``{'pred': ..., 'score': ...}`` from ``verdicts`` keyed by the prediction in the prompt.
    """

    def __init__(self, models: tuple[str, ...], verdicts: dict[str, str]):
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                if body["model"] not in models:
                    return self._send(404, {"error": {
                        "message": f"The model `{body['model']}` does not exist or you do not have access to it.",
                        "type": "invalid_request_error", "param": None, "code": "model_not_found"}})
                user = body["messages"][-1]["content"]
                reply = next((v for k, v in verdicts.items() if f"Predicted Answer: {k}" in user), "{'score': 0}")
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    started = []

    def start(models, verdicts=None):
        started.append(OpenAILike(models, verdicts or {}))
        return started[-1]

    yield start
    for s in started:
        s.close()


def _compose(*overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return compose("eval", overrides=list(overrides))


def test_the_default_judge_is_the_pinned_open_model():
    judge = instantiate(_compose().judge)
    assert isinstance(judge, OpenAIJudge) and judge.model == QWEN and judge.revision == QWEN_REVISION
    assert judge.base_url == "http://127.0.0.1:8000/v1" and judge.api_key_env is None
    assert judge.provenance() == {"model": QWEN, "revision": QWEN_REVISION, "weights_sha256": None,
                                  "endpoint": "openai-compatible", "base_url": "http://127.0.0.1:8000/v1"}
    local = _compose("judge=local").judge
    assert (local.model_id, local.revision) == (QWEN, QWEN_REVISION)
    assert local.model_path.endswith("/Qwen2.5-7B-Instruct")
    assert _compose("judge=openai").judge.model == "gpt-5.6-terra"


def test_local_judge_records_its_weights_and_refuses_another_snapshot(tiny_llama, tmp_path):
    judge = LocalJudge(str(tiny_llama), model_id=QWEN, revision=QWEN_REVISION)
    record = judge.provenance()
    assert record["model"] == QWEN and record["endpoint"] == "local-transformers"
    assert record["weights_sha256"] == model_hash(tiny_llama)["sha256"] and len(record["weights_sha256"]) == 64
    snapshot = tmp_path / "models--Qwen--Qwen2.5-7B-Instruct" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    with pytest.raises(JudgeError, match=rf"judge\.revision={QWEN_REVISION}: .* is the hub snapshot 0{{40}}"):
        LocalJudge(str(snapshot), revision=QWEN_REVISION)


def test_openai_config_asks_a_current_model_and_a_retired_one_fails_fast(server_factory, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = server_factory(("gpt-5.6-terra",), {"": "{'score': 3}"})
    current = instantiate(_compose("judge=openai", f"judge.base_url={server.base_url}").judge)
    current.preflight()
    assert current.complete([{"role": "user", "content": "Predicted Answer: x"}]) == "{'score': 3}"
    body = server.bodies[-1]
    assert body["max_completion_tokens"] == 64 and "max_tokens" not in body  # reasoning models refuse max_tokens

    retired = instantiate(_compose("judge=openai", f"judge.base_url={server.base_url}",
                                   "judge.model=gpt-3.5-turbo-0125").judge)
    with pytest.raises(JudgeError) as info:
        retired.preflight()
    message = str(info.value)
    assert "model not found: judge.model=gpt-3.5-turbo-0125 is retired, renamed or not served" in message
    assert "judge=served or judge=local" in message and "model_not_found" in message


# --------------------------------------------------------------------------- calibration

def test_agreement_by_hand():
    judge = {"a": {"score": 4, "pred": "yes"}, "b": {"score": 3, "pred": "no"}, "c": {"score": 5, "pred": "yes"},
             "d": {"score": 2, "pred": "yes"}, "only_judge": {"score": 1, "pred": "no"}}
    reference = {"a": {"score": 3, "pred": "yes"}, "b": {"score": 3, "pred": "yes"}, "c": {"score": 4, "pred": "yes"},
                 "d": {"score": 0, "pred": "no"}}
    out = calibrate.agreement(judge, reference)
    # scores 4,3,5,2 vs 3,3,4,0: means 3.5 / 2.5, shift 1.0; deviations (.5,-.5,1.5,-1.5) and (.5,.5,1.5,-2.5):
    # sxy = 6, sxx = 5, syy = 9 -> r = 6 / sqrt(45); same score 1/4, within one point 3/4
    assert (out["n"], out["only_judge"], out["only_reference"]) == (4, 1, 0)
    assert (out["mean_judge"], out["mean_reference"], out["mean_shift"]) == (3.5, 2.5, 1.0)
    assert out["score_correlation"] == pytest.approx(6 / 45 ** 0.5)
    assert (out["exact_score_agreement"], out["within_one_agreement"]) == (0.25, 0.75)
    # yes/no: yes,no,yes,yes vs yes,yes,yes,no -> same on a and c: 2/4; both accuracies 3/4
    assert (out["accuracy_agreement"], out["accuracy_judge"], out["accuracy_reference"], out["accuracy_shift"]) == (
        0.5, 0.75, 0.75, 0.0)


def test_reference_formats_and_errors(tmp_path):
    upstream = tmp_path / "gpt35.json"  # Video-ChatGPT's combined files: {id: [verdict, qa]}
    upstream.write_text(json.dumps({"CI": {"v_0": [{"score": 4}, {"q": "?", "a": "!", "pred": "."}]}}))
    assert calibrate.load_reference(upstream) == {"CI": {"v_0": {"score": 4}}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"CI": {"v_0": {"verdict": 4}}}))
    with pytest.raises(ValueError, match=r"CI item\(s\) \['v_0'\] carry no verdict with a 'score'"):
        calibrate.load_reference(bad)
    with pytest.raises(FileNotFoundError, match="benchmark.calibrate.reference=.*missing.json not found"):
        calibrate.load_reference(tmp_path / "missing.json")


def test_calibrate_stage_end_to_end(server_factory, tmp_path, monkeypatch):
    """Saved zero-shot QA predictions, an open judge served over HTTP, a file of old verdicts: the eval app
    re-scores without the model and writes the agreement."""
    from tc_llava.eval import __main__ as app

    monkeypatch.setattr(app, "model_from_config", lambda cfg: pytest.fail("calibration loads no model"))
    run_dir = tmp_path / "run"
    preds = [{"id": k, "video_name": f"v{k}", "Q": "What?", "A": "a dog", "pred": p}
             for k, p in enumerate(["a dog", "a cat", "a dog running", "nothing"])]
    (run_dir / "predictions").mkdir(parents=True)
    (run_dir / "predictions" / "msvd.json").write_text(json.dumps(preds))
    server = server_factory((QWEN,), {"a dog running": "{'pred': 'yes', 'score': 4}", "a dog": "{'pred': 'yes', 'score': 5}",
                                      "a cat": "{'pred': 'no', 'score': 1}", "nothing": "{'pred': 'no', 'score': 0}"})
    reference = tmp_path / "old_gpt35.json"
    reference.write_text(json.dumps({"msvd": {"v0_0": {"pred": "yes", "score": 5}, "v1_0": {"pred": "yes", "score": 3},
                                              "v2_0": {"pred": "yes", "score": 4}, "v3_0": {"pred": "no", "score": 1}}}))
    cfg = _compose("benchmark=zeroshot_qa", f"benchmark.root={tmp_path}", f"run_dir={run_dir}", "benchmark.stage=calibrate",
                   f"benchmark.calibrate.reference={reference}", f"judge.base_url={server.base_url}")
    report = run(cfg)
    d = report["dimensions"]["msvd"]
    # open judge 5,1,4,0 (yes,no,yes,no) vs old 5,3,4,1 (yes,yes,yes,no): shift -0.75, same score 2/4,
    # within one 3/4, same yes/no 3/4, accuracy 0.5 vs 0.75
    assert d["n"] == 4 and d["mean_shift"] == -0.75
    assert (d["exact_score_agreement"], d["within_one_agreement"], d["accuracy_agreement"]) == (0.5, 0.75, 0.75)
    assert (d["accuracy_judge"], d["accuracy_reference"]) == (0.5, 0.75)
    assert report["judge_provenance"]["model"] == QWEN and report["judge_provenance"]["revision"] == QWEN_REVISION
    saved = json.loads((run_dir / "calibration.json").read_text())
    assert saved["dimensions"]["msvd"]["mean_shift"] == -0.75
    assert "| msvd | 4 | 2.50 | 3.25 | -0.75 |" in (run_dir / "calibration.md").read_text()
    # the old verdicts as another run's results.json: the same agreement, read through its judge cache
    old_cache = tmp_path / "old" / "judge" / "zeroshot_msvd.gpt-3.5.jsonl"
    old_cache.parent.mkdir(parents=True)
    old_cache.write_text("".join(json.dumps(JudgeResult(i, "ok", v, "raw", None, 1, "x").to_record()) + "\n"
                                 for i, v in json.loads(reference.read_text())["msvd"].items()))
    (tmp_path / "old" / "results.json").write_text(json.dumps({"judge": {"model": "gpt-3.5-turbo-0125"},
                                                               "dataset": "msvd", "cache": str(old_cache)}))
    ours = {"judge": report["judge"], "dataset": "msvd",
            "cache": str(next((run_dir / "judge").glob("zeroshot_msvd.*.jsonl")))}
    again = calibrate.calibrate(ours, tmp_path / "old" / "results.json")
    assert again["dimensions"]["msvd"] == d
