"""One bad input never hangs or floods a run: a named pipe as media, a decode past its deadline,
training JSON that is not UTF-8, and an unknown error policy caught before the model loads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

import tc_llava.train.loop as loop
from tc_llava.data.datasets import DataError
from tc_llava.data.video import DecodeTimeoutError, NotRegularFileError, sample_frames
from tc_llava.eval import videomme
from tc_llava.eval.jsonl import load_records
from tc_llava.train.loop import train
from tc_llava.train.settings import SettingsError

from conftest import REPO
from test_mcq_benchmarks import _evaluate, _write
from test_train import overrides, synthetic, train_cfg  # noqa: F401 (synthetic is a fixture)

FAST = ("trainer.max_steps=4", "export.enabled=false")


@contextlib.contextmanager
def fifo(path: Path, release_after: float = 30.0) -> Iterator[Path]:
    """A named pipe at ``path``. After ``release_after`` s, every reader that opens it (the old behaviour:
    decoders opened it) is answered by a writer that closes at once, so that such code sees an empty stream
    and the test fails instead of hanging."""
    os.mkfifo(path)
    done = threading.Event()

    def release() -> None:
        done.wait(release_after)
        while not done.wait(0.05):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: nobody is reading
                pass

    threading.Thread(target=release, daemon=True).start()
    try:
        yield path
    finally:
        done.set()


def _copy_records(synthetic: Path, data: Path, count: int) -> list[dict]:
    records = json.loads((synthetic / "synthetic/train.json").read_text())[:count]
    (data / "synthetic/videos").mkdir(parents=True)
    for r in records:
        shutil.copyfile(synthetic / "synthetic" / r["video"], data / "synthetic" / r["video"])
    (data / "synthetic/train.json").write_text(json.dumps(records))
    return records


def test_fifo_and_timeout_are_refused_by_the_reader(synthetic, tmp_path):
    video = next((synthetic / "synthetic/videos").iterdir())
    with fifo(tmp_path / "pipe.mp4") as pipe:
        for backend in ("decord", "pyav"):
            with pytest.raises(NotRegularFileError, match=rf"{pipe}: is a named pipe \(FIFO\), not a regular file"):
                sample_frames(pipe, 4, backend=backend)
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in (1, 3):
        Image.new("RGB", (8, 8)).save(folder / f"{k:05d}.jpg")
    with fifo(folder / "00002.jpg") as pipe:  # frames [1, 2, 2] of 3
        with pytest.raises(NotRegularFileError, match=rf"{pipe}: is a named pipe"):
            sample_frames(folder, 3, fps=1.0)
    with pytest.raises(DecodeTimeoutError, match=rf"{video}: decoding took longer than its timeout of 1e-05 s"):
        sample_frames(video, 4, backend="pyav", timeout=1e-5)
    frames, _ = sample_frames(video, 4, backend="pyav", timeout=60)
    assert frames.shape[0] == 4


@pytest.mark.parametrize("workers", [0, 1])
def test_fifo_training_media_is_skipped_and_counted(synthetic, tmp_path, workers):
    data = tmp_path / "data"
    records = _copy_records(synthetic, data, 16)
    piped = data / "synthetic" / records[3]["video"]
    piped.unlink()
    with fifo(piped):
        result = train(train_cfg(data, tmp_path / "run", *FAST, "data.on_error=skip", f"data.num_workers={workers}"))
    assert result["data"]["skips"] == {"not_a_regular_file": 1} and result["data"]["samples"] == 16


@pytest.mark.parametrize("workers", [0, 1])
def test_decode_timeout_in_training_follows_on_error(synthetic, tmp_path, workers):
    data = tmp_path / "data"
    _copy_records(synthetic, data, 8)
    late = r"decoding took longer than its timeout of 1e-05 s \[decode_timeout; record \d+ of"
    with pytest.raises(DataError, match=late):
        train(train_cfg(data, tmp_path / "run", "trainer.max_steps=1", "export.enabled=false",
                        "data.backend=pyav", "data.decode_timeout=1e-5", f"data.num_workers={workers}"))


def test_fifo_eval_media_is_a_failed_item(synthetic, lively, tmp_path):
    root = tmp_path / "TVBench"
    (root / "json").mkdir(parents=True)
    _write(root / "video/action_count/c0.mp4", 0)
    records = [{"video": name, "question": "How many?", "candidates": ["2", "3"], "answer": "2"}
               for name in ("c0.mp4", "pipe.mp4")]
    (root / "json/action_count.json").write_text(json.dumps(records))
    with fifo(root / "video/action_count/pipe.mp4") as pipe:
        results = _evaluate("tvbench", root, lively, tmp_path / "eval", "benchmark.tasks=['Action Count']")
        assert videomme.frame_times(pipe, 4) == [] and videomme.frame_times(root / "video/action_count/c0.mp4", 4)
    assert results["Avg"]["total"] == 1 and results["Avg"]["failed"] == 1
    [failed] = results["failed_items"]
    assert failed["video"] == str(pipe) and "is a named pipe (FIFO), not a regular file" in failed["reason"]
    with pytest.raises(RuntimeError, match=r"no question could be answered.*took longer than its timeout of 1e-05 s"):
        _evaluate("tvbench", root, lively, tmp_path / "late", "benchmark.tasks=['Action Count']",
                  "benchmark.decode.timeout=1e-5", "benchmark.decode.backend=pyav")


def _not_utf8(path: Path) -> int:
    """A large record list with one Latin-1 byte; returns its byte offset."""
    records = [{"video": "videos/x.mp4", "QA": [{"q": "Où?" + "x" * 1000, "a": "ici"}]}] * 700
    text = json.dumps(records, ensure_ascii=False)
    data = text.encode("latin-1")
    path.write_bytes(data)
    return data.index(b"\xf9")


def test_non_utf8_json_is_one_short_line(synthetic, tmp_path):
    bad = tmp_path / "bad.jsonl"
    offset = _not_utf8(bad)
    with pytest.raises(ValueError) as caught:
        load_records(bad)
    assert str(caught.value) == (f"{bad}: not utf-8 text: byte 0xf9 at byte offset {offset} (invalid start byte); "
                                 "expected utf-8: re-save the file as utf-8")

    data = tmp_path / "data"
    _copy_records(synthetic, data, 4)
    offset = _not_utf8(data / "synthetic/train.json")
    args = overrides(data, tmp_path / "cli", *FAST)
    proc = subprocess.run([sys.executable, "-m", "tc_llava.train", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output
    [line] = [line for line in output.splitlines() if "train.json" in line]
    assert f"train.json: not utf-8 text: byte 0xf9 at byte offset {offset}" in line and len(line) < 400


def test_on_error_is_checked_before_the_model_loads(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "model_from_config", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(SettingsError, match=r"data\.on_error='ignore': expected one of \('raise', 'skip'\)"):
        train(train_cfg(synthetic, tmp_path / "run", "data.on_error=ignore"))
    with pytest.raises(SettingsError, match=r"data\.decode_timeout=0: expected a number of seconds > 0"):
        train(train_cfg(synthetic, tmp_path / "run", "data.decode_timeout=0"))

    args = overrides(synthetic, tmp_path / "cli", "data.on_error=ignore")
    proc = subprocess.run([sys.executable, "-m", "tc_llava.train", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1
    assert "SettingsError: data.on_error='ignore': expected one of ('raise', 'skip')" in lines[0]
