"""NExT-QA multiple choice (Xiao et al., CVPR 2021) on the multiple-choice runner.

Files of the official release: ``{root}/{annotation}`` (``val.csv`` or ``test.csv``: ``video,
frame_count, width, height, question, answer, qid, type, a0..a4`` with ``answer`` the index of
the right option), ``{root}/{video_map}`` (``map_vid_vidorID.json``: video id -> ``folder/id``)
and ``{root}/{video_dir}/<folder>/<id>.mp4``. Questions are grouped as NExT-QA reports them,
by the first letter of ``type``: Causal (CW, CH), Temporal (TN, TC, TP), Descriptive (DL, DC,
DO), plus ``Avg`` over all. NExT-QA ships no prompt; the configured one is MVBench's, which
VideoChat2 used for NExT-QA (docs/benchmarks.md, and how lmms-eval's ``nextqa_mc_test`` asks).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig

from tc_llava.data import mcq as mcq_text
from tc_llava.data.templates import DEFAULT_IMAGE_TOKEN, image_token_of
from tc_llava.eval import mcq
from tc_llava.eval.mcq import Question
from tc_llava.eval.runner import GenerationSettings, Item, require_path

FAMILIES = {"C": "Causal", "T": "Temporal", "D": "Descriptive"}
OPTIONS = ("a0", "a1", "a2", "a3", "a4")
COLUMNS = ("video", "question", "answer", "qid", "type", *OPTIONS)


def _paths(cfg: DictConfig) -> tuple[Path, Path, Path]:
    root, where = Path(cfg.root), f"benchmark.root={cfg.root}"
    require_path(root, "directory", where, "the NExT-QA directory")
    annotation, video_map = root / cfg.annotation, root / cfg.video_map
    require_path(annotation, "file", where, f"the questions (benchmark.annotation={cfg.annotation}, a NExT-QA csv)")
    require_path(video_map, "file", where, f"the video map (benchmark.video_map={cfg.video_map})")
    require_path(root / cfg.video_dir, "directory", where, f"the videos (benchmark.video_dir={cfg.video_dir})")
    return root, annotation, video_map


def _row(row: dict[str, str], where: str) -> tuple[str, list[str], int]:
    """The family, options and answer index of one csv row, checked."""
    missing = [c for c in COLUMNS if not (row.get(c) or "").strip()]
    if missing:
        raise ValueError(f"{where}: column(s) {missing} empty or absent; expected {list(COLUMNS)}")
    family = FAMILIES.get(row["type"].strip()[:1])
    if family is None:
        raise ValueError(f"{where}: type {row['type']!r} does not start with one of {list(FAMILIES)}")
    answer = row["answer"].strip()
    if not answer.isdigit() or int(answer) >= len(OPTIONS):
        raise ValueError(f"{where}: answer {answer!r} must be the index 0-{len(OPTIONS) - 1} of the right option")
    return family, [row[o].strip() for o in OPTIONS], int(answer)


def load_questions(cfg: DictConfig, image_token: str) -> tuple[list[Question], list[str], list[Path]]:
    """The (limited, per family) questions, the families to report and the annotation files read."""
    root, annotation, video_map = _paths(cfg)
    folders = json.loads(video_map.read_text(encoding="utf-8"))
    if not isinstance(folders, dict):
        raise ValueError(f"{video_map}: expected an object mapping video ids to 'folder/id'")
    tasks = mcq.select_tasks(cfg, {name: None for name in FAMILIES.values()})
    questions: list[Question] = []
    taken = {t: 0 for t in tasks}
    with annotation.open(encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            where = f"{annotation} line {line}"
            family, options, answer = _row(row, where)
            if family not in taken or (cfg.limit is not None and taken[family] >= cfg.limit):
                continue
            taken[family] += 1
            video = row["video"].strip()
            if video not in folders:
                raise ValueError(f"{where}: video {video!r} is not in {video_map}")
            media = root / cfg.video_dir / f"{folders[video]}{cfg.video_extension}"
            prompt = mcq.question_prompt(cfg, row["question"].strip(), options, image_token)
            questions.append(Question(family, Item(f"{family}/{video}_{row['qid'].strip()}", str(media), prompt),
                                      row["question"].strip(), tuple(options),
                                      mcq_text.OPTION.format(letter=mcq_text.letter(answer), candidate=options[answer])))
    return questions, tasks, [annotation, video_map]


def check_inputs(cfg: DictConfig, run_dir: str | Path, state: PartialState | None) -> None:
    """Generation settings, the files and every csv row, before the model loads."""
    GenerationSettings.from_benchmark(cfg)
    load_questions(cfg, DEFAULT_IMAGE_TOKEN)


def evaluate(model: Any, cfg: DictConfig, run_dir: str | Path, state: PartialState) -> dict[str, Any] | None:
    """NExT-QA MC through :func:`tc_llava.eval.mcq.evaluate`: per family and ``Avg``."""
    questions, tasks, files = load_questions(cfg, image_token_of(model.tokenizer))
    return mcq.evaluate(model, cfg, run_dir, state, questions, tasks, files,
                        {"root": str(cfg.root), "annotation": cfg.annotation})
