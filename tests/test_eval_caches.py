"""Evaluation survives what one input or one crash can do to it.

A crash cuts the last line of a cache anywhere, also inside a multi-byte UTF-8 character:
the rerun drops it, says so once, and appends cleanly after it. A 1 MB question, longer than
the model's context, fails alone with its reason counted, and a rerun does not try it again.
A full disk names the file being written.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tc_llava.data.synthetic import generate
from tc_llava.eval import jsonl, runner
from tc_llava.eval.__main__ import run
from tc_llava.model.tc_llava import TCLlava

from conftest import CONFIGS

RECORDS = [{"id": "a/0", "output": "plain"}, {"id": "a/1", "output": "日本語の答え"},
           {"id": "a/2", "output": "ça va"}]


def _cut_inside_last_line(path: Path, inside_character: bool) -> None:
    """Cut the file in its last line: between two bytes of one UTF-8 character, or between two ASCII ones."""
    data = path.read_bytes()
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    if inside_character:
        cut = data.index("ç".encode(), start) + 1  # after the first of its two bytes
    else:
        cut = data.index(b'"output"', start) + 3
    path.write_bytes(data[:cut])


@pytest.mark.parametrize("inside_character", [True, False], ids=["inside a UTF-8 character", "between ASCII bytes"])
def test_a_torn_last_line_is_dropped_counted_and_cut_before_appending(tmp_path, caplog, inside_character):
    path = tmp_path / "cache.rank0.jsonl"
    with jsonl.Appender(path) as out:
        for record in RECORDS:
            out.write(record)
    _cut_inside_last_line(path, inside_character)
    if inside_character:  # what the earlier text-mode reader crashed on, on every rerun
        with pytest.raises(UnicodeDecodeError):
            path.read_text(encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="tc_llava.eval.jsonl"):
        assert list(jsonl.read(path, dict)) == RECORDS[:2]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"{path}: dropped 1 torn last line(s) (cut by a crash) and skipped 0 unreadable line(s)"]

    with jsonl.Appender(path) as out:  # the rerun appends its new record on a line of its own
        out.write(RECORDS[2])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tc_llava.eval.jsonl"):
        assert list(jsonl.read(path, dict)) == RECORDS
    assert caplog.records == []  # the fragment is gone, not left behind as an unreadable line
    by_id = runner.read_records(tmp_path, "cache")
    assert [by_id[r["id"]] for r in RECORDS] == [[r] for r in RECORDS]


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "cache.rank0.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1], ensure_ascii=False), encoding="utf-8")
    with jsonl.Appender(path) as out:
        out.write(RECORDS[2])
    assert list(jsonl.read(path, dict)) == RECORDS


def test_a_full_disk_names_the_file(tmp_path):
    with pytest.raises(jsonl.DiskFullError) as info:
        with jsonl.Appender("/dev/full") as out:  # every write to /dev/full fails with ENOSPC
            out.write(RECORDS[0])
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).startswith("[Errno 28] disk full (no space left on device) while writing /dev/full")


# --------------------------------------------------------------------------- through the eval app
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The synthetic set (one question per task) with one question grown to 1 MB."""
    root = tmp_path_factory.mktemp("data")
    paths = generate(root / "synthetic", num_train=1, num_eval_per_task=1, seed=0, num_frames=8, size=32)
    task_json = sorted(paths.mvbench_json.values())[0]
    records = json.loads(task_json.read_text())
    records[0]["question"] = "Why is the red square moving? " * 35_000  # 1.05 MB, about 385k tokens
    task_json.write_text(json.dumps(records))
    return root


def _evaluate(data_root: Path, model: Path, run_dir: Path) -> dict:
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=[
            "model=pretrained", f"model.checkpoint={model}", "model.dtype=float32", "benchmark=mvbench_synthetic",
            f"paths.data={data_root}", f"run_dir={run_dir}", "benchmark.num_frames=8",
            "benchmark.max_new_tokens=2", "benchmark.decode.num_workers=0"])
    return run(cfg)


def test_a_1mb_question_fails_alone_and_is_not_retried(data_root, tiny_llama, tmp_path, monkeypatch):
    generated = []
    original = TCLlava.generate

    def bounded(self, input_ids, *args, **kwargs):  # the earlier code asked for 327 GB here
        assert input_ids.shape[1] <= self.language_model.config.max_position_embeddings
        generated.append(len(input_ids))
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(TCLlava, "generate", bounded)
    run_dir = tmp_path / "eval"
    results = _evaluate(data_root, tiny_llama, run_dir)
    tasks = len(results["tasks"])
    assert results["Avg"]["failed"] == 1 and results["Avg"]["total"] == tasks - 1 == sum(generated)
    assert results["failed_by_reason"] == {"PromptTooLong": 1}
    (failed,) = results["failed_items"]
    assert failed["reason"].startswith("PromptTooLong: ") and failed["reason"].endswith(
        "prompt tokens + max_new_tokens 2 exceed the model's context of 8192 (max_position_embeddings)")
    assert results["provenance"]["data"]["failed_media"]["count"] == 0  # its video is fine

    generated.clear()
    again = _evaluate(data_root, tiny_llama, run_dir)
    assert generated == [] and again["failed_by_reason"] == {"PromptTooLong": 1}
    cached = [json.loads(line) for p in (run_dir / "cache").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert sum(r["id"] == failed["id"] for r in cached) == 1  # tried once, not on every rerun


def test_a_full_disk_while_writing_results_names_the_file(data_root, tiny_llama, tmp_path):
    run_dir = tmp_path / "eval"
    run_dir.mkdir()
    (run_dir / "results.json").symlink_to("/dev/full")
    with pytest.raises(jsonl.DiskFullError, match=rf"disk full \(no space left on device\) while writing "
                                                  rf"{run_dir / 'results.json'}"):
        _evaluate(data_root, tiny_llama, run_dir)
