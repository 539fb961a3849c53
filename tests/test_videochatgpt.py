"""VideoChatGPT benchmark and zero-shot QA: the Hydra app end to end, judged over real HTTP.

Each test builds the benchmark's directory layout with real videos (H.264 in mp4 and mkv,
a corrupt mp4, a video_name with no file), generates with the tiny Llama LLaVA whose LLM
is re-drawn at a larger scale (so answers depend on the input), and scores through a
chat-completions server on 127.0.0.1 (``ChatServer`` of test_judge) scripted per
dimension and question. Scores are checked against hand computation from the script;
resume is checked by counting ``TCLlava.generate`` calls and the requests the server saw.
What fails without a model (paths, the judge's key, endpoint and model) must fail before the
model builder runs, and a scoring that judges nothing must fail without touching earlier results.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tc_llava.eval import __main__ as app
from tc_llava.eval import judged, videochatgpt, zeroshot_qa
from tc_llava.eval.__main__ import run
from tc_llava.eval.judge import JudgeError
from tc_llava.model.tc_llava import TCLlava

from conftest import CONFIGS, REPO
from test_judge import KEY_ENV, _dead_url, chat_server  # noqa: F401  (the scripted 127.0.0.1 server fixture)

pytestmark = pytest.mark.timeout(300)

FPS, SIZE = 8, 64
MARKERS = {  # a phrase of each judge system prompt
    "CI": "factual accuracy", "DO": "detail orientation", "CU": "contextual", "TU": "temporal understanding",
    "CO": "consistency of", "qa": "meaningfully",
}
MALFORMED = "I would rate it three out of five."


def _write_video(path: Path, seed: int, frames: int = 24) -> None:
    """Blocky random colours changing every frame: cheap to encode, different per video."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = np.random.default_rng(seed).integers(0, 256, (frames, 4, 4, 3), dtype=np.uint8)
    pixels = blocks.repeat(SIZE // 4, 1).repeat(SIZE // 4, 2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _key(body: dict) -> str:
    """``{dimension}:{question}`` of a judge request, from its system and user messages."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    dim = next((d for d, marker in MARKERS.items() if marker in system), "?")
    match = re.search(r"^Question(?: 1)?: (.*)$", user, re.M)
    return f"{dim}:{match[1] if match else ''}"


@pytest.fixture
def generated(monkeypatch) -> list[int]:
    """Batch sizes of every ``TCLlava.generate`` call."""
    calls: list[int] = []
    original = TCLlava.generate

    def counting(self, input_ids, *args, **kwargs):
        calls.append(len(input_ids))
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(TCLlava, "generate", counting)
    return calls


def _overrides(benchmark: str, root: Path, model: Path, run_dir: Path, base_url: str, *extra: str) -> list[str]:
    return [
        f"benchmark={benchmark}", f"benchmark.root={root}", f"run_dir={run_dir}",
        "model=pretrained", f"model.checkpoint={model}", "model.dtype=float32",
        "benchmark.num_frames=4", "benchmark.max_new_tokens=6", "benchmark.batch_size=3",
        "benchmark.decode.num_workers=0",
        f"judge.base_url={base_url}", "judge.api_key_env=null", "judge.model=judge-a", "judge.max_retries=1",
        "judge.backoff_base_s=0.01", "judge.timeout_s=10", "judge.concurrency=4", *extra,
    ]


def _compose(*overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return compose("eval", overrides=list(overrides))


def _evaluate(benchmark: str, root: Path, model: Path, run_dir: Path, base_url: str, *extra: str):
    return run(_compose(*_overrides(benchmark, root, model, run_dir, base_url, *extra)))


@pytest.fixture
def no_model(monkeypatch):
    """The model builder fails the test: the checks under test must come before it."""
    monkeypatch.setattr(app, "model_from_config", lambda cfg: pytest.fail("the model was built before the check"))


# --------------------------------------------------------------------------- VideoChatGPT

GENERIC = [("vA", "g0"), ("vB", "g1"), ("vA", "g2"), ("vMissing", "g3")]
TEMPORAL = [("vB", "t0"), ("vBroken", "t1"), ("vA", "t2")]
CONSISTENCY = [("vA", "c0a", "c0b"), ("vB", "c1a", "c1b")]
# dimension -> question -> score (None: a reply that never parses)
SCORES = {
    "CI": {"g0": 4, "g1": 2, "g2": 5},
    "DO": {"g0": 3, "g1": 3, "g2": None},
    "CU": {"g0": 1, "g1": 5, "g2": 0},
    "TU": {"t0": 2, "t2": 4},
    "CO": {"c0a": 3, "c1a": 1},
}


def _vcg_script() -> dict:
    return {f"{dim}:{q}": [("reply", MALFORMED if s is None else f"{{'score': {s}}}")]
            for dim, scores in SCORES.items() for q, s in scores.items()}


@pytest.fixture(scope="module")
def vcg_root(tmp_path_factory) -> Path:
    """The public VCGBench layout: vA as mp4 (and a decoy mkv), vB only as mkv, a corrupt vBroken.mp4."""
    root = tmp_path_factory.mktemp("VCGBench")
    videos = root / "Test_Videos"
    _write_video(videos / "vA.mp4", 0)
    _write_video(videos / "vA.mkv", 1)
    _write_video(videos / "vB.mkv", 2, frames=16)
    (videos / "vBroken.mp4").write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    qa = root / "Benchmarking_QA"
    qa.mkdir()
    (qa / "generic_qa.json").write_text(json.dumps(
        [{"video_name": v, "Q": q, "A": f"answer {q}"} for v, q in GENERIC]))
    (qa / "temporal_qa.json").write_text(json.dumps(
        [{"video_name": v, "Q": q, "A": f"answer {q}"} for v, q in TEMPORAL]))
    (qa / "consistency_qa.json").write_text(json.dumps(
        [{"video_name": v, "Q1": q1, "Q2": q2, "A": f"answer {q1}"} for v, q1, q2 in CONSISTENCY]))
    return root


def test_entries_lookup_and_prompts(vcg_root, tiny_llama):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=["benchmark=videochatgpt", f"benchmark.root={vcg_root}"]).benchmark
    entries = {(e.split, e.index): e for e in videochatgpt.load_entries(cfg)}
    assert len(entries) == len(GENERIC) + len(TEMPORAL) + len(CONSISTENCY)
    videos = vcg_root / "Test_Videos"
    assert entries["generic", 0].video == videos / "vA.mp4"  # .mp4 is tried before .mkv
    assert entries["generic", 1].video == videos / "vB.mkv"
    missing = entries["generic", 3]
    assert missing.video is None and missing.tried == tuple(str(videos / f"vMissing{x}")
                                                            for x in (".mp4", ".avi", ".mov", ".mkv"))
    consistency = entries["consistency", 1]
    assert consistency.questions == {"pred1": "c1a", "pred2": "c1b"}
    assert entries["temporal", 2].questions == {"pred": "t2"}

    model = TCLlava.from_pretrained(tiny_llama)
    prompt = judged.prompt_text(cfg, "c1b", judged.image_token_of(model.tokenizer))
    assert prompt == (
        "You are Video-ChatGPT, a large vision-language assistant. You are able to understand the video content "
        "that the user provides, and assist the user with a variety of tasks using natural language.Follow the "
        "instructions carefully and explain your answers in detail based on the provided video. "
        "USER: <image>\nc1b ASSISTANT:"
    )


def test_bad_records_name_the_file_and_field(tmp_path):
    qa = tmp_path / "Benchmarking_QA"
    qa.mkdir()
    (qa / "generic_qa.json").write_text(json.dumps([{"video_name": "v", "Q": "q", "A": "a"}, {"video_name": "v"}]))
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=["benchmark=videochatgpt", f"benchmark.root={tmp_path}",
                                         "benchmark.splits={generic: generic_qa.json}"]).benchmark
    with pytest.raises(ValueError, match=r"generic_qa\.json record 1: field 'A' must be a string, got None"):
        videochatgpt.load_entries(cfg)
    cfg.splits = {"temporal": "absent.json"}
    with pytest.raises(FileNotFoundError, match=r"Benchmarking_QA/absent\.json not found"):
        videochatgpt.load_entries(cfg)
    cfg.stage = "judge"
    with pytest.raises(ValueError, match=r"benchmark\.stage must be one of"):
        judged.check_stage(cfg)


def test_videochatgpt_end_to_end(vcg_root, lively, tmp_path, chat_server, generated, monkeypatch):
    chat = chat_server(_vcg_script(), _key)
    run_dir = tmp_path / "run"

    # generate only: prediction files in the upstream format, nothing judged
    meta = _evaluate("videochatgpt", vcg_root, lively, run_dir, chat.base_url, "benchmark.stage=generate")
    assert chat.count() == 0 and not (run_dir / "results.json").exists()
    assert sum(generated) == 3 + 2 + 2 * 2  # decodable records; consistency asks twice
    preds = {s: json.loads((run_dir / "predictions" / f"{s}.json").read_text())
             for s in ("generic", "temporal", "consistency")}
    assert [r["Q"] for r in preds["generic"]] == ["g0", "g1", "g2"]
    assert all(set(r) == {"video_name", "Q", "A", "pred"} and isinstance(r["pred"], str) for r in preds["generic"])
    assert [r["Q"] for r in preds["temporal"]] == ["t0", "t2"]
    assert all(set(r) == {"video_name", "Q1", "Q2", "A", "pred1", "pred2"} for r in preds["consistency"])
    outputs = [r["pred"] for r in preds["generic"] + preds["temporal"]]
    outputs += [r[p] for r in preds["consistency"] for p in ("pred1", "pred2")]
    assert len(set(outputs)) > 1, "the model answers everything alike"
    assert meta["counts"] == {"generic": {"records": 4, "predicted": 3, "failed": 1},
                              "temporal": {"records": 3, "predicted": 2, "failed": 1},
                              "consistency": {"records": 2, "predicted": 2, "failed": 0}}
    reasons = {f["video_name"]: f["reason"] for f in meta["failed_items"]}
    assert set(reasons) == {"vMissing", "vBroken"}
    assert str(vcg_root / "Test_Videos" / "vMissing.mkv") in reasons["vMissing"]
    assert str(vcg_root / "Test_Videos" / "vBroken.mp4") in reasons["vBroken"]

    # all: nothing generated again; every item judged once, the malformed one 1 + max_retries times
    generated.clear()
    results = _evaluate("videochatgpt", vcg_root, lively, run_dir, chat.base_url)
    assert generated == []
    assert chat.count() == 13 + 1 and chat.count("DO:g2") == 2
    expected = {dim: [s for s in scores.values() if s is not None] for dim, scores in SCORES.items()}
    for dim, scores in expected.items():
        d = results["dimensions"][dim]
        assert d["mean_score"] == pytest.approx(sum(scores) / len(scores)), dim
        assert (d["judged"], d["failed"]) == (len(scores), dim == "DO"), dim
    assert results["dimensions"]["DO"]["failed_ids"] == ["vA_1"]  # g2 is vA's second generic record
    assert results["mean_of_dimensions"] == pytest.approx((11 / 3 + 3 + 2 + 3 + 2) / 5)
    assert results["item_weighted_mean"] == pytest.approx(33 / 12)
    assert (results["judged"], results["failed"]) == (12, 1)
    assert results["judge"]["model"] == "judge-a" and results["judge"]["base_url"] == chat.base_url
    assert results["prompts"]["sha"]["CI"] == "cb9b2008ce"
    assert results["generation"]["counts"] == meta["counts"]
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    table = (run_dir / "results.md").read_text()
    assert "| Correctness of Information (CI) | 3.67 | 3 | 0 |" in table
    assert "| Detail Orientation (DO) | 3.00 | 2 | 1 |" in table and "judge-a" in table

    # again: no generation, and only the failed verdict is asked for
    chat.reset_counts()
    again = _evaluate("videochatgpt", vcg_root, lively, run_dir, chat.base_url)
    assert generated == [] and chat.count() == chat.count("DO:g2") == 2
    assert again["dimensions"] == results["dimensions"]

    # re-score with another judge, without a model: its own cache files, every item asked
    chat.reset_counts()
    monkeypatch.setattr(app, "model_from_config", lambda cfg: pytest.fail("stage=score must not build the model"))
    before = {p.name: p.read_bytes() for p in (run_dir / "judge").iterdir()}
    other = _evaluate("videochatgpt", vcg_root, lively, run_dir, chat.base_url, "benchmark.stage=score",
                      "judge.model=judge-b")
    assert chat.count() == 14 and other["judge"]["model"] == "judge-b"
    assert {d: v["mean_score"] for d, v in other["dimensions"].items()} == {
        d: v["mean_score"] for d, v in results["dimensions"].items()}
    after = {p.name: p.read_bytes() for p in (run_dir / "judge").iterdir()}
    assert {n: b for n, b in after.items() if n in before} == before  # judge-a's caches untouched
    new = sorted(set(after) - set(before))
    assert len(new) == 5 and all(".judge-b." in n for n in new)
    assert all(".judge-a." in n for n in before)


def test_score_stage_without_predictions_says_what_to_run(vcg_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"generic\.json not found: benchmark\.stage=score"):
        _evaluate("videochatgpt", vcg_root, Path("unused"), tmp_path / "empty", "http://127.0.0.1:9/v1",
                  "benchmark.stage=score")


# --------------------------------------------------------------------------- zero-shot QA

QA = [  # (video_name, question, answer, judge reply)
    ("abc", "qa0", "dog", "{'pred': 'yes', 'score': 4}"),
    ("abc", "qa1", "two", "{'pred': 'no', 'score': 2}"),
    ("xyz", "qa2", "red", "{'pred': 'yes', 'score': 5}"),
    ("gone", "qa3", "cat", "{'pred': 'yes', 'score': 5}"),
    ("xyz", "qa4", "run", MALFORMED),
]


@pytest.fixture(scope="module")
def anet_root(tmp_path_factory) -> Path:
    """PLLaVA's ActivityNet-QA layout: test_q/test_a pairs, videos named v_<video_name>.mp4."""
    root = tmp_path_factory.mktemp("VideoQA")
    _write_video(root / "ActivityNet" / "all_test" / "v_abc.mp4", 10)
    _write_video(root / "ActivityNet" / "all_test" / "v_xyz.mp4", 11)
    (root / "ActivityNet" / "test_q.json").write_text(json.dumps(
        [{"video_name": v, "question": q, "question_id": f"{v}_{k}"} for k, (v, q, _, _) in enumerate(QA)]))
    (root / "ActivityNet" / "test_a.json").write_text(json.dumps(
        [{"answer": a, "type": 3, "question_id": f"{v}_{k}"} for k, (v, _, a, _) in enumerate(QA)]))
    return root


def test_zeroshot_qa_end_to_end(anet_root, lively, tmp_path, chat_server, generated):
    chat = chat_server({f"qa:{q}": [("reply", reply)] for _, q, _, reply in QA}, _key)
    run_dir = tmp_path / "anet"
    results = _evaluate("zeroshot_qa", anet_root, lively, run_dir, chat.base_url, "benchmark.dataset=activitynet")
    assert sum(generated) == 4
    preds = json.loads((run_dir / "predictions" / "activitynet.json").read_text())
    assert [p["id"] for p in preds] == ["abc_0", "abc_1", "xyz_2", "xyz_4"]
    assert all(set(p) == {"id", "video_name", "Q", "A", "pred", "type"} for p in preds)
    assert [(p["video_name"], p["Q"], p["A"]) for p in preds] == [(v, q, a) for v, q, a, _ in QA if v != "gone"]
    (failed,) = results["generation"]["failed_items"]
    assert failed["video_name"] == "gone"
    assert str(anet_root / "ActivityNet" / "all_test" / "v_gone.mp4") in failed["reason"]

    assert (results["yes"], results["no"]) == (2, 1)
    assert results["accuracy"] == pytest.approx(2 / 3)
    assert results["mean_score"] == pytest.approx((4 + 2 + 5) / 3)
    assert (results["judged"], results["failed"], results["failed_ids"]) == (3, 1, ["xyz_1"])
    assert results["dataset"] == "activitynet" and results["judge"]["model"] == "judge-a"
    assert chat.count() == 3 + 2
    table = (run_dir / "results.md").read_text()
    assert "| activitynet | 66.7 | 3.67 | 2 | 1 | 3 | 1 |" in table
    assert run_dir.name == "anet" and json.loads((run_dir / "results.json").read_text())["accuracy"] == 2 / 3

    generated.clear()
    chat.reset_counts()
    again = _evaluate("zeroshot_qa", anet_root, lively, run_dir, chat.base_url, "benchmark.dataset=activitynet")
    assert generated == [] and chat.count() == chat.count("qa:qa4") == 2
    assert again["accuracy"] == results["accuracy"]


def test_zeroshot_qa_pairs_questions_and_answers_by_position(anet_root, tmp_path):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=["benchmark=zeroshot_qa", "benchmark.dataset=activitynet",
                                         f"benchmark.root={anet_root}"]).benchmark
    assert cfg.name == "zeroshot_qa_activitynet"
    entries = zeroshot_qa.load_entries(cfg)
    assert [e.record["id"] for e in entries] == [f"{v}_{k}" for k, (v, *_) in enumerate(QA)]
    assert entries[0].video == anet_root / "ActivityNet" / "all_test" / "v_abc.mp4"

    answers = json.loads((anet_root / "ActivityNet" / "test_a.json").read_text())
    (tmp_path / "ActivityNet").mkdir()
    (tmp_path / "ActivityNet" / "test_q.json").write_text((anet_root / "ActivityNet" / "test_q.json").read_text())
    (tmp_path / "ActivityNet" / "test_a.json").write_text(json.dumps(answers[1:] + answers[:1]))
    cfg.root = str(tmp_path)
    with pytest.raises(ValueError, match=r"test_a\.json record 0: question_id 'abc_1' differs"):
        zeroshot_qa.load_entries(cfg)
    (tmp_path / "ActivityNet" / "test_a.json").write_text(json.dumps(answers[:2]))
    with pytest.raises(ValueError, match=r"2 answers for the 5 questions"):
        zeroshot_qa.load_entries(cfg)
    # one list carrying questions and answers, with no question_id
    (tmp_path / "ActivityNet" / "test_q.json").write_text(json.dumps(
        [{"video_name": v, "question": q, "answer": a} for v, q, a, _ in QA]))
    cfg.datasets.activitynet.answers = None
    combined = zeroshot_qa.load_entries(cfg)
    assert [e.record for e in combined] == [{"id": k, "video_name": v, "Q": q, "A": a}
                                             for k, (v, q, a, _) in enumerate(QA)]
    cfg.dataset = "kinetics"
    with pytest.raises(ValueError, match=r"benchmark\.dataset 'kinetics' is not one of"):
        zeroshot_qa.load_entries(cfg)


