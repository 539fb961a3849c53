"""Benchmarks scored and sampled as their official scripts do: Video-MME's answer extraction,
MLVU's frames, TVBench's published archives."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tc_llava.data import video
from tc_llava.eval import runner
from tc_llava.eval.videomme import extract_answer

from test_mcq_benchmarks import _evaluate, _write, videomme_root  # noqa: F401 (videomme_root is a fixture)


# What Video-MME's eval_your_results.py (MME-Benchmarks/Video-MME@4e7566d, extract_characters_regex) returns.
@pytest.mark.parametrize("output,letter", [
    ("A", "A"),
    ("The answer is A.", "A"),
    ("The best answer is: C", "C"),
    ("  (B) two", "B"),
    ("D. four", "D"),
    ("The correct option is D", "D"),
    ("Best answer: C", "B"),  # its list joins "Best answer:" and "Best option:", so neither is removed
    ("Best option: D", "B"),
    ("Answer: C", "A"),  # the capital of "Answer" comes first
    ("the answer is a", ""),  # lowercase letters are no answer
    ("I cannot tell from the video what happens in this clip at all, sorry", ""),
    ("", ""),
])
def test_videomme_extracts_the_letter_as_the_official_script(output, letter):
    assert extract_answer(output) == letter


def test_videomme_scores_extracted_letters_over_answered_items(videomme_root, lively, tmp_path):
    args = ("benchmark.annotation=videomme/test.json",)
    run_dir = tmp_path / "plain"
    _evaluate("videomme", videomme_root, lively, run_dir, *args)
    outputs = {"short/001-1": "The answer is B.", "medium/002-1": "none of them"}  # B is right; no letter
    for cache in (run_dir / "cache").glob("*.rank*.jsonl"):
        records = [json.loads(line) for line in cache.read_text().splitlines()]
        for record in records:
            if record["failed"] is None:
                record["output"] = outputs[record["id"]]
        cache.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = _evaluate("videomme", videomme_root, lively, run_dir, *args)
    assert results["tasks"]["short"] == {"correct": 1, "total": 1, "failed": 0, "unanswered": 0, "accuracy": 100.0}
    assert results["tasks"]["medium"] == {"correct": 0, "total": 0, "failed": 1, "unanswered": 1, "accuracy": None}
    assert results["Avg"]["accuracy"] == 100.0 and results["Avg"]["unanswered"] == 1
    assert results["settings"]["scoring"].startswith("Video-MME's eval_your_results.py")
    assert results["settings"]["decoding"]["kept"] == "whole output"
    rows = {json.loads(line)["id"]: json.loads(line) for line in (run_dir / "predictions.jsonl").open()}
    assert rows["short/001-1"]["pred"] == "B" and rows["medium/002-1"]["pred"] == ""


def _official_mlvu_index(num_frames: int, num_segments: int) -> list[int]:
    """MLVU's choice_bench.py (JUNJIE99/MLVU video_chat/ and videochat2/): get_index over decord's len(vr)."""
    seg_size = float(num_frames - 1) / num_segments
    start = int(seg_size / 2)
    return [start + int(np.round(seg_size * idx)) for idx in range(num_segments)]


@pytest.mark.parametrize("num_frames", [16, 8])
def test_mlvu_samples_the_official_frames(lively, tmp_path, monkeypatch, num_frames):
    root = tmp_path / "MLVU"
    lengths = {"a.mp4": 20, "b.mp4": 37, "c.mp4": 101}
    for k, (name, length) in enumerate(lengths.items()):
        _write(root / "video/4_count" / name, k, frames=length)
    records = [{"video": name, "question": "How many?", "candidates": ["1", "2"], "answer": "1"} for name in lengths]
    (root / "json").mkdir()
    (root / "json/4_count.json").write_text(json.dumps(records))
    seen = {}

    def spy(path, count, strategy, bound, backend, **kwargs):
        frames, indices = video.sample_frames(path, count, strategy, bound, backend, **kwargs)
        seen[Path(path).name] = indices
        return frames, indices

    monkeypatch.setattr(runner, "sample_frames", spy)
    results = _evaluate("mlvu", root, lively, tmp_path / "run", "benchmark.tasks=['Action Count']",
                        f"benchmark.num_frames={num_frames}")
    assert results["Avg"]["total"] == 3
    assert seen == {name: _official_mlvu_index(length, num_frames) for name, length in lengths.items()}


def test_tvbench_download_with_zip_archives_is_extracted_by_one_command(lively, tmp_path):
    """TVBench as published: video/<task>.zip (members under <task>/, or bare). The input check names the
    command; the command unpacks them in place; the evaluation then reads every video."""
    videos = tmp_path / "videos"
    for k, name in enumerate(("c0.mp4", "c1.mp4", "s0.mp4")):
        _write(videos / name, k)
    root = tmp_path / "TVBench"
    (root / "json").mkdir(parents=True)
    (root / "video").mkdir()
    with zipfile.ZipFile(root / "video/action_count.zip", "w") as zf:
        zf.writestr("action_count/", "")
        for name in ("c0.mp4", "c1.mp4"):
            zf.write(videos / name, f"action_count/{name}")
    with zipfile.ZipFile(root / "video/action_sequence.zip", "w") as zf:
        zf.write(videos / "s0.mp4", "s0.mp4")
    (root / "json/action_count.json").write_text(json.dumps(
        [{"video": f"c{k}.mp4", "question": "How many?", "candidates": ["2", "3"], "answer": "3"} for k in range(2)]))
    (root / "json/action_sequence.json").write_text(json.dumps(
        [{"video": "s0.mp4", "question": "What first?", "candidates": ["a", "b"], "answer": "a", "start": 0.5,
          "end": 3.0}]))
    tasks = "benchmark.tasks=['Action Count','Action Sequence']"

    with pytest.raises(FileNotFoundError, match=re.escape(
            f"the media of task 'Action Count' are still in {root / 'video/action_count.zip'}; extract the archives "
            f"once with: python -m tc_llava.eval.tvbench_extract {root}")):
        _evaluate("tvbench", root, lively, tmp_path / "run", tasks)

    command = [sys.executable, "-m", "tc_llava.eval.tvbench_extract", str(root)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("extracted 2 archive(s)")
    for task, name in (("action_count", "c0.mp4"), ("action_count", "c1.mp4"), ("action_sequence", "s0.mp4")):
        assert (root / "video" / task / name).read_bytes() == (videos / name).read_bytes()
    assert sorted(p.name for p in (root / "video").iterdir()) == [
        "action_count", "action_count.zip", "action_sequence", "action_sequence.zip"]

    results = _evaluate("tvbench", root, lively, tmp_path / "run", tasks)
    assert results["Avg"]["total"] == 3 and results["Avg"]["failed"] == 0
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.startswith("extracted 0 archive(s)")


def test_tvbench_extract_refuses_members_that_leave_the_folder(tmp_path):
    (tmp_path / "video").mkdir()
    with zipfile.ZipFile(tmp_path / "video/object_count.zip", "w") as zf:
        zf.writestr("../evil.mp4", b"x")
    proc = subprocess.run([sys.executable, "-m", "tc_llava.eval.tvbench_extract", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: {tmp_path / 'video/object_count.zip'}: member '../evil.mp4' is absolute or leaves the folder; "
        "refusing to extract it")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["object_count.zip", "video"]
