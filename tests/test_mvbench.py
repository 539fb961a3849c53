"""MVBench evaluation: the official formulas, and the Hydra app end to end on a built MVBench tree.

The tree holds real media written here (H.264 mp4 with bounds, VP8 webm, gif, a TVQA-style
frame folder with bounds, a corrupt mp4 and a missing file) under the official task
table's json names and prefixes. The model is the tiny Llama LLaVA with its LLM re-drawn
at a larger scale, so that greedy outputs differ from video to video and prompt to prompt
(a plain random init answers every item with the same token, which would make the
batch/process/resume equalities vacuous). Wrong paths must fail before the model builder
runs, and a run that answers nothing must leave the results of an earlier run in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from tc_llava.data import video
from tc_llava.eval import __main__ as app
from tc_llava.eval import mvbench, runner
from tc_llava.eval.__main__ import run
from tc_llava.model.tc_llava import TCLlava

from conftest import CONFIGS, REPO, free_port, save_lively

FPS = 8
SIZE = 64
# task -> records; media names are relative to the task's official prefix
TASKS = ("Action Sequence", "Action Antonym", "Object Shuffle", "Episodic Reasoning")
NUM_ITEMS = 10  # 4 + 2 + 2 + 2
CORRUPT = "corrupt.mp4"
MISSING = "missing.webm"


def _frames(rng: np.random.Generator, n: int) -> np.ndarray:
    """Blocky random colours that change every frame: cheap to encode, different per video."""
    blocks = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return blocks.repeat(SIZE // 4, 1).repeat(SIZE // 4, 2)


def _write(path: Path, frames: np.ndarray, codec: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _record(rng: np.random.Generator, name: str, k: int, bound: tuple[float, float] | None = None) -> dict:
    candidates = [str(c) for c in rng.permutation(["red", "green", "blue", "yellow"])]
    record = {"video": name, "question": f"What color is shape {k}?", "candidates": candidates,
              "answer": candidates[k % 4]}
    if bound:
        record.update(start=bound[0], end=bound[1])
    return record


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """An MVBench tree for four official tasks: 10 questions, 2 of whose media cannot be read."""
    root = tmp_path_factory.mktemp("MVBench")
    rng = np.random.default_rng(0)
    table = {name: row for name, row in _official_table().items() if name in TASKS}
    video_dir = root / "video"
    records: dict[str, list] = {}

    prefix = video_dir / table["Action Sequence"][1]
    records["Action Sequence"] = []
    for k in range(3):
        _write(prefix / f"seq{k}.mp4", _frames(rng, 32), "libx264")
        records["Action Sequence"].append(_record(rng, f"seq{k}.mp4", k, (0.5, 3.0)))
    (prefix / CORRUPT).write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    records["Action Sequence"].append(_record(rng, CORRUPT, 3, (0.5, 3.0)))

    prefix = video_dir / table["Action Antonym"][1]
    _write(prefix / "ant0.webm", _frames(rng, 24), "libvpx")
    records["Action Antonym"] = [_record(rng, "ant0.webm", 0), _record(rng, MISSING, 1)]

    prefix = video_dir / table["Object Shuffle"][1]
    prefix.mkdir(parents=True)
    records["Object Shuffle"] = []
    for k in range(2):
        gif = [Image.fromarray(f) for f in _frames(rng, 12)]
        gif[0].save(prefix / f"shuffle{k}.gif", save_all=True, append_images=gif[1:], duration=125, loop=0)
        records["Object Shuffle"].append(_record(rng, f"shuffle{k}.gif", k))

    prefix = video_dir / table["Episodic Reasoning"][1]
    records["Episodic Reasoning"] = []
    for k in range(2):
        folder = prefix / f"clip{k}"
        folder.mkdir(parents=True)
        for i, frame in enumerate(_frames(rng, 24), start=1):
            Image.fromarray(frame).save(folder / f"{i:05d}.jpg", quality=95)
        records["Episodic Reasoning"].append(_record(rng, f"clip{k}", k, (1.0, 6.0)))

    (root / "json").mkdir()
    for name, rows in records.items():
        (root / "json" / table[name][0]).write_text(json.dumps(rows))
    # the same tree under its own task table (from_root), with the gifs as data type "gif"
    own = {name: list(row) for name, row in table.items()}
    own["Object Shuffle"][2] = "gif"
    (root / "tasks.json").write_text(json.dumps(own))
    return root


def _official_table() -> dict:
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=["benchmark.root=unused"])
    return {k: list(v) for k, v in cfg.benchmark.table.items()}


def _overrides(bench: Path, model: Path, run_dir: Path, *extra: str) -> list[str]:
    tasks = "[" + ",".join(f"'{t}'" for t in TASKS) + "]"
    return [
        "model=pretrained", f"model.checkpoint={model}", "model.dtype=float32",
        f"benchmark.root={bench}", f"benchmark.tasks={tasks}", f"run_dir={run_dir}",
        "benchmark.num_frames=4", "benchmark.max_new_tokens=6", *extra,
    ]


def _evaluate(bench: Path, model: Path, run_dir: Path, *extra: str) -> dict:
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=_overrides(bench, model, run_dir, *extra))
    return run(cfg)


def _outputs(run_dir: Path) -> dict[str, str | None]:
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return {row["id"]: row["output"] for row in rows}


def _cache_lines(run_dir: Path) -> list[dict]:
    """Every complete cache record (a torn line left by a crash is not one)."""
    records = []
    for path in sorted((run_dir / "cache").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# --------------------------------------------------------------------------- protocol


def test_frame_indices_is_the_official_formula():
    assert mvbench.frame_indices is video.frame_indices
    # unbounded video, 64 frames at 8 fps: seg = 63/8 = 7.875, int(3.9375 + round(7.875 i))
    assert mvbench.frame_indices(8, 8, 63) == [3, 11, 19, 27, 35, 42, 50, 58]
    # bounded 1.0-3.5 s: frames 8..28, seg = 5
    assert mvbench.frame_indices(4, 8, 63, bound=(1.0, 3.5)) == [10, 15, 20, 25]
    # frame folder 00001..00030 at 3 fps, first_idx 1: seg = 29/4 = 7.25, round(14.5) = 14
    assert mvbench.frame_indices(4, 3, 30, first_idx=1) == [4, 11, 18, 26]
    # bounded frame folder 2-6 s: files 6..18, seg = 3
    assert mvbench.frame_indices(4, 3, 30, bound=(2.0, 6.0), first_idx=1) == [7, 10, 13, 16]
    # a start before the first file is clipped to first_idx; round(2.5) = 2
    assert mvbench.frame_indices(2, 3, 30, bound=(-1.0, 2.0), first_idx=1) == [2, 4]


@pytest.mark.parametrize(
    ("pred", "gt", "correct"),
    [
        ("(A) apple", "(A) apple", True),
        ("(A)", "(A) apple", True),  # the letter alone
        ("(A", "(A) apple", True),  # the model stopped after the letter
        ("(a) Apple", "(A) apple", True),  # case
        ("(A).", "(A) apple", True),  # trailing '.'
        ("(A) apple", "(A) apple.", True),
        ("(B) banana", "(A) apple", False),
        ("(B)", "(A) apple", False),
        ("(", "(A) apple", False),  # bare '(' matches in the original: the letter guard rejects it
        ("( A) apple", "(A) apple", False),
        ("", "(A) apple", False),
        ("(AB)", "(A) apple", False),
        ("(apple)", "(A) apple", False),
    ],
)
def test_check_answer(pred, gt, correct):
    assert mvbench.check_answer(pred, gt) is correct


def test_prediction_keeps_the_first_line_and_puts_back_the_paren():
    assert mvbench.prediction("A) apple\nBecause the video shows", "(") == "(A) apple"
    assert mvbench.prediction("  B) x  \n", "(") == "(B) x"
    assert mvbench.prediction("", "(") == "("


def test_official_prompt(bench, tiny_llama):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("eval", overrides=[f"benchmark.root={bench}", "benchmark.tasks=['Action Sequence']"])
    model = TCLlava.from_pretrained(tiny_llama)
    tasks = mvbench.load_task_table(cfg.benchmark)
    assert list(tasks) == ["Action Sequence"] and tasks["Action Sequence"].bound
    first = mvbench.load_questions(cfg.benchmark, tasks, model.tokenizer)[0]
    record = json.loads((bench / "json" / "action_sequence.json").read_text())[0]
    options = "\n".join(f"({'ABCD'[k]}) {c}" for k, c in enumerate(record["candidates"]))
    system = cfg.benchmark.prompt.system
    assert system.startswith("Carefully watch the video") and system.endswith("addresses the question.")
    assert first.item.prompt == (
        f"{system} USER: <image>\nQuestion: {record['question']}\nOptions:\n{options}\n"
        "Only give the best option. ASSISTANT: Best option:("
    )
    assert first.gt == f"(A) {record['answer']}" and record["candidates"][0] == record["answer"]
    assert first.item.bound == (0.5, 3.0)
    assert first.item.media == str(bench / "video" / "star/Charades_v1_480" / "seq0.mp4")


# --------------------------------------------------------------------------- end to end


def test_end_to_end_counts_failures_and_frames(bench, lively, tmp_path, monkeypatch):
    seen = {}

    def spy(path, num_frames, strategy, bound, backend, **kwargs):
        frames, indices = video.sample_frames(path, num_frames, strategy, bound, backend, **kwargs)
        seen[Path(path).name] = indices
        return frames, indices

    monkeypatch.setattr(runner, "sample_frames", spy)
    run_dir = tmp_path / "run"
    results = _evaluate(bench, lively, run_dir, "benchmark.decode.num_workers=0", "benchmark.batch_size=3")

    sizes = {"Action Sequence": 4, "Action Antonym": 2, "Object Shuffle": 2, "Episodic Reasoning": 2}
    assert list(results["tasks"]) == list(sizes)
    for task, n in sizes.items():
        counts = results["tasks"][task]
        assert counts["total"] + counts["failed"] == n
        assert 0 <= counts["correct"] <= counts["total"]
    assert results["tasks"]["Action Sequence"]["failed"] == 1
    assert results["tasks"]["Action Antonym"]["failed"] == 1
    avg = results["Avg"]
    assert (avg["total"], avg["failed"]) == (NUM_ITEMS - 2, 2)
    assert avg["correct"] == sum(c["correct"] for c in results["tasks"].values())
    assert avg["accuracy"] == pytest.approx(100 * avg["correct"] / avg["total"])
    reasons = {item["video"]: item["reason"] for item in results["failed_items"]}
    assert set(map(lambda p: Path(p).name, reasons)) == {CORRUPT, MISSING}
    assert all(str(bench) in reason for reason in reasons.values())  # the reason names the file

    # the official frames: bounded mp4 (32 frames at 8 fps), bounded frame folder (24 files at 3 fps)
    assert seen["seq0.mp4"] == mvbench.frame_indices(4, FPS, 31, (0.5, 3.0))
    assert seen["clip0"] == mvbench.frame_indices(4, 3, 24, (1.0, 6.0), first_idx=1)
    assert seen["shuffle0.gif"] == mvbench.frame_indices(4, FPS, 11)

    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["Avg"] == avg and saved["settings"]["num_frames"] == 4
    assert saved["settings"]["prompt"]["answer_prefix"] == "Best option:("
    assert saved["settings"]["model"]["checkpoint"] == str(lively)
    assert set(saved["settings"]["git"]) == {"commit", "dirty"}
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == NUM_ITEMS
    assert sum(r["correct"] is True for r in rows) == avg["correct"]
    assert all((r["failed"] is None) == (r["pred"] is not None) for r in rows)
    assert all(r["pred"].startswith("(") for r in rows if r["pred"] is not None)
    table = (run_dir / "results.md").read_text()
    assert "| Episodic Reasoning |" in table and "| **Avg** |" in table
    assert (run_dir / "results.png").read_bytes()[:4] == b"\x89PNG"
    outputs = [r["output"] for r in rows if r["output"] is not None]
    assert len(set(outputs)) > 1, "the model answers everything alike: the equality tests below would be vacuous"


@pytest.fixture(scope="module")
def single(bench, lively, tmp_path_factory) -> Path:
    """Reference run: batch size 1, no workers, one process, the dataset's own task table."""
    run_dir = tmp_path_factory.mktemp("single")
    _evaluate(bench, lively, run_dir, "benchmark.task_table=from_root", "benchmark.batch_size=1",
              "benchmark.decode.num_workers=0")
    return run_dir


