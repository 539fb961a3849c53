"""The evaluation half of an ablation job: score the fresh export, leave ``ablation.json``.

``experiment=ablation`` composes a benchmark into ``ablation.benchmark``; after training,
``python -m tc_llava.ablation`` calls :func:`evaluate_run` in the same process. It evaluates the exported model (what a user would load) on that benchmark
under ``${run_dir}/eval`` and writes ``${run_dir}/ablation.json``: the job's rope and mask labels
(each rule with its parameters that differ from the rule's defaults, ``tad-gamma0.5``, as in run dir
names; the projector's too unless it is the default MLP), seed, timings, and per task the family (the
5th entry of the benchmark's ``tasks.json`` row), the accuracy and the chance level (mean of 1 /
number of options).
:mod:`tc_llava.ablation.collect` turns a sweep's files into one table.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from omegaconf import DictConfig

from tc_llava.eval import mvbench
from tc_llava.model.tc_llava import TCLlava
from tc_llava.train.settings import SettingsError, rule_labels

log = logging.getLogger(__name__)


def task_families(benchmark_root: str | Path) -> dict[str, str]:
    """Task name -> family from ``tasks.json`` (MVBench's row format plus a 5th entry)."""
    path = Path(benchmark_root) / "tasks.json"
    table = json.loads(path.read_text())
    missing = [name for name, row in table.items() if len(row) < 5]
    if missing:
        raise ValueError(f"{path}: tasks {missing} have no family; expected rows [json, prefix, type, bound, family]")
    return {name: row[4] for name, row in table.items()}


def chance_levels(predictions: Path) -> dict[str, float]:
    """Per task, the accuracy of uniform guessing in % (mean of 1 / number of candidates)."""
    inverse: dict[str, list[float]] = {}
    with predictions.open() as f:
        for line in f:
            row = json.loads(line)
            inverse.setdefault(row["task"], []).append(100.0 / len(row["candidates"]))
    return {task: statistics.fmean(v) for task, v in inverse.items()}


def check_benchmark(cfg: DictConfig) -> None:
    """The ablation benchmark's files, checked before training (they are read only after it)."""
    if cfg.ablation.benchmark.get("source") == "records":
        raise SettingsError(f"ablation.benchmark: {cfg.ablation.benchmark.json} is a prompt set of records, with no "
                            "benchmark to score the jobs on; the sweep takes a benchmark-layout set (prompts=synthetic)")
    try:
        mvbench.check_inputs(cfg.ablation.benchmark, cfg.run_dir, None)
    except (FileNotFoundError, ValueError) as e:
        raise SettingsError(f"ablation.{e}") from None


def evaluate_model(cfg: DictConfig, model: Any, eval_dir: Path, labels: dict[str, str], train_seconds: float,
                   final_loss: float | None) -> dict[str, Any] | None:
    """Score ``model`` on ``cfg.ablation.benchmark`` under ``eval_dir``; the main process returns the job summary
    (``labels``, seed, timings, per task family, accuracy and chance), the others None."""
    tic = time.perf_counter()
    state = PartialState()
    results = mvbench.evaluate(model, cfg.ablation.benchmark, eval_dir, state)
    if not state.is_main_process:
        return None
    unanswered = [task for task, r in results["tasks"].items() if r["accuracy"] is None]
    if unanswered:
        raise RuntimeError(f"ablation eval: no question of {unanswered} could be answered; see {eval_dir}")
    families = task_families(cfg.ablation.benchmark.root)
    chance = chance_levels(eval_dir / "predictions.jsonl")
    return {
        **labels, "seed": int(cfg.seed),
        "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - tic, "final_loss": final_loss,
        "tasks": {task: {"family": families[task], "accuracy": r["accuracy"], "chance": chance[task],
                         "total": r["total"]} for task, r in results["tasks"].items()},
        "results": str(eval_dir / "results.json"),
    }


def evaluate_run(cfg: DictConfig, result: dict[str, Any], train_seconds: float,
                 labels: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Evaluate ``result['export']`` on ``cfg.ablation.benchmark``; the main process writes ``ablation.json``
    (``labels``: the rope, mask and projector labels unless given; ``extra``: more fields for it)."""
    if not result.get("export"):
        raise ValueError("an ablation job evaluates its exported model: set export.enabled=true")
    run_dir = Path(cfg.run_dir)
    model = TCLlava.from_pretrained(result["export"], dtype=torch.float32).to(PartialState().device).eval()
    labels = labels or rule_labels(cfg.get("rope"), cfg.get("mask"), cfg.get("projector"))
    summary = evaluate_model(cfg, model, run_dir / "eval", labels, train_seconds,
                             result["losses"][-1] if result["losses"] else None)
    if summary is None:
        return None
    summary.update(extra or {})
    (run_dir / "ablation.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info("ablation job %s seed %d: %s", "/".join(labels.values()), summary["seed"],
             {t: round(v["accuracy"], 1) for t, v in summary["tasks"].items()})
    return summary
