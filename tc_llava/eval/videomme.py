"""Video-MME (Fu et al., CVPR 2025) on the multiple-choice runner, without or with subtitles.

Files of the official release (HF lmms-lab/Video-MME): ``{root}/{annotation}`` (the parquet
``videomme/test-00000-of-00001.parquet``, or the same rows as JSON / JSON lines; the GitHub
release's nesting ``{videoID, duration, questions: [...]}`` reads too), videos
``{root}/{video_dir}/<videoID>.mp4`` and subtitles ``{root}/{subtitle_dir}/<videoID>.srt``.
A row is ``{videoID, duration: short|medium|long, question_id, task_type, question, options:
["A. ...", ...], answer: "A"}``. Results are per duration bucket, as Video-MME reports them,
plus ``Avg``.

The prompt is the official one: "Select the best answer ... Respond with only the letter (A,
B, C, or D) of the correct option.", the question, the options as ``A. text``, then "The best
answer is:". With ``subtitles: true`` it is preceded by "This video's subtitles are listed
below:" and the subtitle lines shown while the sampled frames are (the official rule: only the
subtitles of the sampled frames); a video without a subtitle file gets no preamble.

Scoring is the official ``eval_your_results.py``'s (:func:`extract_answer`): the letter is read
from the whole output, so "The answer is A." counts as A, and an output with no letter A-D is
``unanswered``, left out of the accuracy as the official script leaves it out (and counted).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig

from tc_llava.data import mcq as mcq_text
from tc_llava.data.templates import DEFAULT_IMAGE_TOKEN, image_token_of
from tc_llava.data.video import frame_indices, require_regular_file
from tc_llava.eval import mcq
from tc_llava.eval.jsonl import load_records
from tc_llava.eval.mcq import Question
from tc_llava.eval.runner import GenerationSettings, Item, require_path

DURATIONS = ("short", "medium", "long")
FIELDS = ("videoID", "duration", "question_id", "question", "options", "answer")
_OPTION = re.compile(r"\s*([A-Z])[.)]\s*(.*)", re.S)
_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)")
_TAG = re.compile(r"<[^>]+>")
# The official script's answer prefixes, removed in this order before the letter search. Its list lacks two
# commas, so Python joins two pairs of its strings: the joined strings are what it removes, and so do we.
ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option isThe correct option is", "Best answer:Best option:")
_LETTER = re.compile("[ABCD]")
SCORING = ("Video-MME's eval_your_results.py: the first capital A-D of the output after removing its answer "
           "prefixes; outputs without one are unanswered and not in the accuracy")


def extract_answer(output: str) -> str:
    """The option letter the official Video-MME script reads from ``output``, "" if none.

    The output is stripped, the :data:`ANSWER_PREFIXES` are removed wherever they occur, and the
    first capital A, B, C or D left is the answer (the script's rule dropping outputs of more than
    ten words without such a letter changes nothing: they have none to find).
    """
    text = output.strip()
    for prefix in ANSWER_PREFIXES:
        text = text.replace(prefix, "")
    match = _LETTER.search(text)
    return match[0] if match else ""


def grade(output: str, question: Question) -> tuple[str, bool | None]:
    """The extracted letter and whether it is the answer's; None when no letter was found (unanswered)."""
    letter = extract_answer(output)
    return letter, (letter == question.gt[1] if letter else None)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The question rows of a parquet, JSON or JSON-lines file; nested ``questions`` are flattened."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); or convert it once: "
                             "python -c \"import pandas as p; p.read_parquet('IN').to_json('OUT.json', "
                             "orient='records')\" and set benchmark.annotation to the JSON") from None
        records = pq.read_table(path).to_pylist()
    else:
        records = load_records(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of question rows")
    rows = []
    for record in records:
        if isinstance(record, dict) and isinstance(record.get("questions"), list):  # the GitHub release's nesting
            shared = {k: v for k, v in record.items() if k != "questions"}
            rows += [{**shared, **q} for q in record["questions"]]
        else:
            rows.append(record)
    return rows


def _candidates(options: Any, answer: Any, where: str) -> tuple[list[str], int]:
    """Option texts without their ``A.`` labels, and the index of the answer letter."""
    if not (isinstance(options, list) and 2 <= len(options) <= 7 and all(isinstance(o, str) for o in options)):
        raise ValueError(f"{where}: 'options' must be a list of 2-7 strings, got {options!r:.80}")
    texts = []
    for k, option in enumerate(options):
        match = _OPTION.fullmatch(option)
        if not match or match[1] != mcq_text.letter(k):
            raise ValueError(f"{where}: option {k} {option!r:.40} must start with '{mcq_text.letter(k)}.'")
        texts.append(match[2].strip())
    letters = [mcq_text.letter(k) for k in range(len(texts))]
    if not isinstance(answer, str) or answer.strip() not in letters:
        raise ValueError(f"{where}: 'answer' must be one of {letters}, got {answer!r}")
    return texts, letters.index(answer.strip())


def _seconds(stamp: str) -> float:
    h, m, s, ms = (int(x) for x in _TIME.fullmatch(stamp.strip()).groups())
    return 3600 * h + 60 * m + s + ms / 1000


def read_srt(path: Path) -> list[tuple[float, float, str]]:
    """``(start_s, end_s, text)`` cues of an .srt file, markup tags removed."""
    cues = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")):
        lines = [line for line in block.strip().split("\n") if line.strip()]
        timing = next((k for k, line in enumerate(lines) if "-->" in line), None)
        if timing is None:
            continue
        start, end = lines[timing].split("-->")
        text = _TAG.sub("", " ".join(lines[timing + 1 :])).strip()
        if text and _TIME.fullmatch(start.strip()) and _TIME.fullmatch(end.strip()):
            cues.append((_seconds(start), _seconds(end), text))
    return cues


def frame_times(video: Path, num_frames: int) -> list[float]:
    """Times (s) of the segment-middle frames the runner samples from ``video``; [] if it cannot be opened.

    An unreadable video fails later as an item (counted, reported), so it only loses its subtitles here.
    """
    import av

    try:
        require_regular_file(video)  # a named pipe would block the open
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = stream.frames or int(float(container.duration or 0) / 1e6 * fps)
    except (OSError, IndexError, ValueError, av.FFmpegError):  # NotRegularFileError is a ValueError
        return []
    if fps <= 0 or frames < 1:
        return []
    return [i / fps for i in frame_indices(num_frames, fps, frames - 1)]


def subtitles_at(cues: Sequence[tuple[float, float, str]], times: Sequence[float]) -> str:
    """The cues shown at any of ``times``, in order, each once, one per line."""
    shown = [text for start, end, text in cues if any(start <= t <= end for t in times)]
    return "\n".join(dict.fromkeys(shown))


def _paths(cfg: DictConfig) -> tuple[Path, Path]:
    root, where = Path(cfg.root), f"benchmark.root={cfg.root}"
    require_path(root, "directory", where, "the Video-MME directory")
    annotation = root / cfg.annotation
    require_path(annotation, "file", where, f"the questions (benchmark.annotation={cfg.annotation})")
    require_path(root / cfg.video_dir, "directory", where, f"the videos (benchmark.video_dir={cfg.video_dir})")
    if cfg.subtitles:
        require_path(root / cfg.subtitle_dir, "directory", where,
                     f"the .srt subtitles (benchmark.subtitle_dir={cfg.subtitle_dir}; benchmark.subtitles=true)")
    return root, annotation


def load_questions(cfg: DictConfig, image_token: str, with_subtitles: bool = True
                   ) -> tuple[list[Question], list[str], list[Path]]:
    """The (limited, per bucket) questions, the buckets to report and the annotation files read.

    ``with_subtitles=False`` skips reading videos for subtitle times (the checks before the model loads).
    """
    root, annotation = _paths(cfg)
    tasks = mcq.select_tasks(cfg, {d: None for d in DURATIONS})
    questions: list[Question] = []
    subtitle_files: set[Path] = set()
    taken = {t: 0 for t in tasks}
    times: dict[str, list[float]] = {}
    for k, row in enumerate(read_rows(annotation)):
        where = f"{annotation} row {k}"
        if not isinstance(row, dict) or any(row.get(f) is None for f in FIELDS):
            raise ValueError(f"{where}: expected an object with {list(FIELDS)}, got {row!r:.80}")
        if row["duration"] not in DURATIONS:
            raise ValueError(f"{where}: duration {row['duration']!r} is not one of {DURATIONS}")
        candidates, answer = _candidates(row["options"], row["answer"], where)
        bucket = row["duration"]
        if bucket not in taken or (cfg.limit is not None and taken[bucket] >= cfg.limit):
            continue
        taken[bucket] += 1
        video = root / cfg.video_dir / f"{row['videoID']}{cfg.video_extension}"
        preamble = ""
        srt = root / cfg.subtitle_dir / f"{row['videoID']}.srt"
        if cfg.subtitles and with_subtitles and srt.is_file():
            if str(video) not in times:
                times[str(video)] = frame_times(video, cfg.num_frames)
            text = subtitles_at(read_srt(srt), times[str(video)])
            preamble = cfg.prompt.subtitles.format(subtitles=text) if text else ""
            subtitle_files.add(srt)
        prompt = mcq.question_prompt(cfg, str(row["question"]), candidates, image_token, preamble)
        questions.append(Question(bucket, Item(f"{bucket}/{row['question_id']}", str(video), prompt),
                                  str(row["question"]), tuple(candidates),
                                  mcq_text.OPTION.format(letter=mcq_text.letter(answer), candidate=candidates[answer])))
    return questions, tasks, [annotation, *sorted(subtitle_files)]


def check_inputs(cfg: DictConfig, run_dir: str | Path, state: PartialState | None) -> None:
    """Generation settings, the files and every question row, before the model loads."""
    GenerationSettings.from_benchmark(cfg)
    load_questions(cfg, DEFAULT_IMAGE_TOKEN, with_subtitles=False)


def evaluate(model: Any, cfg: DictConfig, run_dir: str | Path, state: PartialState) -> dict[str, Any] | None:
    """Video-MME through :func:`tc_llava.eval.mcq.evaluate`: per duration bucket and ``Avg``."""
    questions, tasks, files = load_questions(cfg, image_token_of(model.tokenizer))
    return mcq.evaluate(model, cfg, run_dir, state, questions, tasks, files,
                        {"root": str(cfg.root), "annotation": cfg.annotation, "subtitles": bool(cfg.subtitles),
                         "subtitle_files": len(files) - 1}, mcq.Scoring(grade, SCORING, "whole output"))