# --------------------------------------------------------------------------- checks before the model


@pytest.mark.parametrize("case", ["missing key", "dead endpoint", "model not served", "no local judge"])
def test_judge_checked_before_the_model_loads(case, vcg_root, tmp_path, chat_server, no_model, monkeypatch):
    server = chat_server({"?:": [("status", 404, {})]}, _key, models=("another-model",))
    judge = [f"judge.base_url={server.base_url}", "judge.api_key_env=null", "judge.model=judge-a"]
    if case == "missing key":
        monkeypatch.delenv(KEY_ENV)
        judge[1] = f"judge.api_key_env={KEY_ENV}"
        expected = rf"judge\.api_key_env: environment variable {KEY_ENV} is not set"
    elif case == "dead endpoint":
        url = _dead_url()
        judge[0] = f"judge.base_url={url}"
        expected = rf"judge\.base_url={re.escape(url)}: cannot reach {re.escape(url)}/models"
    elif case == "model not served":
        expected = rf"HTTP 404 from {re.escape(server.base_url)}/chat/completions.*judge\.model=judge-a"
    else:
        judge = ["judge=local", f"judge.model_path={tmp_path / 'no-judge'}"]
        expected = rf"judge\.model_path={re.escape(str(tmp_path / 'no-judge'))}: no config\.json there"
    cfg = _compose("benchmark=videochatgpt", f"benchmark.root={vcg_root}", f"run_dir={tmp_path / 'run'}", *judge)
    with pytest.raises(JudgeError, match=expected):
        run(cfg)
    assert not (tmp_path / "run" / "predictions").exists()


