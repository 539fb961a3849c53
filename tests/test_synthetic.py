"""The synthetic video QA generator: reproducible, decodable, solvable from frames only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import av
import numpy as np
import pytest

from tc_llava.data.mcq import ground_truth as mvbench_answer
from tc_llava.data.synthetic import BACKGROUND, COLORS, NUMBERS, TASKS, generate, main
from tc_llava.data.video import sample_frames

PALETTE = np.array(list(COLORS.values()), dtype=float)
ORDINALS = {"first": 0, "second": 1, "third": 2, "last": -1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("synth"), num_train=24, num_eval_per_task=8, seed=11)


def mvbench_items(paths):
    table = json.loads(paths.mvbench_tasks.read_text())
    for name, (json_file, prefix, kind, bound, family) in table.items():
        for record in json.loads((paths.mvbench_dir / "json" / json_file).read_text()):
            yield name, family, paths.mvbench_dir / "video" / prefix / record["video"], record


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def blob(frame: np.ndarray) -> tuple[str, float, float, str] | None:
    """Colour, centroid and shape (by bounding-box fill ratio) of the frame's object."""
    mask = np.abs(frame.astype(int) - BACKGROUND).sum(-1) > 90
    if mask.sum() < 20:
        return None
    ys, xs = np.nonzero(mask)
    color = list(COLORS)[int(np.argmin(((PALETTE - np.median(frame[mask], 0)) ** 2).sum(1)))]
    fill = mask.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle" if fill > 0.48 else "star"
    return color, xs.mean(), ys.mean(), shape


def solve(task: str, question: str, frames: np.ndarray) -> str:
    """A hand-written reader of the pixels: proof that the frames carry the answer."""
    blobs = [b for b in map(blob, frames) if b is not None]
    runs = [b[0] for i, b in enumerate(blobs) if i == 0 or b[0] != blobs[i - 1][0]]
    if task == "order":
        return runs[ORDINALS[question.split()[-1].rstrip("?")]]
    if task == "count":
        return NUMBERS[len(runs) - 1]
    if task == "change":
        return runs[-1] if "change to" in question else runs[0]
    if task == "direction":
        dx, dy = blobs[-1][1] - blobs[0][1], blobs[-1][2] - blobs[0][2]
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    return blobs[0][0] if task == "color" else blobs[0][3]


def test_same_seed_same_dataset(tmp_path, dataset):
    again = generate(tmp_path / "again", num_train=24, num_eval_per_task=8, seed=11)
    assert again.train_json.read_text() == dataset.train_json.read_text()
    for task, path in dataset.mvbench_json.items():
        assert again.mvbench_json[task].read_text() == path.read_text()
    assert again.mvbench_tasks.read_text() == dataset.mvbench_tasks.read_text()
    first = sorted(p.relative_to(dataset.root) for p in dataset.root.rglob("*.mp4"))
    assert first == sorted(p.relative_to(again.root) for p in again.root.rglob("*.mp4"))
    for rel in first:  # lossless H.264: pixels are the rendered ones, whatever x264 decided
        np.testing.assert_array_equal(decoded(dataset.root / rel), decoded(again.root / rel))
    other = generate(tmp_path / "other", num_train=24, num_eval_per_task=8, seed=12)
    assert other.train_json.read_text() != dataset.train_json.read_text()


def test_layout_and_answers(dataset):
    table = json.loads(dataset.mvbench_tasks.read_text())
    assert {v[0] for v in table.values()} == {f"{t}.json" for t in TASKS}
    assert {v[4] for v in table.values()} == {"temporal", "static"}
    assert all(v[2] == "video" and v[3] is False for v in table.values())
    items = list(mvbench_items(dataset))
    assert len(items) == 8 * len(TASKS)
    for _, _, video, record in items:
        assert video.is_file()
        assert set(record) == {"video", "question", "candidates", "answer"}
        assert record["answer"] in record["candidates"]
        assert len(set(record["candidates"])) == len(record["candidates"]) >= 3
    entries = json.loads(dataset.train_json.read_text())
    assert len(entries) == 24
    for entry in entries:
        assert (dataset.root / entry["video"]).is_file()
        mc, open_ended = entry["QA"]
        letter = mc["a"].removeprefix("Best option:(")[0]
        assert f"({letter}) {open_ended['a']}\n" in mc["q"] + "\n"
        assert mc["q"].startswith(f"Question: {open_ended['q']}\nOptions:\n(A) ")
        assert mc["q"].endswith("\nOnly give the best option.")
    assert mvbench_answer("red", ["blue", "red"]) == "(B) red"


