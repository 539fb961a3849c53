"""Multiple-choice video QA, generalised from the MVBench evaluator: one runner, many question sets.

A multiple-choice benchmark is a loader that turns its files into :class:`Question` s (a task
name, the runner's :class:`~tc_llava.eval.runner.Item` with the rendered prompt, the candidates
and the ``(X) answer`` ground truth); this module does the rest, the same way for all of them:

- **Prompt**: the configured ``prompt`` block (system text, question and option formats,
  instruction, assistant priming) around :func:`tc_llava.data.mcq.question_block`, in the
  model's chat template (:func:`question_prompt`).
- **Generation**: batched, left-padded, KV-cached, sharded and resumable through
  :func:`tc_llava.eval.runner.generate_predictions`; frames are segment middles, optionally
  inside a ``start``/``end`` bound, from video files or frame folders.
- **Scoring**: MVBench's letter match on the first output line with the priming put back
  (:func:`prediction`, :func:`check_answer` with its A-G guard), judge-free. An item whose media
  fail is counted as failed, never as right or wrong; a run that answers nothing stops and
  leaves an earlier run's results in place.
- **Results** (:func:`evaluate`): ``results.json`` per task and ``Avg`` with a ``provenance``
  block (annotation hashes, missing and failed media, the model export's hash, frame settings,
  git commit), ``results.md``, ``results.png`` and ``predictions.jsonl`` (one row per
  question, what :mod:`tc_llava.eval.compare` pairs).

MVBench's own layout (a task table of ``[json, prefix, type, bound]`` rows, records
``{video, question, candidates, answer, start?, end?}``) is read by :func:`load_task_table` and
:func:`load_layout_questions`; TVBench and MLVU ship in it too. NExT-QA and Video-MME have
their own loaders (:mod:`tc_llava.eval.nextqa`, :mod:`tc_llava.eval.videomme`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf

from tc_llava.data import mcq
from tc_llava.data.files import read_text
from tc_llava.data.templates import build_prompt
from tc_llava.eval import jsonl, tvbench_extract
from tc_llava.eval.runner import (
    DATA_TYPES, TOO_LONG, GenerationSettings, Item, generate_predictions, model_settings, require_path,
)
from tc_llava.provenance import data_fingerprint, git_state, model_hash, results_provenance

log = logging.getLogger(__name__)

TASK_TABLES = ("official", "from_root")
FRAME_SAMPLING = {"middle": "MVBench segment middles", "uniform": "uniform (rounded linspace)"}
FRAME_FOLDERS = "frame folders at decode.frame_fps from index 1"
_LETTER = re.compile("[a-g]")


@dataclass(frozen=True)
class Task:
    """One row of a task table: where its questions and media are, and how to read them."""

    name: str
    json: str
    prefix: str
    data_type: str
    bound: bool


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: the runner's item and what scoring and the predictions file need."""

    task: str
    item: Item
    question: str
    candidates: tuple[str, ...]
    gt: str  # "(X) answer"


def _first_token(text: str) -> str:
    tokens = text.lower().split()
    return tokens[0].replace(".", "") if tokens else ""


def check_answer(pred: str, gt: str) -> bool:
    """Official option match: first tokens, lowercased, '.' dropped, either contains the other.

    Guard (not in the original): the predicted token must hold a letter A-G, so a bare
    ``(`` (the model said nothing after the primed ``Best option:(``) is never correct.
    """
    pred_option, gt_option = _first_token(pred), _first_token(gt)
    if not _LETTER.search(pred_option):
        return False
    return pred_option in gt_option or gt_option in pred_option


def prediction(output: str, pred_prefix: str) -> str:
    """The scored prediction: the output's first line with the primed ``(`` put back."""
    lines = output.strip().split("\n")
    return pred_prefix + lines[0]


def question_prompt(cfg: DictConfig, question: str, candidates: Sequence[str], image_token: str,
                    preamble: str = "") -> str:
    """The full generation prompt of one question; ``preamble`` goes before the question block
    (Video-MME's subtitles)."""
    user = preamble + mcq.question_block(question, candidates, cfg.prompt.question, cfg.prompt.option,
                                         cfg.prompt.instruction)
    return build_prompt(cfg.template, cfg.prompt.system, user, cfg.prompt.answer_prefix, image_token)