def test_score_stage_checks_the_judge_before_judging(tmp_path, no_model):
    run_dir = tmp_path / "run"
    records = {"generic": [{"video_name": "v", "Q": "q", "A": "a", "pred": "p"}],
               "temporal": [{"video_name": "v", "Q": "q", "A": "a", "pred": "p"}],
               "consistency": [{"video_name": "v", "Q1": "q", "Q2": "q", "A": "a", "pred1": "p", "pred2": "p"}]}
    for split, rows in records.items():
        judged.write_json(run_dir / "predictions" / f"{split}.json", rows)
    url = _dead_url()
    with pytest.raises(JudgeError, match=rf"cannot reach {re.escape(url)}/models"):
        _evaluate("videochatgpt", tmp_path, Path("unused"), run_dir, url, "benchmark.stage=score")
    assert not (run_dir / "judge").exists() and not (run_dir / "results.json").exists()


def _benchmark_tree(root: Path) -> None:
    """VCGBench's and ActivityNet-QA's question files, one record each, and their (empty) video folders."""
    qa = [{"video_name": "v", "Q": "q", "A": "a"}]
    files = {
        "Benchmarking_QA/generic_qa.json": qa, "Benchmarking_QA/temporal_qa.json": qa,
        "Benchmarking_QA/consistency_qa.json": [{"video_name": "v", "Q1": "q", "Q2": "q", "A": "a"}],
        "ActivityNet/test_q.json": [{"video_name": "v", "question": "q", "question_id": 0}],
        "ActivityNet/test_a.json": [{"answer": "a", "question_id": 0}],
    }
    for name, records in files.items():
        judged.write_json(root / name, records)
    (root / "Test_Videos").mkdir()
    (root / "ActivityNet" / "all_test").mkdir()


