"""Seeded synthetic videos of coloured shapes, with temporal and static question families.

The tiny end-to-end runs need a task a small model can learn in minutes where time order
measurably matters. Task families (the 5th entry of each ``tasks.json`` row):

- ``temporal`` tasks cannot be answered from any single frame: ``order`` (which colour
  appears first/second/third/last; three objects in turn), ``direction`` (where one object
  moves), ``count`` (how many objects appear one after another, 1-4) and ``change`` (the
  colour before/after an object changes). ``order``, ``direction`` and ``change`` flip
  their answer when the video is reversed, so they reward a model that knows frame order;
  ``count`` needs frames told apart but not ordered.
- ``static`` controls are answerable from any one frame: ``color`` and ``shape`` of one
  still object. A variant that helps only temporal tasks should leave them unchanged.

Options are listed in a fixed vocabulary order by default (``option_order="canonical"``:
palette order for colours, left/right/up/down, one..four, circle/square/triangle/star),
as MVBench lists e.g. counts ascending. Measured on the tiny model: with shuffled options
the answer-letter lookup (find the answer among the options, emit its letter) alone kept
it at chance on every task after 3,000 steps, while open-ended answers were learned; in
canonical order the letter is tied to the answer (fully for direction/shape/count, via the
answer's rank among the listed colours otherwise) and the benchmark measures the video.
``option_order="shuffled"`` gives MVBench-style random order (same scenes for a seed).

Objects are large flat-colour blobs from a palette that survives H.264 4:2:0 compression;
events span at least three frames so MVBench's 4- to 16-segment sampling sees all of them.
Outputs (real mp4 files, written with PyAV) under ``out``:

- ``train.json``: VideoChat2-IT ``[{"video": "videos/00000.mp4", "QA": [{"i", "q", "a"}]}]``
  with a multiple-choice turn in MVBench's own text (:mod:`tc_llava.data.mcq`, as the
  evaluator asks it; answer ``Best option:(B) red``, so a model primed with ``Best option:(``
  at evaluation continues the way it was trained) and an open-ended turn (answer: the bare word);
- ``mvbench/json/<task>.json``, ``mvbench/video/<task>/``, and ``mvbench/tasks.json``
  mapping a task name to ``[json, prefix, "video", false, family]`` as MVBench's table does;
- ``rl.json``: RL prompts with verifiable answers on the training videos (``configs/prompts/synthetic_records.yaml``),
  VideoChat2-IT records with an ``answer_type``: every video's multiple-choice question (``mcq``), and for
  the ``count`` videos "How many shapes appear?" (``number``), for the ``order`` and ``count`` videos of two or more
  shapes "During which seconds is the <colour> <shape> visible?" (``span``, the frames it is drawn in at ``fps``).
  They are read off the scenes, with no random draw, so the other files do not change.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from tc_llava.data import mcq

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 240),
    "yellow": (245, 230, 40),
    "purple": (140, 40, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 220, 230),
}
SHAPES = ("circle", "square", "triangle", "star")
DIRECTIONS = ("left", "right", "up", "down")
NUMBERS = ("one", "two", "three", "four")
VOCABULARY = (*COLORS, *DIRECTIONS, *NUMBERS, *SHAPES)  # the canonical option order
OPTION_ORDERS = ("canonical", "shuffled")
BACKGROUND = (24, 24, 24)
# task -> (MVBench-style task name, family)
TASKS: dict[str, tuple[str, str]] = {
    "order": ("Appearance Order", "temporal"),
    "direction": ("Moving Direction", "temporal"),
    "count": ("Object Count", "temporal"),
    "change": ("Color Change", "temporal"),
    "color": ("Object Color", "static"),
    "shape": ("Object Shape", "static"),
}

Item = tuple[str, str, float, float]  # shape, colour name, centre x, centre y


@dataclass(frozen=True)
class Sample:
    """One video (as per-frame object lists) and its multiple-choice question."""

    task: str
    scene: tuple[tuple[Item, ...], ...]
    question: str
    candidates: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class SyntheticPaths:
    """Where ``generate`` wrote things; video paths in the JSONs are relative to these roots."""

    root: Path
    train_json: Path
    rl_json: Path
    mvbench_dir: Path
    mvbench_tasks: Path
    mvbench_json: dict[str, Path]


def _radius(size: int) -> float:
    return 0.16 * size


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.9 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + 1.2 * r * np.cos(a), cy + 1.2 * r * np.sin(a)) for a in angles]
    angles = np.deg2rad(np.arange(10) * 36 - 90)
    radii = np.where(np.arange(10) % 2 == 0, 1.35 * r, 0.6 * r)
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]


def render(scene: tuple[tuple[Item, ...], ...], size: int) -> np.ndarray:
    """Draw each frame's objects on the plain background: uint8 ``[T, size, size, 3]``."""
    r = _radius(size)
    frames = []
    for items in scene:
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for shape, color, cx, cy in items:
            if shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
            else:
                draw.polygon(_polygon(shape, cx, cy, r), fill=COLORS[color])
        frames.append(np.asarray(image))
    return np.stack(frames)


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Lossless H.264 yuv420p mp4 (High 4:4:4 Predictive profile).

    Lossless because x264's bitstream is not reproducible here under CPU load (lossy
    runs of one seed decoded up to 21 levels apart); qp 0 makes the decoded pixels the
    rendered ones whatever the encoder decides, so one seed gives one dataset.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "0", "preset": "veryfast", "threads": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _windows(num_frames: int, k: int) -> list[range]:
    """Equal contiguous windows, so every event covers >= 3 frames of a 16-frame video."""
    edges = np.round(np.linspace(0, num_frames, k + 1)).astype(int)
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:])]


