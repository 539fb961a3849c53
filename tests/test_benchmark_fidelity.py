"""Benchmarks scored and sampled as their official scripts do: Video-MME's answer extraction."""

from __future__ import annotations

import json

import pytest

from tc_llava.eval.videomme import extract_answer

from test_mcq_benchmarks import _evaluate, videomme_root  # noqa: F401 (videomme_root is a fixture)


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
    rows = {json.loads(line)["id"]: json.loads(line) for line in (run_dir / "predictions.jsonl").open()}
    assert rows["short/001-1"]["pred"] == "B" and rows["medium/002-1"]["pred"] == ""