PATH_CASES = [  # (benchmark, what is removed, relative to the root ("": the root), what the error expects there)
    ("videochatgpt", "", "the VideoChatGPT benchmark directory"),
    ("videochatgpt", "Benchmarking_QA/temporal_qa.json",
     r"the temporal question records \(benchmark\.json_dir, benchmark\.splits\.temporal\)"),
    ("videochatgpt", "Test_Videos", r"the videos \(benchmark\.video_dir=Test_Videos\)"),
    ("zeroshot_qa", "", "the directory holding the datasets' folders"),
    ("zeroshot_qa", "ActivityNet/test_a.json",
     r"the activitynet answers \(benchmark\.datasets\.activitynet\.answers\)"),
    ("zeroshot_qa", "ActivityNet/all_test",
     r"the videos \(benchmark\.datasets\.activitynet\.video_dir=ActivityNet/all_test\)"),
]


@pytest.mark.parametrize(("benchmark", "removed", "expected"), PATH_CASES)
def test_benchmark_paths_checked_before_the_model_loads(benchmark, removed, expected, tmp_path, no_model):
    root = tmp_path / "bench"
    _benchmark_tree(root)
    missing = root / removed
    shutil.rmtree(missing) if missing.is_dir() else missing.unlink()
    dataset = ["benchmark.dataset=activitynet"] if benchmark == "zeroshot_qa" else []
    cfg = _compose(f"benchmark={benchmark}", *dataset, f"benchmark.root={root}", "benchmark.stage=generate",
                   f"run_dir={tmp_path / 'run'}")
    with pytest.raises(FileNotFoundError) as info:
        run(cfg)
    assert re.fullmatch(rf"benchmark\.root={re.escape(str(root))}: {re.escape(str(missing))} not found; "
                        rf"expected {expected}", str(info.value)), str(info.value)


