"""The multiple-choice runner beyond MVBench: TVBench-, NExT-QA- and Video-MME-shaped sets written
here as their releases lay them out (real H.264 files, one corrupt), run end to end through the eval
app with the lively tiny model: counts, scores, the official prompts, resume, and a provenance block
that names the annotation files' hashes, the failed media and the export's hash, unchanged by a
resumed run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tc_llava.data.video import frame_indices
from tc_llava.eval import videomme
from tc_llava.eval.__main__ import run
from tc_llava.model.tc_llava import TCLlava
from tc_llava.provenance import git_state, model_hash

from conftest import CONFIGS

FPS, SIZE = 8, 64
TV_TASKS = ("Action Count", "Action Sequence")
COLOURS = ["red", "green", "blue", "yellow"]


def _write(path: Path, seed: int, frames: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = np.random.default_rng(seed).integers(0, 256, (frames, 4, 4, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for frame in blocks.repeat(SIZE // 4, 1).repeat(SIZE // 4, 2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _evaluate(benchmark: str, root: Path, model: Path, run_dir: Path, *extra: str) -> dict:
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=[
            f"benchmark={benchmark}", f"benchmark.root={root}", f"run_dir={run_dir}", "model=pretrained",
            f"model.checkpoint={model}", "model.dtype=float32", "benchmark.num_frames=4",
            "benchmark.max_new_tokens=6", "benchmark.decode.num_workers=0", "benchmark.batch_size=3", *extra])
    return run(cfg)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture
def count_generated(monkeypatch) -> list[int]:
    generated: list[int] = []
    original = TCLlava.generate

    def counting(self, input_ids, *args, **kwargs):
        generated.append(len(input_ids))
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(TCLlava, "generate", counting)
    return generated


# --------------------------------------------------------------------------- TVBench (MVBench's layout)


@pytest.fixture(scope="module")
def tvbench(tmp_path_factory) -> Path:
    """Action Count: 2 videos; Action Sequence (bound by start/end): 1 video and a corrupt one."""
    root = tmp_path_factory.mktemp("TVBench")
    (root / "json").mkdir()
    count = []
    for k in range(2):
        _write(root / "video" / "action_count" / f"c{k}.mp4", k)
        count.append({"video": f"c{k}.mp4", "question": f"How many times? ({k})", "candidates": ["2", "3", "4"],
                      "answer": ["2", "3", "4"][k]})
    _write(root / "video" / "action_sequence" / "s0.mp4", 5)
    _corrupt(root / "video" / "action_sequence" / "bad.mp4")
    sequence = [{"video": name, "question": "What happened first?", "candidates": COLOURS, "answer": COLOURS[k],
                 "start": 0.5, "end": 3.0} for k, name in enumerate(["s0.mp4", "bad.mp4"])]
    (root / "json" / "action_count.json").write_text(json.dumps(count))
    (root / "json" / "action_sequence.json").write_text(json.dumps(sequence))
    return root


def _tv_args() -> tuple[str, ...]:
    return ("benchmark.tasks=[" + ",".join(f"'{t}'" for t in TV_TASKS) + "]",)


def test_tvbench_counts_scores_provenance_and_resume(tvbench, lively, tmp_path, count_generated):
    run_dir = tmp_path / "tv"
    results = _evaluate("tvbench", tvbench, lively, run_dir, *_tv_args())
    assert list(results["tasks"]) == list(TV_TASKS)
    assert [(c["total"], c["failed"]) for c in results["tasks"].values()] == [(2, 0), (1, 1)]
    assert results["Avg"]["total"] == 3 and results["Avg"]["correct"] == sum(
        c["correct"] for c in results["tasks"].values())
    assert sum(count_generated) == 3
    rows = _rows(run_dir)
    assert rows[0]["gt"] == "(A) 2" and rows[3]["gt"] == "(B) green" and rows[3]["failed"]
    assert results["settings"]["prompt"]["answer_prefix"] == "Best option:("  # TVBench's evaluation is MVBench's

    prov = results["provenance"]
    files = {"json/action_count.json", "json/action_sequence.json"}
    assert prov["data"]["annotations"] == {name: _sha(tvbench / name) for name in files}
    assert prov["data"]["items"] == 4 and prov["data"]["missing_media"] == {"count": 0, "files": []}
    assert prov["data"]["failed_media"] == {"count": 1, "files": [str(tvbench / "video/action_sequence/bad.mp4")]}
    assert prov["model"] == {"checkpoint": str(lively), "sha256": model_hash(lively)["sha256"]}
    assert prov["frames"] == {"num_frames": 4, "sampling": "middle", "frame_folder_fps": 3}
    assert prov["git"] == git_state() and len(prov["git"]["commit"]) == 40

    count_generated.clear()  # a resumed run: nothing generated again, the same provenance and predictions
    again = _evaluate("tvbench", tvbench, lively, run_dir, *_tv_args())
    assert count_generated == [] and again["provenance"] == prov and again["Avg"] == results["Avg"]
    assert _rows(run_dir) == rows

    # the scores follow the cached outputs: every answered item rewritten to its right letter
    for cache in (run_dir / "cache").glob("*.rank*.jsonl"):
        records = [json.loads(line) for line in cache.read_text().splitlines()]
        gts = {r["id"]: r["gt"] for r in rows}
        for record in records:
            if record["failed"] is None:
                record["output"] = gts[record["id"]][1:]
        cache.write_text("".join(json.dumps(r) + "\n" for r in records))
    rescored = _evaluate("tvbench", tvbench, lively, run_dir, *_tv_args())
    assert count_generated == [] and rescored["Avg"]["correct"] == rescored["Avg"]["total"] == 3


# --------------------------------------------------------------------------- NExT-QA


@pytest.fixture(scope="module")
def nextqa(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("NExTQA")
    for vid, folder, seed in (("101", "0001", 1), ("102", "0002", 2)):
        _write(root / "NExTVideo" / folder / f"{vid}.mp4", seed)
    _corrupt(root / "NExTVideo" / "0003" / "103.mp4")
    (root / "map_vid_vidorID.json").write_text(json.dumps({"101": "0001/101", "102": "0002/102", "103": "0003/103"}))
    header = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n"
    rows = ["101,32,64,64,why did the cat jump,2,4,CW,a,b,c,d,e",
            "101,32,64,64,what did the cat do after sitting,0,5,TN,sit,run,jump,eat,sleep",
            "102,32,64,64,where is the dog,4,0,DL,x,y,z,y,y",  # repeated options: the answer's index decides
            "103,32,64,64,how many dogs,1,1,DC,one,two,three,four,five"]
    (root / "val.csv").write_text(header + "\n".join(rows) + "\n")
    return root


def test_nextqa_families_counts_and_ground_truth(nextqa, lively, tmp_path):
    results = _evaluate("nextqa", nextqa, lively, tmp_path / "run")
    assert list(results["tasks"]) == ["Causal", "Temporal", "Descriptive"]
    assert [(c["total"], c["failed"]) for c in results["tasks"].values()] == [(1, 0), (1, 0), (1, 1)]
    rows = {r["id"]: r for r in _rows(tmp_path / "run")}
    assert rows["Causal/101_4"]["gt"] == "(C) c" and rows["Descriptive/102_0"]["gt"] == "(E) y"
    assert rows["Descriptive/103_1"]["failed"] and rows["Descriptive/103_1"]["video"].endswith("0003/103.mp4")
    assert set(results["provenance"]["data"]["annotations"]) == {"val.csv", "map_vid_vidorID.json"}

    bad = tmp_path / "bad"
    shutil.copytree(nextqa, bad)
    (bad / "val.csv").write_text((nextqa / "val.csv").read_text().replace(",2,4,CW,", ",7,4,CW,"))
    with pytest.raises(ValueError, match=rf"{bad / 'val.csv'} line 2: answer '7' must be the index 0-4"):
        _evaluate("nextqa", bad, lively, tmp_path / "run2")


# --------------------------------------------------------------------------- Video-MME


SRT = """1
00:00:00,000 --> 00:00:01,000
first <i>line</i>