def check_record(record: Any, where: str) -> None:
    """An MVBench-layout record is an object whose ``video``, ``question`` and ``answer`` are strings
    and whose ``candidates`` are 1-7 strings holding its ``answer``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    for field in ("video", "question", "answer"):
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {record.get(field)!r:.60}")
    candidates = record.get("candidates")
    if not (isinstance(candidates, list) and 1 <= len(candidates) <= 7 and all(isinstance(c, str) for c in candidates)):
        raise ValueError(f"{where}: field 'candidates' must be a list of 1-7 strings, got {candidates!r:.80}")
    if record["answer"] not in candidates:
        raise ValueError(f"{where}: answer {record['answer']!r} is not one of its candidates {candidates}")


# --------------------------------------------------------------------------- MVBench's layout


def _parse_table(table: Mapping[str, Any], source: str) -> dict[str, Task]:
    tasks = {}
    for name, row in table.items():
        if name == "Avg":
            raise ValueError(f"{source}: 'Avg' is the name of the overall score, not a task name")
        row = list(row) if isinstance(row, Sequence) and not isinstance(row, str) else row
        if not isinstance(row, list) or len(row) < 4:
            raise ValueError(f"{source}: task {name!r} must be [json, prefix, type, bound, ...], got {row!r}")
        json_file, prefix, data_type, bound = row[:4]
        if data_type not in DATA_TYPES:
            raise ValueError(f"{source}: task {name!r} has data type {data_type!r}; expected one of {DATA_TYPES}")
        if not isinstance(bound, bool):
            raise ValueError(f"{source}: task {name!r} bound must be true/false, got {bound!r}")
        tasks[str(name)] = Task(str(name), str(json_file), str(prefix), data_type, bound)
    return tasks


def select_tasks(cfg: DictConfig, tasks: Mapping[str, Any]) -> list[str]:
    """The task names to run: ``cfg.tasks`` (checked against ``tasks``) or all of them."""
    if cfg.tasks is None:
        return list(tasks)
    unknown = [t for t in cfg.tasks if t not in tasks]
    if unknown:
        raise ValueError(f"benchmark.tasks {unknown} not in the task table; it has {list(tasks)}")
    return list(cfg.tasks)


def load_task_table(cfg: DictConfig) -> dict[str, Task]:
    """The tasks to run: ``cfg.table`` or ``{root}/tasks.json``, restricted to ``cfg.tasks``."""
    if cfg.task_table == "official":
        tasks = _parse_table(OmegaConf.to_container(cfg.table), "benchmark.table")
    elif cfg.task_table == "from_root":
        path = Path(cfg.root) / "tasks.json"
        require_path(path, "file", f"benchmark.root={cfg.root}", "the task table (benchmark.task_table=from_root)")
        tasks = _parse_table(json.loads(read_text(path)), str(path))
    else:
        raise ValueError(f"benchmark.task_table must be one of {TASK_TABLES}, got {cfg.task_table!r}")
    return {t: tasks[t] for t in select_tasks(cfg, tasks)}


def check_layout(cfg: DictConfig) -> None:
    """The generation settings, the root, the task table, every task's question file and media folder."""
    GenerationSettings.from_benchmark(cfg)
    root, where = Path(cfg.root), f"benchmark.root={cfg.root}"
    require_path(root, "directory", where, f"the {cfg.title} directory holding {cfg.json_dir}/ and {cfg.video_dir}/")
    for task in load_task_table(cfg).values():
        require_path(root / cfg.json_dir / task.json, "file", where,
                     f"the questions of task {task.name!r} (benchmark.json_dir={cfg.json_dir})")
        media = root / cfg.video_dir / task.prefix
        archive = media.parent / f"{media.name}.zip"
        if not media.exists() and archive.is_file():  # TVBench's download: video/<task>.zip
            raise FileNotFoundError(f"{where}: the media of task {task.name!r} are still in {archive}; extract the "
                                    f"archives once with: {tvbench_extract.COMMAND} {root}")
        require_path(media, "directory", where,
                     f"the media of task {task.name!r} (benchmark.video_dir={cfg.video_dir}, then its prefix)")


def _bound(record: dict[str, Any], task: Task, where: str) -> tuple[float, float] | None:
    if not task.bound:
        return None
    start, end = record.get("start"), record.get("end")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (start, end)):
        raise ValueError(f"{where}: bound task {task.name!r} needs numeric 'start'/'end', got {start!r}/{end!r}")
    return float(start), float(end)


