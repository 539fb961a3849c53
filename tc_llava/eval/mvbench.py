"""MVBench, reproduced as the official evaluation does it (REFERENCE.md section 3).

Questions come from ``{root}/{json_dir}/<task json>`` with media under
``{root}/{video_dir}/<prefix>``; the task table is the configured 20-task table or the
dataset's own ``tasks.json`` (same format: ``{task: [json, prefix, type, bound, ...]}``).
Each question becomes the official prompt (system text, the ``Question/Options`` block of
:mod:`tc_llava.data.mcq` that the synthetic training data uses too, ``Only give the best
option.``, assistant primed with ``Best option:(``), is generated greedily by
:mod:`tc_llava.eval.runner`, and is scored by :func:`check_answer` on the first line of the
output with ``(`` prepended. Items whose media fail are reported as failed and excluded
from both correct and total; a run that answers no question at all stops with an error and
leaves the results of an earlier run in place.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf

from tc_llava.data import mcq
from tc_llava.data.templates import build_prompt, image_token_of
from tc_llava.data.video import frame_indices
from tc_llava.eval.runner import (
    DATA_TYPES, GenerationSettings, Item, generate_predictions, model_settings, require_path,
)
from tc_llava.provenance import git_state

__all__ = [
    "Task", "Question", "frame_indices", "check_answer", "prediction",
    "load_task_table", "load_questions", "check_inputs", "score", "evaluate",
]

log = logging.getLogger(__name__)

TASK_TABLES = ("official", "from_root")
_LETTER = re.compile("[a-g]")


@dataclass(frozen=True)
class Task:
    """One row of the task table: where its questions and media are, and how to read them."""

    name: str
    json: str
    prefix: str
    data_type: str
    bound: bool


@dataclass(frozen=True)
class Question:
    """One MVBench question: the runner's item and what scoring and the predictions file need."""

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


def load_task_table(cfg: DictConfig) -> dict[str, Task]:
    """The tasks to run: ``cfg.table`` or ``{root}/tasks.json``, restricted to ``cfg.tasks``."""
    if cfg.task_table == "official":
        tasks = _parse_table(OmegaConf.to_container(cfg.table), "benchmark.table")
    elif cfg.task_table == "from_root":
        path = Path(cfg.root) / "tasks.json"
        require_path(path, "file", f"benchmark.root={cfg.root}", "the task table (benchmark.task_table=from_root)")
        tasks = _parse_table(json.loads(path.read_text()), str(path))
    else:
        raise ValueError(f"benchmark.task_table must be one of {TASK_TABLES}, got {cfg.task_table!r}")
    if cfg.tasks is not None:
        unknown = [t for t in cfg.tasks if t not in tasks]
        if unknown:
            raise ValueError(f"benchmark.tasks {unknown} not in the task table; it has {list(tasks)}")
        tasks = {t: tasks[t] for t in cfg.tasks}
    return tasks


def check_inputs(cfg: DictConfig, run_dir: str | Path, state: PartialState | None) -> None:
    """The generation settings, the root, the task table, every task's question file and media folder,
    before the model loads.

    The eval app calls this first (every benchmark's check takes ``run_dir`` and ``state``;
    MVBench needs neither, so the ablation job passes None). A single unreadable video stays
    a failed item, not an error.
    """
    GenerationSettings.from_benchmark(cfg)
    root, where = Path(cfg.root), f"benchmark.root={cfg.root}"
    require_path(root, "directory", where, f"the MVBench directory holding {cfg.json_dir}/ and {cfg.video_dir}/")
    for task in load_task_table(cfg).values():
        require_path(root / cfg.json_dir / task.json, "file", where,
                     f"the questions of task {task.name!r} (benchmark.json_dir={cfg.json_dir})")
        require_path(root / cfg.video_dir / task.prefix, "directory", where,
                     f"the media of task {task.name!r} (benchmark.video_dir={cfg.video_dir}, then its prefix)")


def _record_fields(record: Any, task: Task, source: str, k: int) -> tuple[str, str, list[str], str, Any]:
    where = f"{source} record {k}"
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
    bound = None
    if task.bound:
        start, end = record.get("start"), record.get("end")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (start, end)):
            raise ValueError(f"{where}: bound task {task.name!r} needs numeric 'start'/'end', got {start!r}/{end!r}")
        bound = (float(start), float(end))
    return record["video"], record["question"], candidates, record["answer"], bound