# --------------------------------------------------------------------------- a scoring that judges nothing


def test_nothing_judged_fails_and_keeps_the_earlier_results(anet_root, tmp_path, chat_server):
    script = {f"qa:{q}": [("reply", reply)] for _, q, _, reply in QA[:3]}
    chat = chat_server(script, _key)
    run_dir = tmp_path / "anet"
    judged.write_json(run_dir / "predictions" / "activitynet.json", [
        {"id": k, "video_name": v, "Q": q, "A": a, "pred": f"pred {k}"} for k, (v, q, a, _) in enumerate(QA[:3])])
    args = _overrides("zeroshot_qa", anet_root, Path("unused"), run_dir, chat.base_url,
                      "benchmark.dataset=activitynet", "benchmark.stage=score")
    assert run(_compose(*args))["judged"] == 3  # judge-a's results, to be kept
    outputs = ("results.json", "results.md")
    kept = {name: (run_dir / name).read_bytes() for name in outputs}

    # judge-b replies garbage throughout: the app exits non-zero and leaves judge-a's results alone
    chat.reset_counts()
    for key in script:
        script[key] = [("reply", MALFORMED)]
    proc = subprocess.run([sys.executable, "-m", "tc_llava.eval", *args, "judge.model=judge-b",
                           "judge.max_consecutive_failures=10"],  # each item's attempts, not the breaker
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "zeroshot_qa_activitynet: nothing judged (0 of 3 items got a score)" in proc.stderr, proc.stderr[-4000:]
    assert chat.count() == 3 * 2  # every item got its attempts: nothing was cut short
    assert {name: (run_dir / name).read_bytes() for name in outputs} == kept

    # judge-b's endpoint now hangs up on every request: the breaker stops the stage, results untouched
    for key in script:
        script[key] = [("close",)]
    t0 = time.monotonic()
    stopped = rf"judge stopped: 5 requests in a row to {re.escape(chat.base_url)} failed \(5 x no connection; "
    with pytest.raises(JudgeError, match=stopped):
        run(_compose(*args, "judge.model=judge-b", "judge.max_retries=5", "judge.backoff_base_s=1.0"))
    assert time.monotonic() - t0 < 5  # per-item retries alone would sleep 1 + 2 + 4 + 8 + 16 s
    assert {name: (run_dir / name).read_bytes() for name in outputs} == kept

    # partly judged: written, and the markdown says how much
    script["qa:qa0"] = [("reply", "{'pred': 'yes', 'score': 4}")]
    for key in ("qa:qa1", "qa:qa2"):
        script[key] = [("reply", MALFORMED)]
    partial = run(_compose(*args, "judge.model=judge-b"))
    assert (partial["judged"], partial["failed"]) == (1, 2)
    assert "**Partial**: 1 of 3 items judged, 2 failed" in (run_dir / "results.md").read_text()