def test_train_and_eval_videos_are_distinct(dataset):
    digests = {}
    for path in dataset.root.rglob("*.mp4"):
        digest = decoded(path).tobytes()
        assert digest not in digests, f"{path} repeats {digests.get(digest)}"
        digests[digest] = path


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_configured_frames_and_size_decode(tmp_path, backend):
    paths = generate(tmp_path, num_train=2, num_eval_per_task=1, seed=0, num_frames=24, size=96, fps=6)
    for path in paths.root.rglob("*.mp4"):
        frames, indices = sample_frames(path, 24, strategy="uniform", backend=backend)
        assert frames.shape == (24, 96, 96, 3) and indices == list(range(24))
        assert not np.array_equal(frames[0], np.full_like(frames[0], BACKGROUND))
    with av.open(str(next(paths.root.rglob("*.mp4")))) as container:
        assert container.streams.video[0].average_rate == 6
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"


def test_frames_answer_temporal_only_in_order(dataset):
    for name, family, video, record in mvbench_items(dataset):
        task = next(t for t, (n, _) in TASKS.items() if n == name)
        frames, _ = sample_frames(video, 8, backend="pyav")
        assert solve(task, record["question"], frames) == record["answer"], (video, record)
        if family == "static":
            assert solve(task, record["question"], frames[5:6]) == record["answer"]
        elif task != "count" and not record["question"].endswith("second?"):
            assert solve(task, record["question"], frames[::-1]) != record["answer"]


def test_count_frames_show_one_object_at_a_time(dataset):
    for name, _, video, record in mvbench_items(dataset):
        if name != TASKS["count"][0]:
            continue
        for frame in decoded(video):
            mask = np.abs(frame.astype(int) - BACKGROUND).sum(-1) > 90
            ys, xs = np.nonzero(mask)
            assert np.ptp(xs) < 0.5 * frame.shape[1] and np.ptp(ys) < 0.5 * frame.shape[0]


def test_cli_and_speed(tmp_path):
    main(["--out", str(tmp_path / "cli"), "--num-train", "3", "--num-eval-per-task", "1", "--seed", "2"])
    assert len(json.loads((tmp_path / "cli" / "train.json").read_text())) == 3
    start = time.perf_counter()
    generate(tmp_path / "full", num_train=200, num_eval_per_task=20, seed=0)
    assert time.perf_counter() - start < 30


def test_rl_prompts_answers_are_what_the_frames_show(dataset):
    """rl.json's questions on the training videos: the mcq solution is the training answer's option, the count is
    the shapes a pixel reader sees one after another, and a span is the decoder's timestamps of the first and after
    the last frame that shows the shape."""
    entries = json.loads(dataset.train_json.read_text())
    prompts = json.loads(dataset.rl_json.read_text())
    types = [p["answer_type"] for p in prompts]
    assert types.count("mcq") == len(entries) and types.count("number") > 0 and types.count("span") > 0
    for p in prompts:
        k = int(p["id"][:5])
        assert p["video"] == entries[k]["video"] and len(p["QA"]) == 1
        (qa,) = p["QA"]
        if p["answer_type"] == "mcq":
            assert qa["q"] == entries[k]["QA"][0]["q"]
            assert "Best option:" + qa["a"] == entries[k]["QA"][0]["a"]
            continue
        with av.open(str(dataset.root / p["video"])) as container:
            frames = [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
            step = 1 / container.streams.video[0].average_rate
        blobs = [(t, blob(frame)) for t, frame in frames]
        if p["answer_type"] == "number":
            seen = [b[0] for _, b in blobs if b is not None]
            runs = [c for i, c in enumerate(seen) if i == 0 or c != seen[i - 1]]
            assert qa["a"] == str(len(runs)) and entries[k]["QA"][1]["a"] == NUMBERS[len(runs) - 1]
        else:
            color, shape = qa["q"].removeprefix("During which seconds is the ").removesuffix(" visible?").split()
            shown = [t for t, b in blobs if b is not None and (b[0], b[3]) == (color, shape)]
            assert shown and qa["a"] == f"{shown[0]:g} - {float(shown[-1] + step):g} seconds"
