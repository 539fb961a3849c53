"""VideoChatGPT benchmark and zero-shot QA: the Hydra app end to end, judged over real HTTP.

Each test builds the benchmark's directory layout with real videos (H.264 in mp4 and mkv,
a corrupt mp4, a video_name with no file), generates with the tiny Llama LLaVA whose LLM
is re-drawn at a larger scale (so answers depend on the input), and scores through a
chat-completions server on 127.0.0.1 (``ChatServer`` of test_judge) scripted per
dimension and question. Scores are checked against hand computation from the script;
resume is checked by counting ``TCLlava.generate`` calls and the requests the server saw.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tc_llava.eval import __main__ as app
from tc_llava.eval import videochatgpt, zeroshot_qa
from tc_llava.eval.__main__ import run
from tc_llava.model.tc_llava import TCLlava

from conftest import CONFIGS
from test_judge import chat_server  # noqa: F401  (the scripted 127.0.0.1 server fixture)

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


def _evaluate(benchmark: str, root: Path, model: Path, run_dir: Path, base_url: str, *extra: str):
    overrides = [
        f"benchmark={benchmark}", f"benchmark.root={root}", f"run_dir={run_dir}",
        "model=pretrained", f"model.checkpoint={model}", "model.dtype=float32",
        "benchmark.num_frames=4", "benchmark.max_new_tokens=6", "benchmark.batch_size=3",
        "benchmark.decode.num_workers=0",
        f"judge.base_url={base_url}", "judge.api_key_env=null", "judge.model=judge-a", "judge.max_retries=1",
        "judge.backoff_base_s=0.01", "judge.timeout_s=10", "judge.concurrency=4", *extra,
    ]
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=overrides)
    return run(cfg)


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
    prompt = videochatgpt.prompt_text(cfg, "c1b", videochatgpt.image_token_of(model.tokenizer))
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
        videochatgpt.check_stage(cfg)


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