def test_batch_size_8_equals_batch_size_1(bench, lively, single, tmp_path):
    run_dir = tmp_path / "batched"
    results = _evaluate(bench, lively, run_dir, "benchmark.task_table=from_root", "benchmark.batch_size=8",
                        "benchmark.decode.num_workers=2")
    assert _outputs(run_dir) == _outputs(single)
    assert results["Avg"] == json.loads((single / "results.json").read_text())["Avg"]


def test_two_processes_equal_one(bench, lively, single, tmp_path, cache_dir):
    run_dir = tmp_path / "two"
    args = _overrides(bench, lively, run_dir, "benchmark.task_table=from_root", "benchmark.batch_size=2",
                      "benchmark.decode.num_workers=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TC_LLAVA_CACHE": str(cache_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tc_llava.eval", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank_files = sorted((run_dir / "cache").glob("*.rank*.jsonl"))
    assert [p.name.split(".")[-2] for p in rank_files] == ["rank0", "rank1"], "two ranks must have generated"
    ids = [{json.loads(line)["id"] for line in p.read_text().splitlines()} for p in rank_files]
    assert ids[0] and ids[1] and not ids[0] & ids[1] and len(ids[0] | ids[1]) == NUM_ITEMS
    assert _outputs(run_dir) == _outputs(single)
    assert json.loads((run_dir / "results.json").read_text())["settings"]["num_processes"] == 2


def test_interrupted_run_resumes(bench, lively, single, tmp_path, monkeypatch):
    generated = []
    original = TCLlava.generate

    def counting(self, input_ids, *args, **kwargs):
        generated.append(len(input_ids))
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(TCLlava, "generate", counting)
    run_dir = tmp_path / "resume"
    common = ("benchmark.task_table=from_root", "benchmark.batch_size=4", "benchmark.decode.num_workers=0")
    first = _evaluate(bench, lively, run_dir, *common, "benchmark.limit=1")  # the "interrupted" run
    assert first["Avg"]["total"] + first["Avg"]["failed"] == len(TASKS)
    assert sum(generated) == len(TASKS)
    cache = next((run_dir / "cache").glob("*.rank0.jsonl"))
    with cache.open("a") as f:
        f.write('{"id": "Object Shuffle/1", "item": "torn mid-wr')  # a crash in the middle of a write

    generated.clear()
    second = _evaluate(bench, lively, run_dir, *common)
    assert sum(generated) == NUM_ITEMS - 2 - len(TASKS)  # only the new, decodable items
    assert second["Avg"] == json.loads((single / "results.json").read_text())["Avg"]
    assert _outputs(run_dir) == _outputs(single)
    lines = _cache_lines(run_dir)
    answered = [r["id"] for r in lines if r["failed"] is None]
    assert len(answered) == len(set(answered)) == NUM_ITEMS - 2  # nothing generated twice

    generated.clear()
    third = _evaluate(bench, lively, run_dir, *common)
    assert generated == [] and third["Avg"] == second["Avg"]
    assert sum(r["failed"] is not None for r in _cache_lines(run_dir)) == 4  # failures are retried per run

    generated.clear()
    _evaluate(bench, lively, run_dir, *common, "benchmark.prompt.instruction=' Answer with the letter.'")
    assert sum(generated) == NUM_ITEMS - 2  # a changed prompt never reuses old outputs


def test_a_model_re_exported_to_the_same_path_is_not_served_from_the_cache(bench, lively, single, tmp_path):
    """Another model saved over the evaluated checkpoint: the re-run generates again, as a fresh run would."""
    checkpoint, run_dir = tmp_path / "export", tmp_path / "eval"
    shutil.copytree(lively, checkpoint)
    common = ("benchmark.task_table=from_root", "benchmark.batch_size=4", "benchmark.decode.num_workers=0")
    _evaluate(bench, checkpoint, run_dir, *common)
    assert _outputs(run_dir) == _outputs(single)
    save_lively(lively, checkpoint, seed=1)
    _evaluate(bench, checkpoint, run_dir, *common)
    fresh = tmp_path / "fresh"
    _evaluate(bench, checkpoint, fresh, *common)
    assert _outputs(run_dir) == _outputs(fresh) != _outputs(single)


def test_scores_follow_the_cached_outputs(bench, lively, single, tmp_path, monkeypatch):
    """Outputs rewritten in a copied cache (right letter, a bare '(' after priming, a wrong letter)."""
    monkeypatch.setattr(TCLlava, "generate", lambda *a, **k: pytest.fail("everything is cached"))
    run_dir = tmp_path / "rescored"
    shutil.copytree(single / "cache", run_dir / "cache")
    gts = {r["id"]: r["gt"] for r in map(json.loads, (single / "predictions.jsonl").read_text().splitlines())}
    expected = {}
    for path in (run_dir / "cache").glob("*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for k, record in enumerate(records):
            if record["failed"] is None:
                gt = gts[record["id"]]
                wrong = "B" if gt[1] != "B" else "C"
                record["output"] = [gt[1:] + "\nthe rest", "", f"{wrong}) x"][k % 3]
                expected[record["id"]] = k % 3 == 0
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = _evaluate(bench, lively, run_dir, "benchmark.task_table=from_root", "benchmark.decode.num_workers=0")
    assert results["Avg"]["correct"] == sum(expected.values()) > 0
    assert results["Avg"]["total"] == len(expected) == NUM_ITEMS - 2
    for task, counts in results["tasks"].items():
        assert counts["correct"] == sum(ok for i, ok in expected.items() if i.startswith(task + "/"))


# --------------------------------------------------------------------------- checks before the model


@pytest.mark.parametrize(("override", "expected"), [
    ("benchmark.num_frames=0", "benchmark.num_frames=0: expected an integer >= 1"),
    ("benchmark.decode.num_workers=-1", "benchmark.decode.num_workers=-1: expected an integer >= 0"),
    ("benchmark.decode.frame_fps=0", r"benchmark.decode.frame_fps=0: expected a number > 0"),
])
def test_generation_settings_checked_before_the_model_loads(bench, lively, override, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "model_from_config", lambda cfg: pytest.fail("the model was built before the check"))
    with pytest.raises(ValueError, match=expected):
        _evaluate(bench, lively, tmp_path / "run", override)

PATH_CASES = [  # (what is removed, relative to the root ("": the root), extra overrides, what the error expects)
    ("", (), "the MVBench directory holding json/ and video/"),
    ("json/action_antonym.json", (), r"the questions of task 'Action Antonym' \(benchmark\.json_dir=json\)"),
    ("video/perception/videos", (),
     r"the media of task 'Object Shuffle' \(benchmark\.video_dir=video, then its prefix\)"),
    ("tasks.json", ("benchmark.task_table=from_root",), r"the task table \(benchmark\.task_table=from_root\)"),
]


@pytest.mark.parametrize(("removed", "extra", "expected"), PATH_CASES)
def test_paths_checked_before_the_model_loads(lively, removed, extra, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "model_from_config", lambda cfg: pytest.fail("the model was built before the check"))
    root = tmp_path / "MVBench"
    table = {name: row for name, row in _official_table().items() if name in TASKS}
    for json_file, prefix, *_ in table.values():
        (root / "json").mkdir(parents=True, exist_ok=True)
        (root / "json" / json_file).write_text("[]")
        (root / "video" / prefix).mkdir(parents=True, exist_ok=True)
    (root / "tasks.json").write_text(json.dumps(table))
    missing = root / removed
    shutil.rmtree(missing) if missing.is_dir() else missing.unlink()
    with pytest.raises(FileNotFoundError) as info:
        _evaluate(root, lively, tmp_path / "run", *extra)
    assert re.fullmatch(rf"benchmark\.root={re.escape(str(root))}: {re.escape(str(missing))} not found; "
                        rf"expected {expected}", str(info.value)), str(info.value)


def test_a_run_that_answers_nothing_keeps_the_earlier_results(bench, lively, tmp_path):
    run_dir = tmp_path / "run"
    common = ("benchmark.limit=1", "benchmark.decode.num_workers=0")
    assert _evaluate(bench, lively, run_dir, *common)["Avg"]["total"] == len(TASKS)
    outputs = ("results.json", "results.md", "results.png", "predictions.jsonl")
    kept = {name: (run_dir / name).read_bytes() for name in outputs}

    # the same questions over a tree whose media folders exist but are empty: every item fails
    empty = tmp_path / "empty"
    shutil.copytree(bench / "json", empty / "json")
    for name, row in _official_table().items():
        if name in TASKS:
            (empty / "video" / row[1]).mkdir(parents=True)
    with pytest.raises(RuntimeError, match=r"mvbench: no question could be answered, 4 failed \(e\.g\. .*seq0\.mp4: "
                                           r".*\); the results in .* were left as they were"):
        _evaluate(empty, lively, run_dir, *common)
    assert {name: (run_dir / name).read_bytes() for name in outputs} == kept
