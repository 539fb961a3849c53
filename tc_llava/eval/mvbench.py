"""MVBench, reproduced as the official evaluation does it (REFERENCE.md section 3), and every
benchmark shipped in its layout (TVBench, MLVU dev, the synthetic set).

Questions come from ``{root}/{json_dir}/<task json>`` with media under
``{root}/{video_dir}/<prefix>``; the task table is the configured table or the dataset's own
``tasks.json`` (same format: ``{task: [json, prefix, type, bound, ...]}``). Each question
becomes the official prompt (system text, the ``Question/Options`` block of
:mod:`tc_llava.data.mcq` that the synthetic training data uses too, ``Only give the best
option.``, assistant primed with ``Best option:(``), is generated greedily by
:mod:`tc_llava.eval.runner`, and is scored by :func:`check_answer` on the first line of the
output with ``(`` prepended. This is one instance of the multiple-choice runner
:mod:`tc_llava.eval.mcq`, which holds the code; TVBench and MLVU differ from MVBench only in
their task table and (MLVU) system text, so their configs name this protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import DictConfig

from tc_llava.data.templates import image_token_of
from tc_llava.data.video import frame_indices
from tc_llava.eval import mcq
from tc_llava.eval.mcq import Question, Task, check_answer, load_task_table, prediction, score

__all__ = [
    "Task", "Question", "frame_indices", "check_answer", "prediction",
    "load_task_table", "load_questions", "check_inputs", "score", "evaluate",
]


def check_inputs(cfg: DictConfig, run_dir: str | Path, state: PartialState | None) -> None:
    """The generation settings, the root, the task table, every task's question file and media folder,
    before the model loads.

    The eval app calls this first (every benchmark's check takes ``run_dir`` and ``state``;
    MVBench needs neither, so the ablation job passes None). A single unreadable video stays
    a failed item, not an error.
    """
    mcq.check_layout(cfg)


def load_questions(cfg: DictConfig, tasks: Mapping[str, Task], tokenizer: Any) -> list[Question]:
    """Every (limited) question of ``tasks`` with its rendered prompt and ``(X) answer`` ground truth."""
    return mcq.load_layout_questions(cfg, tasks, image_token_of(tokenizer))


def evaluate(model: Any, cfg: DictConfig, run_dir: str | Path, state: PartialState) -> dict[str, Any] | None:
    """Evaluate ``model`` on ``cfg`` (a benchmark config); the main process writes and returns the results.

    Outputs in ``run_dir``: ``results.json``, ``results.md``, ``results.png``,
    ``predictions.jsonl`` (one row per question) and the generation cache ``cache/``.
    """
    tasks = load_task_table(cfg)
    questions = load_questions(cfg, tasks, model.tokenizer)
    return mcq.evaluate(model, cfg, run_dir, state, questions, list(tasks), mcq.layout_files(cfg, tasks),
                        {"root": str(cfg.root), "task_table": cfg.task_table})