class _Scene:
    """Random draws shared by the task builders, all from one generator."""

    def __init__(self, rng: np.random.Generator, num_frames: int, size: int, option_order: str = "canonical"):
        self.rng, self.num_frames, self.size, self.option_order = rng, num_frames, size, option_order
        margin = 1.4 * _radius(size) + 1
        self.lo, self.hi = margin, size - margin

    def colors(self, k: int) -> list[str]:
        return [str(c) for c in self.rng.choice(list(COLORS), size=k, replace=False)]

    def shape(self) -> str:
        return str(self.rng.choice(SHAPES))

    def point(self) -> tuple[float, float]:
        x, y = self.rng.uniform(self.lo, self.hi, size=2)
        return float(x), float(y)

    def options(
        self, answer: str, pool: tuple[str, ...] | list[str], k: int, include: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        """``answer`` plus ``include`` plus random others from ``pool``, shuffled or in vocabulary order.

        The shuffle is drawn either way, so both orders give the same scenes for a seed.
        """
        chosen = list(dict.fromkeys([answer, *include]))
        rest = [p for p in pool if p not in chosen]
        chosen += [str(p) for p in self.rng.choice(rest, size=k - len(chosen), replace=False)]
        shuffled = [str(c) for c in self.rng.permutation(chosen)]
        return tuple(sorted(shuffled, key=VOCABULARY.index) if self.option_order == "canonical" else shuffled)

    def sequence(self, colors: list[str]) -> tuple[tuple[Item, ...], ...]:
        """One object per window, each with its own shape and place."""
        frames: list[tuple[Item, ...]] = [()] * self.num_frames
        for color, window in zip(colors, _windows(self.num_frames, len(colors))):
            item = (self.shape(), color, *self.point())
            for t in window:
                frames[t] = (item,)
        return tuple(frames)

    def still(self, shape: str, color: str) -> tuple[tuple[Item, ...], ...]:
        item = (shape, color, *self.point())
        return tuple((item,) for _ in range(self.num_frames))


def _order(s: _Scene) -> Sample:
    colors = s.colors(3)
    position = int(s.rng.integers(4))
    ordinal = ("first", "second", "third", "last")[position]
    answer = colors[min(position, 2)]
    return Sample(
        "order", s.sequence(colors), f"Which color appears {ordinal}?", s.options(answer, colors, 3), answer
    )


def _direction(s: _Scene) -> Sample:
    (color,), shape = s.colors(1), s.shape()
    answer = str(s.rng.choice(DIRECTIONS))
    span = s.hi - s.lo
    a = s.rng.uniform(s.lo, s.lo + 0.15 * span)  # travel >= 70% of the free span
    b = s.rng.uniform(s.hi - 0.15 * span, s.hi)
    start, end = (a, b) if answer in ("right", "down") else (b, a)
    fixed = s.rng.uniform(s.lo, s.hi)
    path = np.linspace(start, end, s.num_frames)
    points = [(p, fixed) if answer in ("left", "right") else (fixed, p) for p in path]
    scene = tuple(((shape, color, float(x), float(y)),) for x, y in points)
    question = f"Which direction does the {color} {shape} move?"
    return Sample("direction", scene, question, s.options(answer, DIRECTIONS, 4), answer)


def _count(s: _Scene) -> Sample:
    k = int(s.rng.integers(1, len(NUMBERS) + 1))
    answer = NUMBERS[k - 1]
    scene = s.sequence(s.colors(k))
    return Sample("count", scene, "How many shapes appear in the video?", s.options(answer, NUMBERS, 4), answer)


def _change(s: _Scene) -> Sample:
    (before, after), shape = s.colors(2), s.shape()
    x, y = s.point()
    switch = int(s.rng.integers(s.num_frames // 3, 2 * s.num_frames // 3 + 1))
    scene = tuple(((shape, before if t < switch else after, x, y),) for t in range(s.num_frames))
    if s.rng.random() < 0.5:
        question, answer = f"What color does the {shape} change to?", after
    else:
        question, answer = f"What color is the {shape} before it changes?", before
    return Sample("change", scene, question, s.options(answer, list(COLORS), 4, (before, after)), answer)


def _color(s: _Scene) -> Sample:
    (color,), shape = s.colors(1), s.shape()
    return Sample("color", s.still(shape, color), f"What color is the {shape}?", s.options(color, list(COLORS), 4), color)


def _shape(s: _Scene) -> Sample:
    (color,), shape = s.colors(1), s.shape()
    return Sample("shape", s.still(shape, color), "What shape is in the video?", s.options(shape, SHAPES, 4), shape)


BUILDERS: dict[str, Callable[[_Scene], Sample]] = {
    "order": _order,
    "direction": _direction,
    "count": _count,
    "change": _change,
    "color": _color,
    "shape": _shape,
}


def make_sample(
    task: str, rng: np.random.Generator, num_frames: int = 16, size: int = 64, option_order: str = "canonical"
) -> Sample:
    """Draw one sample of ``task`` (a key of ``TASKS``)."""
    return BUILDERS[task](_Scene(rng, num_frames, size, option_order))


def _unique_samples(
    tasks: list[str], rng: np.random.Generator, seen: set, num_frames: int, size: int, option_order: str
) -> list[Sample]:
    """Draw one sample per entry of ``tasks``, redrawing any scene already used elsewhere."""
    samples = []
    for task in tasks:
        sample = make_sample(task, rng, num_frames, size, option_order)
        while sample.scene in seen:
            sample = make_sample(task, rng, num_frames, size, option_order)
        seen.add(sample.scene)
        samples.append(sample)
    return samples


def generate(
    out_dir: str | Path,
    num_train: int,
    num_eval_per_task: int,
    seed: int = 0,
    num_frames: int = 16,
    size: int = 64,
    fps: int = 8,
    tasks: tuple[str, ...] = tuple(TASKS),
    option_order: str = "canonical",
) -> SyntheticPaths:
    """Write the training set and the MVBench-layout evaluation set under ``out_dir``.

    Train and each eval task draw from independent child seeds of ``seed``, and no scene
    appears twice anywhere, so evaluation videos are never training videos.
    """
    if size % 2 or size < 32:
        raise ValueError(f"size must be even and >= 32 (yuv420p, visible shapes), got {size}")
    if num_frames < 8:
        raise ValueError(f"num_frames must be >= 8 so that every event spans frames, got {num_frames}")
    if option_order not in OPTION_ORDERS:
        raise ValueError(f"option_order must be one of {OPTION_ORDERS}, got {option_order!r}")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected some of {list(TASKS)}")
    root = Path(out_dir)
    train_rng, *eval_rngs = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(1 + len(tasks)))
    seen: set = set()

    mvbench = root / "mvbench"
    table, task_json = {}, {}
    for task, rng in zip(tasks, eval_rngs):
        records = []
        for k, sample in enumerate(_unique_samples([task] * num_eval_per_task, rng, seen, num_frames, size, option_order)):
            name = f"{task}_{k:04d}.mp4"
            write_mp4(mvbench / "video" / task / name, render(sample.scene, size), fps)
            records.append(
                {"video": name, "question": sample.question, "candidates": list(sample.candidates), "answer": sample.answer}
            )
        task_json[task] = mvbench / "json" / f"{task}.json"
        _dump(task_json[task], records)
        task_name, family = TASKS[task]
        table[task_name] = [f"{task}.json", f"{task}/", "video", False, family]
    _dump(mvbench / "tasks.json", table)

    order = [tasks[i % len(tasks)] for i in range(num_train)]
    order = [order[i] for i in train_rng.permutation(num_train)]
    entries, prompts = [], []
    for k, sample in enumerate(_unique_samples(order, train_rng, seen, num_frames, size, option_order)):
        video = f"videos/{k:05d}.mp4"
        write_mp4(root / video, render(sample.scene, size), fps)
        mc = {
            "i": mcq.SYSTEM,
            "q": mcq.question_block(sample.question, sample.candidates),
            "a": mcq.ANSWER_LEAD + mcq.ground_truth(sample.answer, sample.candidates),
        }
        entries.append({"video": video, "QA": [mc, {"i": "", "q": sample.question, "a": sample.answer}]})
        prompts += [{"id": f"{k:05d}_{answer_type}", "video": video, "QA": [qa], "answer_type": answer_type}
                    for answer_type, qa in verifiable_questions(sample, k, fps).items()]
    _dump(root / "train.json", entries)
    _dump(root / "rl.json", prompts)
    return SyntheticPaths(root, root / "train.json", root / "rl.json", mvbench, mvbench / "tasks.json", task_json)


def verifiable_questions(sample: Sample, k: int, fps: int) -> dict[str, dict[str, str]]:
    """The RL questions of training sample ``k`` by answer type (module comment), as VideoChat2-IT QA items."""
    questions = {"mcq": {"i": mcq.SYSTEM, "q": mcq.question_block(sample.question, sample.candidates),
                         "a": mcq.ground_truth(sample.answer, sample.candidates)}}
    if sample.task == "count":
        questions["number"] = {"i": "", "q": "How many shapes appear in the video?",
                               "a": str(NUMBERS.index(sample.answer) + 1)}
    shown = list(dict.fromkeys(item[:2] for frame in sample.scene for item in frame))  # (shape, colour) in order
    if sample.task in ("order", "count") and len(shown) > 1:
        shape, color = shown[k % len(shown)]
        frames = [t for t, frame in enumerate(sample.scene) if any(item[:2] == (shape, color) for item in frame)]
        questions["span"] = {"i": "", "q": f"During which seconds is the {color} {shape} visible?",
                             "a": f"{frames[0] / fps:g} - {(frames[-1] + 1) / fps:g} seconds"}
    return questions


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    """``tc-llava-synth``: write a synthetic training set and MVBench-layout eval set."""
    parser = argparse.ArgumentParser(prog="tc-llava-synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-eval-per-task", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--option-order", default="canonical", choices=OPTION_ORDERS)
    args = parser.parse_args(argv)
    paths = generate(
        args.out, args.num_train, args.num_eval_per_task, args.seed, args.num_frames, args.size, args.fps,
        tuple(args.tasks), args.option_order,
    )
    print(f"train: {paths.train_json}\nmvbench: {paths.mvbench_tasks}\nrl prompts: {paths.rl_json}")


if __name__ == "__main__":
    main()