def load_questions(cfg: DictConfig, tasks: Mapping[str, Task], tokenizer: Any) -> list[Question]:
    """Every (limited) question of ``tasks`` with its rendered prompt and ``(X) answer`` ground truth."""
    root = Path(cfg.root)
    image_token = image_token_of(tokenizer)
    questions = []
    for task in tasks.values():
        path = root / cfg.json_dir / task.json
        require_path(path, "file", f"benchmark.root={cfg.root}", f"the questions of task {task.name!r}")
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of question records")
        for k, record in enumerate(records[: cfg.limit]):
            video, question, candidates, answer, bound = _record_fields(record, task, str(path), k)
            user = mcq.question_block(question, candidates, cfg.prompt.question, cfg.prompt.option,
                                      cfg.prompt.instruction)
            prompt = build_prompt(cfg.template, cfg.prompt.system, user, cfg.prompt.answer_prefix, image_token)
            media = root / cfg.video_dir / task.prefix / video
            questions.append(Question(
                task.name, Item(f"{task.name}/{k}", str(media), prompt, bound, task.data_type),
                question, tuple(candidates), mcq.ground_truth(answer, candidates),
            ))
    return questions


def prediction(output: str, pred_prefix: str) -> str:
    """The scored prediction: the output's first line with the primed ``(`` put back."""
    lines = output.strip().split("\n")
    return pred_prefix + lines[0]


def _accuracy(correct: int, total: int) -> float | None:
    return 100.0 * correct / total if total else None


def score(questions: Sequence[Question], records: Mapping[str, Mapping[str, Any]], pred_prefix: str,
          tasks: Sequence[str]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per-task and ``Avg`` counts (accuracy in %, of answered items) and the per-item rows."""
    counts = {t: {"correct": 0, "total": 0, "failed": 0} for t in tasks}
    rows = []
    for q in questions:
        record = records[q.item.id]
        row = {"id": q.item.id, "task": q.task, "video": q.item.media, "question": q.question,
               "candidates": list(q.candidates), "gt": q.gt, "output": record["output"], "failed": record["failed"]}
        if record["failed"] is not None:
            counts[q.task]["failed"] += 1
            row.update(pred=None, correct=None)
        else:
            row["pred"] = prediction(record["output"], pred_prefix)
            row["correct"] = check_answer(row["pred"], q.gt)
            counts[q.task]["total"] += 1
            counts[q.task]["correct"] += row["correct"]
        rows.append(row)
    avg = {k: sum(c[k] for c in counts.values()) for k in ("correct", "total", "failed")}
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


def evaluate(model: Any, cfg: DictConfig, run_dir: str | Path, state: PartialState) -> dict[str, Any] | None:
    """Evaluate ``model`` on ``cfg`` (a benchmark config); the main process writes and returns the results.

    Outputs in ``run_dir``: ``results.json``, ``results.md``, ``results.png``,
    ``predictions.jsonl`` (one row per question) and the generation cache ``cache/``.
    """
    run_dir = Path(run_dir)
    tasks = load_task_table(cfg)
    questions = load_questions(cfg, tasks, model.tokenizer)
    settings = GenerationSettings.from_benchmark(cfg)
    records = generate_predictions(model, [q.item for q in questions], run_dir / "cache", settings, state)
    if not state.is_main_process:
        return None
    summary, rows = score(questions, records, cfg.prompt.pred_prefix, list(tasks))
    if not summary["Avg"]["total"]:
        reason = next((f" (e.g. {r['video']}: {r['failed']})" for r in rows), "")
        raise RuntimeError(f"{cfg.name}: no question could be answered, {len(rows)} failed{reason}; "
                           f"the results in {run_dir} were left as they were")
    results = {
        "benchmark": cfg.name,
        "tasks": {t: summary[t] for t in tasks},
        "Avg": summary["Avg"],
        "failed_items": [{"id": r["id"], "video": r["video"], "reason": r["failed"]} for r in rows if r["failed"]],
        "settings": {
            "root": str(cfg.root),
            "task_table": cfg.task_table,
            "tasks": list(tasks),
            "limit": cfg.limit,
            "num_frames": cfg.num_frames,
            "frame_sampling": "MVBench segment middles; frame folders at decode.frame_fps from index 1",
            "template": cfg.template,
            "prompt": OmegaConf.to_container(cfg.prompt),
            "decoding": {"greedy": True, "max_new_tokens": cfg.max_new_tokens, "kept": "first line"},
            "scoring": "option match on first tokens with the A-G letter guard (judge-free)",
            "model": model_settings(model),
            "git": git_state(),
            "num_processes": state.num_processes,
        },
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(summary)
    (run_dir / "results.md").write_text(f"# {cfg.name}\n\n{table}")
    with (run_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    bar_chart(summary, run_dir / "results.png", f"{cfg.name}: {Path(model_settings(model)['checkpoint']).name}")
    log.info("%s: %d questions, %d failed; results in %s", cfg.name, len(rows), summary["Avg"]["failed"], run_dir)
    print(table, flush=True)
    return results