def layout_files(cfg: DictConfig, tasks: Mapping[str, Task]) -> list[Path]:
    """The annotation files a layout run reads: each task's question file, and ``tasks.json`` when used."""
    root = Path(cfg.root)
    files = [root / cfg.json_dir / task.json for task in tasks.values()]
    return files + ([root / "tasks.json"] if cfg.task_table == "from_root" else [])


def load_layout_questions(cfg: DictConfig, tasks: Mapping[str, Task], image_token: str) -> list[Question]:
    """Every (limited) question of ``tasks`` with its rendered prompt and ``(X) answer`` ground truth."""
    root = Path(cfg.root)
    questions = []
    for task in tasks.values():
        path = root / cfg.json_dir / task.json
        require_path(path, "file", f"benchmark.root={cfg.root}", f"the questions of task {task.name!r}")
        records = json.loads(read_text(path))
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of question records")
        for k, record in enumerate(records[: cfg.limit]):
            where = f"{path} record {k}"
            check_record(record, where)
            bound = _bound(record, task, where)
            prompt = question_prompt(cfg, record["question"], record["candidates"], image_token)
            media = root / cfg.video_dir / task.prefix / record["video"]
            questions.append(Question(
                task.name, Item(f"{task.name}/{k}", str(media), prompt, bound, task.data_type),
                record["question"], tuple(record["candidates"]), mcq.ground_truth(record["answer"], record["candidates"]),
            ))
    return questions


# --------------------------------------------------------------------------- scoring and results


def _accuracy(correct: int, total: int) -> float | None:
    return 100.0 * correct / total if total else None


# (prediction, correct); correct None: no answer could be read from the output (not in the accuracy)
Grade = Callable[[str, Question], tuple[str, bool | None]]


@dataclass(frozen=True)
class Scoring:
    """How an output is graded, and the sentence ``results.json`` describes it with."""

    grade: Grade
    description: str
    kept: str  # the part of the output that is graded, for results.json


def mvbench_scoring(pred_prefix: str) -> Scoring:
    """MVBench's: :func:`check_answer` on the output's first line with the priming put back (:func:`prediction`)."""

    def grade(output: str, question: Question) -> tuple[str, bool]:
        pred = prediction(output, pred_prefix)
        return pred, check_answer(pred, question.gt)

    return Scoring(grade, "option match on first tokens with the A-G letter guard (judge-free)", "first line")