2
00:00:01,500 --> 00:00:02,000
never at a sampled frame

3
00:00:02,000 --> 00:00:03,000
third

4
00:00:03,100 --> 00:00:03,300
fourth
"""


@pytest.fixture(scope="module")
def videomme_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("VideoMME")
    _write(root / "data" / "vidA.mp4", 11)
    _write(root / "data" / "vidB.mp4", 12)
    _corrupt(root / "data" / "vidC.mp4")
    (root / "subtitle").mkdir()
    (root / "subtitle" / "vidA.srt").write_text(SRT)
    options = ["A. one", "B. two", "C. three", "D. four"]
    rows = [  # the GitHub release's nesting for vidA, flat rows for the others
        {"videoID": "vidA", "duration": "short", "questions": [
            {"question_id": "001-1", "task_type": "Counting", "question": "How many?", "options": options,
             "answer": "B"}]},
        {"videoID": "vidB", "duration": "medium", "question_id": "002-1", "task_type": "OCR",
         "question": "What is written?", "options": options, "answer": "D"},
        {"videoID": "vidC", "duration": "medium", "question_id": "003-1", "task_type": "OCR",
         "question": "And here?", "options": options, "answer": "A"},
    ]
    (root / "videomme").mkdir()
    (root / "videomme" / "test.json").write_text(json.dumps(rows))
    return root


def test_videomme_subtitles_of_the_sampled_frames(videomme_root):
    # 32 frames at 8 fps, 4 segment middles: frames 3, 11, 19, 26 -> 0.375, 1.375, 2.375, 3.25 s
    assert frame_indices(4, FPS, 31) == [3, 11, 19, 26]
    times = videomme.frame_times(videomme_root / "data" / "vidA.mp4", 4)
    assert times == pytest.approx([0.375, 1.375, 2.375, 3.25])
    cues = videomme.read_srt(videomme_root / "subtitle" / "vidA.srt")
    assert cues[0] == (0.0, 1.0, "first line") and len(cues) == 4
    assert videomme.subtitles_at(cues, times) == "first line\nthird\nfourth"  # cue 2 is shown at no sampled frame
    assert videomme.frame_times(videomme_root / "data" / "vidC.mp4", 4) == []  # corrupt: no subtitles, fails later


def test_videomme_official_prompt_buckets_and_failures(videomme_root, lively, tmp_path):
    args = ("benchmark.annotation=videomme/test.json",)
    results = _evaluate("videomme_sub", videomme_root, lively, tmp_path / "sub", *args)
    assert list(results["tasks"]) == ["short", "medium", "long"]
    counts = [(c["total"] + c["unanswered"], c["failed"]) for c in results["tasks"].values()]
    assert counts == [(1, 0), (1, 1), (0, 0)] and results["tasks"]["long"]["accuracy"] is None
    assert results["settings"]["subtitles"] is True and results["settings"]["subtitle_files"] == 1
    assert set(results["provenance"]["data"]["annotations"]) == {"videomme/test.json", "subtitle/vidA.srt"}

    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=["benchmark=videomme_sub", f"benchmark.root={videomme_root}",
                                         "benchmark.num_frames=4", *args])
    questions, _, _ = videomme.load_questions(cfg.benchmark, "<image>")
    assert questions[0].item.prompt == (  # Video-MME's official prompt, no system text, in the vicuna_v1 template
        "USER: <image>\nThis video's subtitles are listed below:\nfirst line\nthird\nfourth\n"
        "Select the best answer to the following multiple-choice question based on the video. Respond with only "
        "the letter (A, B, C, or D) of the correct option.\nHow many?\nA. one\nB. two\nC. three\nD. four\n"
        "The best answer is: ASSISTANT:")
    assert questions[0].gt == "(B) two" and questions[1].item.prompt.startswith("USER: <image>\nSelect the best")

    plain = _evaluate("videomme", videomme_root, lively, tmp_path / "plain", *args)
    assert plain["settings"]["subtitles"] is False and plain["provenance"]["data"]["annotations"].keys() == {
        "videomme/test.json"}
