"""Zero-shot open-ended video QA (MSVD, MSRVTT, ActivityNet, TGIF) judged by an LLM.

REFERENCE.md section 4. The questions and answers of ``cfg.dataset`` (two index-aligned
lists, as Video-ChatGPT and PLLaVA read them, or one list carrying both) are answered
greedily through the generate-then-judge half of :mod:`tc_llava.eval.judged`, saved as
``[{id, video_name, Q, A, pred, type?}]`` (what Video-ChatGPT's
``evaluate_activitynet_qa.py`` reads), and judged by
:func:`tc_llava.eval.scoring.run_zeroshot_qa`: accuracy = yes / (yes + no), mean score,
failed counts. ``stage``, the caches and the checks before the model loads
(:func:`check_inputs`) behave as for VideoChatGPT.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig

from tc_llava.eval import judged, scoring
from tc_llava.eval.judge import Judge
from tc_llava.eval.judged import Entry, generation_line, judge_line, locate_video, read_json_list, text_field
from tc_llava.eval.runner import require_path


def load_entries(cfg: DictConfig) -> list[Entry]:
    """Every (limited) question of ``cfg.dataset`` with its answer and its video looked up."""
    if cfg.dataset not in cfg.datasets:
        raise ValueError(f"benchmark.dataset {cfg.dataset!r} is not one of {list(cfg.datasets)}")
    spec = cfg.datasets[cfg.dataset]
    root, root_field = Path(cfg.root), f"benchmark.root={cfg.root}"
    field = f"benchmark.datasets.{cfg.dataset}"
    require_path(root, "directory", root_field, "the directory holding the datasets' folders")
    q_path = root / spec.questions
    questions = read_json_list(q_path, f"{cfg.dataset} questions ({field}.questions)", root_field)
    a_path = root / spec.answers if spec.answers else q_path
    answers = (read_json_list(a_path, f"{cfg.dataset} answers ({field}.answers)", root_field)
               if spec.answers else questions)
    if len(answers) != len(questions):
        raise ValueError(f"{a_path}: {len(answers)} answers for the {len(questions)} questions of {q_path}; "
                         "the two lists pair by position")
    entries = []
    for k, (question, answer) in enumerate(list(zip(questions, answers))[: cfg.limit]):
        q_where, a_where = f"{q_path} record {k}", f"{a_path} record {k}"
        name = text_field(question, "video_name", q_where, numbers=True)
        text = text_field(question, "question", q_where)
        gt = text_field(answer, "answer", a_where, numbers=True)
        q_id, a_id = question.get("question_id"), answer.get("question_id")
        if q_id is not None and a_id is not None and q_id != a_id:
            raise ValueError(f"{a_where}: question_id {a_id!r} differs from {q_where}'s {q_id!r}; "
                             "the two lists must pair by position")
        record = {"id": q_id if q_id is not None else k, "video_name": question["video_name"], "Q": text, "A": gt}
        if "type" in answer:
            record["type"] = answer["type"]
        video, tried = locate_video(root / spec.video_dir, f"{spec.video_prefix}{name}", spec.video_extensions)
        entries.append(Entry(cfg.dataset, k, record, video, tried, {"pred": text}, (q_path, a_path)))
    return entries


def _check_files(cfg: DictConfig) -> None:
    """The root, the question and answer files and their records (:func:`load_entries`), and the video folder."""
    load_entries(cfg)
    video_dir = cfg.datasets[cfg.dataset].video_dir
    require_path(Path(cfg.root) / video_dir, "directory", f"benchmark.root={cfg.root}",
                 f"the videos (benchmark.datasets.{cfg.dataset}.video_dir={video_dir})")


def check_inputs(cfg: DictConfig, run_dir: str | Path, state: PartialState) -> None:
    """:func:`tc_llava.eval.judged.check_inputs` for ``cfg.dataset``: what fails without the model."""
    judged.check_inputs(cfg, run_dir, state, _check_files, [cfg.dataset])


def markdown_table(results: Mapping[str, Any]) -> str:
    """Accuracy (%), mean score (0-5), yes/no and failed counts, and what judged them."""
    acc = "n/a" if results["accuracy"] is None else f"{100 * results['accuracy']:.1f}"
    score = "n/a" if results["mean_score"] is None else f"{results['mean_score']:.2f}"
    return (
        "| Dataset | Accuracy (%) | Score | Yes | No | Judged | Judge failed |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        f"| {results['dataset']} | {acc} | {score} | {results['yes']} | {results['no']} | {results['judged']} "
        f"| {results['failed']} |\n\n"
        f"{judge_line(results['judge'])}; prompt hash: {results['prompts']['sha']['qa']}.\n"
        f"{generation_line(results['generation'])}\n"
    )


def _judge_predictions(judge: Judge, files: Mapping[str, Path], cache_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """The dataset's predictions judged with the QA prompt: yes/no and a score per item."""
    return scoring.run_zeroshot_qa(judge, files[cfg.dataset], cache_dir, cfg.dataset,
                                   prompts_path=cfg.judge_prompts or scoring.QA_PROMPTS)


def evaluate(model: Any, cfg: DictConfig, run_dir: str | Path, state: PartialState) -> dict[str, Any] | None:
    """Generate and/or judge ``cfg.dataset`` per ``cfg.stage``; the main process returns the results.

    Outputs in ``run_dir``: ``predictions/{dataset}.json`` and ``meta.json``; with scoring,
    ``results.json`` (the judge's numbers plus ``generation``, the meta) and ``results.md``.
    """
    return judged.evaluate(model, cfg, run_dir, state, [cfg.dataset], load_entries, _judge_predictions,
                           markdown_table)