def score(questions: Sequence[Question], records: Mapping[str, Mapping[str, Any]], tasks: Sequence[str],
          grade: Grade) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per-task and ``Avg`` counts and the per-item rows. ``total`` counts the graded items and the accuracy
    (%) is over them; ``failed`` items (media) and ``unanswered`` ones (no answer in the output) are apart."""
    counts = {t: {"correct": 0, "total": 0, "failed": 0, "unanswered": 0} for t in tasks}
    rows = []
    for q in questions:
        record = records[q.item.id]
        row = {"id": q.item.id, "task": q.task, "video": q.item.media, "question": q.question,
               "candidates": list(q.candidates), "gt": q.gt, "output": record["output"], "failed": record["failed"]}
        if record["failed"] is not None:
            counts[q.task]["failed"] += 1
            row.update(pred=None, correct=None)
        else:
            row["pred"], row["correct"] = grade(record["output"], q)
            if row["correct"] is None:
                counts[q.task]["unanswered"] += 1
            else:
                counts[q.task]["total"] += 1
                counts[q.task]["correct"] += row["correct"]
        rows.append(row)
    avg = {k: sum(c[k] for c in counts.values()) for k in ("correct", "total", "failed", "unanswered")}
    summary = {t: {**c, "accuracy": _accuracy(c["correct"], c["total"])} for t, c in counts.items()}
    summary["Avg"] = {**avg, "accuracy": _accuracy(avg["correct"], avg["total"])}
    return summary, rows


def markdown_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The results as a GitHub markdown table, accuracies in %, `n/a` where nothing was answered."""
    lines = ["| Task | Correct | Total | Failed | Accuracy (%) |", "|---|---:|---:|---:|---:|"]
    for task, c in summary.items():
        acc = "n/a" if c["accuracy"] is None else f"{c['accuracy']:.1f}"
        name = f"**{task}**" if task == "Avg" else task
        lines.append(f"| {name} | {c['correct']} | {c['total']} | {c['failed']} | {acc} |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """Per-task accuracy bars, ``Avg`` last; a bare Figure renders with Agg and leaves pyplot alone."""
    from matplotlib.figure import Figure

    names = list(summary)
    values = [summary[n]["accuracy"] if summary[n]["accuracy"] is not None else math.nan for n in names]
    fig = Figure(figsize=(8, 0.35 * len(names) + 1.2))
    ax = fig.subplots()
    bars = ax.barh(names, values, color=["tab:orange" if n == "Avg" else "tab:blue" for n in names])
    ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.1f}" for v in values], padding=2, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _media_problems(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """The media of items failed by their media, split into missing (no such path) and undecodable."""
    failed = {r["video"] for r in rows if r["failed"] and not r["failed"].startswith(TOO_LONG)}
    missing = sorted(m for m in failed if not Path(m).exists())
    return missing, sorted(failed - set(missing))


def evaluate(model: Any, cfg: DictConfig, run_dir: str | Path, state: PartialState, questions: Sequence[Question],
             tasks: Sequence[str], annotations: Sequence[Path], settings: Mapping[str, Any],
             scoring: Scoring | None = None) -> dict[str, Any] | None:
    """Generate and score ``questions``; the main process writes and returns the results.

    ``tasks`` orders the table; ``annotations`` are the files the questions came from (hashed
    into the provenance); ``settings`` are the benchmark's own entries of ``results.json``'s
    settings (its root and layout), before the common ones; ``scoring`` defaults to MVBench's
    (:func:`mvbench_scoring`). Outputs in ``run_dir``:
    ``results.json``, ``results.md``, ``results.png``, ``predictions.jsonl`` and the
    generation cache ``cache/``.
    """
    run_dir = Path(run_dir)
    generation = GenerationSettings.from_benchmark(cfg)
    records = generate_predictions(model, [q.item for q in questions], run_dir / "cache", generation, state)
    if not state.is_main_process:
        return None
    scoring = scoring or mvbench_scoring(cfg.prompt.pred_prefix)
    summary, rows = score(questions, records, list(tasks), scoring.grade)
    if summary["Avg"]["failed"] == len(rows):
        reason = next((f" (e.g. {r['video']}: {r['failed']})" for r in rows), "")
        raise RuntimeError(f"{cfg.name}: no question could be answered, {len(rows)} failed{reason}; "
                           f"the results in {run_dir} were left as they were")
    described = model_settings(model)
    missing, failed = _media_problems(rows)
    results = {
        "benchmark": cfg.name,
        "tasks": {t: summary[t] for t in tasks},
        "Avg": summary["Avg"],
        "failed_items": [{"id": r["id"], "video": r["video"], "reason": r["failed"]} for r in rows if r["failed"]],
        "failed_by_reason": dict(Counter(r["failed"].split(":", 1)[0] for r in rows if r["failed"])),
        "settings": {
            **settings,
            "tasks": list(tasks),
            "limit": cfg.limit,
            "num_frames": cfg.num_frames,
            "frame_sampling": f"{FRAME_SAMPLING[generation.sampling]}; {FRAME_FOLDERS}",
            "resolved": OmegaConf.to_container(cfg.resolved) if "resolved" in cfg else None,
            "template": cfg.template,
            "prompt": OmegaConf.to_container(cfg.prompt),
            "decoding": {"greedy": True, "max_new_tokens": cfg.max_new_tokens, "kept": scoring.kept},
            "scoring": scoring.description,
            "model": described,
            "git": git_state(),
            "num_processes": state.num_processes,
        },
        "provenance": results_provenance(
            data_fingerprint(annotations, cfg.root, len(questions), missing, failed),
            model_hash(described["checkpoint"], run_dir / "cache" / "model_hash.json"),
            {"num_frames": cfg.num_frames, "sampling": generation.sampling, "frame_folder_fps": generation.frame_fps},
        ),
    }
    table = markdown_table(summary)
    run_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"results.json": json.dumps(results, indent=1) + "\n", "results.md": f"# {cfg.name}\n\n{table}",
               "predictions.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)}
    for name, text in outputs.items():
        with jsonl.writing(run_dir / name):
            (run_dir / name).write_text(text, encoding="utf-8")
    with jsonl.writing(run_dir / "results.png"):
        bar_chart(summary, run_dir / "results.png", f"{cfg.name}: {Path(described['checkpoint']).name}")
    log.info("%s: %d questions, %d failed; results in %s", cfg.name, len(rows), summary["Avg"]["failed"], run_dir)
    print(table, flush=True)
    return results
