"""Scores of the VideoChatGPT benchmark and zero-shot video QA from judge verdicts.

VideoChatGPT: CI, DO and CU judge the generic-QA predictions ``{video_name, Q, A, pred}``,
TU the temporal-QA ones, CO the consistency ones ``{video_name, Q1, Q2, A, pred1,
pred2}``; each dimension's score is the mean over its judged items. Zero-shot QA:
accuracy = yes / (yes + no) and the mean score over judged items.

Items whose judgement failed after the retry budget are excluded from the means and
reported as ``failed`` counts (and ids), so a partly judged run is visible as such.
Judge versions and prompts move the numbers, so every result records the judge
(model, base URL, temperature), which weights judged (``judge_provenance``: model id,
revision or weights hash, endpoint kind) and the prompt hashes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tc_llava.configs import CONFIG_DIR
from tc_llava.eval.judge import Judge, JudgeResult, PromptTemplate, load_prompts
from tc_llava.eval.jsonl import load_records

PROMPTS_DIR = CONFIG_DIR / "judge" / "prompts"
VCG_PROMPTS = PROMPTS_DIR / "videochatgpt.yaml"
QA_PROMPTS = PROMPTS_DIR / "zeroshot_qa.yaml"

# Which prediction split each VideoChatGPT dimension judges.
VCG_SPLITS: dict[str, str] = {
    "CI": "generic",
    "DO": "generic",
    "CU": "generic",
    "TU": "temporal",
    "CO": "consistency",
}


def load_predictions(path: str | os.PathLike, required: Iterable[str]) -> list[dict[str, Any]]:
    """Prediction records from a JSON list or a JSONL file, each checked for ``required`` keys."""
    path = Path(path)
    records = load_records(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of prediction records or JSONL")
    required = list(required)
    for n, rec in enumerate(records):
        missing = [k for k in required if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{path}: record {n} lacks field(s) {missing}; expected {required}")
    return records


def index_items(records: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Ids ``{video_name}_{k}``, k counting repeats of a video, as upstream names them."""
    seen: dict[str, int] = {}
    items = {}
    for rec in records:
        name = str(rec["video_name"])
        k = seen.get(name, 0)
        seen[name] = k + 1
        items[f"{name}_{k}"] = rec
    return items


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_scores(results: Sequence[JudgeResult]) -> dict[str, Any]:
    """Mean score over the judged items, with judged/failed counts and failed ids."""
    ok = [r for r in results if r.ok]
    return {
        "mean_score": _mean([r.parsed["score"] for r in ok]),
        "judged": len(ok),
        "failed": len(results) - len(ok),
        "failed_ids": [r.id for r in results if not r.ok],
    }


def summarize_videochatgpt(results_by_dim: Mapping[str, Sequence[JudgeResult]]) -> dict[str, Any]:
    """Per-dimension means, their plain mean, and the mean over all judged items pooled.

    ``mean_of_dimensions`` averages the five dimension scores (each dimension weighs
    the same) and is None unless all five have judged items; ``item_weighted_mean``
    pools every judged item of the given dimensions, so the three generic-QA dimensions
    weigh by their item counts.
    """
    dims = {dim: summarize_scores(results) for dim, results in results_by_dim.items()}
    pooled = [r.parsed["score"] for results in results_by_dim.values() for r in results if r.ok]
    complete = all(dim in dims and dims[dim]["judged"] for dim in VCG_SPLITS)
    return {
        "dimensions": dims,
        "mean_of_dimensions": _mean([dims[d]["mean_score"] for d in VCG_SPLITS])
        if complete
        else None,
        "item_weighted_mean": _mean(pooled),
        "judged": sum(d["judged"] for d in dims.values()),
        "failed": sum(d["failed"] for d in dims.values()),
    }


def summarize_zeroshot_qa(results: Sequence[JudgeResult]) -> dict[str, Any]:
    """Accuracy = yes / (yes + no) and mean score, over the judged items."""
    summary = summarize_scores(results)
    preds = [r.parsed["pred"] for r in results if r.ok]
    yes, no = preds.count("yes"), preds.count("no")
    return {
        "accuracy": yes / (yes + no) if yes + no else None,
        "yes": yes,
        "no": no,
        **summary,
    }


def _write(output_path: str | os.PathLike | None, result: dict[str, Any]) -> None:
    if output_path is not None:
        Path(output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(output_path).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def _judge_split(
    judge: Judge,
    prompt: PromptTemplate,
    path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    task: str,
) -> tuple[list[JudgeResult], Path]:
    items = index_items(load_predictions(path, ["video_name", *prompt.fields]))
    cache_path = judge.cache_path(cache_dir, task, prompt)
    return judge.score_items(items, prompt, cache_path), cache_path


def run_videochatgpt(
    judge: Judge,
    predictions: Mapping[str, str | os.PathLike],
    cache_dir: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    prompts_path: str | os.PathLike = VCG_PROMPTS,
    dimensions: Sequence[str] = tuple(VCG_SPLITS),
) -> dict[str, Any]:
    """Judge and score VideoChatGPT; ``predictions`` maps generic/temporal/consistency to files."""
    prompts = load_prompts(prompts_path)
    unknown = [d for d in dimensions if d not in VCG_SPLITS or d not in prompts]
    if unknown:
        raise ValueError(f"{prompts_path}: no VideoChatGPT prompt for dimension(s) {unknown}")
    missing = sorted({VCG_SPLITS[d] for d in dimensions} - set(predictions))
    if missing:
        raise ValueError(
            f"predictions: missing split(s) {missing} (keys generic, temporal, consistency)"
        )
    results, caches = {}, {}
    for dim in dimensions:
        split = VCG_SPLITS[dim]
        results[dim], caches[dim] = _judge_split(
            judge, prompts[dim], predictions[split], cache_dir, f"videochatgpt_{dim}"
        )
    result = {
        "benchmark": "videochatgpt",
        "judge": judge.describe(),
        "judge_provenance": judge.provenance(),
        "prompts": {"file": str(prompts_path), "sha": {d: prompts[d].sha for d in dimensions}},
        "predictions": {k: str(v) for k, v in predictions.items()},
        "cache": {d: str(p) for d, p in caches.items()},
        **summarize_videochatgpt(results),
    }
    _write(output_path, result)
    return result


def run_zeroshot_qa(
    judge: Judge,
    predictions: str | os.PathLike,
    cache_dir: str | os.PathLike,
    dataset: str,
    output_path: str | os.PathLike | None = None,
    prompts_path: str | os.PathLike = QA_PROMPTS,
) -> dict[str, Any]:
    """Judge and score one zero-shot QA prediction file (MSVD, MSRVTT, ActivityNet, TGIF)."""
    prompt = load_prompts(prompts_path).get("qa")
    if prompt is None:
        raise ValueError(f"{prompts_path}: expected a prompt named 'qa'")
    results, cache_path = _judge_split(judge, prompt, predictions, cache_dir, f"zeroshot_{dataset}")
    result = {
        "benchmark": "zeroshot_qa",
        "dataset": dataset,
        "judge": judge.describe(),
        "judge_provenance": judge.provenance(),
        "prompts": {"file": str(prompts_path), "sha": {"qa": prompt.sha}},
        "predictions": str(predictions),
        "cache": str(cache_path),
        **summarize_zeroshot_qa(results),
    }
    _write(output_path, result)
    return result
