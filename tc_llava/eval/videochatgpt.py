"""The VideoChatGPT benchmark (VCGBench): generate open-ended answers, then judge them.

REFERENCE.md section 4. This module is VCGBench's loader, judging and table; the
generate-then-judge half it shares with zero-shot QA (prompts, generation, stages, prediction
files, the checks before the model loads, results) is :mod:`tc_llava.eval.judged`. Each
record's question (two for consistency) is answered once; predictions are saved as the
benchmark's own records with ``pred`` (generic, temporal) or ``pred1``/``pred2``
(consistency) added: the input format of the upstream ``evaluate_benchmark_*.py`` scripts.
Scoring is :func:`tc_llava.eval.scoring.run_videochatgpt` with the configured judge, whose
verdicts are cached per item.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig

from tc_llava.eval import judged, scoring
from tc_llava.eval.judge import Judge
from tc_llava.eval.judged import (
    Entry, generation_line, judge_line, locate_video, read_json_list, text_field,
)
from tc_llava.eval.runner import require_path

# split -> (question field, prediction field) of its records
QUESTION_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "generic": (("Q", "pred"),),
    "temporal": (("Q", "pred"),),
    "consistency": (("Q1", "pred1"), ("Q2", "pred2")),
}
DIMENSION_NAMES = {
    "CI": "Correctness of Information",
    "DO": "Detail Orientation",
    "CU": "Contextual Understanding",
    "TU": "Temporal Understanding",
    "CO": "Consistency",
}


def load_entries(cfg: DictConfig) -> list[Entry]:
    """Every (limited) record of the configured splits, with its video looked up."""
    unknown = sorted(set(cfg.splits) - set(QUESTION_FIELDS))
    if unknown:
        raise ValueError(f"benchmark.splits: unknown split(s) {unknown}; expected {list(QUESTION_FIELDS)}")
    root, root_field = Path(cfg.root), f"benchmark.root={cfg.root}"
    require_path(root, "directory", root_field, "the VideoChatGPT benchmark directory")
    entries = []
    for split, filename in cfg.splits.items():
        path = root / cfg.json_dir / filename
        what = f"{split} question records (benchmark.json_dir, benchmark.splits.{split})"
        for k, record in enumerate(read_json_list(path, what, root_field)[: cfg.limit]):
            where = f"{path} record {k}"
            name = text_field(record, "video_name", where, numbers=True)
            text_field(record, "A", where)
            questions = {pred: text_field(record, q, where) for q, pred in QUESTION_FIELDS[split]}
            video, tried = locate_video(root / cfg.video_dir, name, cfg.video_extensions)
            entries.append(Entry(split, k, dict(record), video, tried, questions, (path,)))
    return entries


def _check_files(cfg: DictConfig) -> None:
    """The root, the question files and their records (:func:`load_entries`), and the video folder."""
    load_entries(cfg)
    require_path(Path(cfg.root) / cfg.video_dir, "directory", f"benchmark.root={cfg.root}",
                 f"the videos (benchmark.video_dir={cfg.video_dir})")


def check_inputs(cfg: DictConfig, run_dir: str | Path, state: PartialState) -> None:
    """:func:`tc_llava.eval.judged.check_inputs` for the configured splits: what fails without the model."""
    judged.check_inputs(cfg, run_dir, state, _check_files, list(cfg.splits))


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown_table(results: Mapping[str, Any]) -> str:
    """Per-dimension scores (0-5), both averages, judged/failed counts, and what judged them."""
    lines = ["| Dimension | Score | Judged | Judge failed |", "|---|---:|---:|---:|"]
    for dim, d in results["dimensions"].items():
        lines.append(f"| {DIMENSION_NAMES[dim]} ({dim}) | {_score(d['mean_score'])} | {d['judged']} | {d['failed']} |")
    lines.append(f"| **Mean of five** | {_score(results['mean_of_dimensions'])} | | |")
    lines.append(f"| **Item-weighted mean** | {_score(results['item_weighted_mean'])} | {results['judged']} "
                 f"| {results['failed']} |")
    shas = ", ".join(f"{d} {sha}" for d, sha in results["prompts"]["sha"].items())
    return "\n".join(lines) + (
        f"\n\n{judge_line(results['judge'])}; prompt hashes: {shas}.\n"
        f"{generation_line(results['generation'])}\n"
    )


def _judge_predictions(judge: Judge, files: Mapping[str, Path], cache_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """The configured dimensions judged, each on its split's predictions with its own prompt."""
    return scoring.run_videochatgpt(judge, files, cache_dir, prompts_path=cfg.judge_prompts or scoring.VCG_PROMPTS,
                                    dimensions=list(cfg.dimensions))


def evaluate(model: Any, cfg: DictConfig, run_dir: str | Path, state: PartialState) -> dict[str, Any] | None:
    """Generate and/or judge VideoChatGPT per ``cfg.stage``; the main process returns the results.

    Outputs in ``run_dir``: ``predictions/{split}.json`` and ``meta.json``; with scoring,
    ``results.json`` (the judge's numbers plus ``generation``, the meta) and ``results.md``.
    """
    return judged.evaluate(model, cfg, run_dir, state, list(cfg.splits), load_entries, _judge_predictions,
                           markdown_table)
