"""How far two judges agree on the same predictions (``benchmark.stage=calibrate``).

A judge change moves VideoChatGPT and zero-shot QA numbers; before a new judge replaces an old
one (GPT-3.5 to an open model, one open model to the next), score the same saved predictions
with both and look at the agreement per dimension. The reference is either another run's
``results.json`` (its judge caches hold that judge's verdicts) or a file of verdicts
``{dimension or dataset: {item id: {"score": n, "pred": "yes"|"no"}}}`` (a value may also be
Video-ChatGPT's ``[verdict, qa]`` pair), e.g. a user's old GPT-3.5 results. Item ids are the
benchmark's (``{video_name}_{k}``, :func:`tc_llava.eval.scoring.index_items`).

Per dimension, over the items both judged: the two mean scores and their shift (judge minus
reference), Pearson's correlation of the scores, the share of identical scores and of scores
within one point, and for zero-shot QA the share of identical yes/no verdicts (accuracy
agreement) with both accuracies and their shift.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tc_llava.eval.judge import read_cache


def _verdict(value: Any) -> dict[str, Any] | None:
    """A verdict dict from a reference entry: the dict itself, or the first element of ``[verdict, qa]``."""
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, dict) and "score" in value else None


def load_reference(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Verdicts per dimension and item from a run's ``results.json`` (via its judge caches) or a verdict file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark.calibrate.reference={path} not found; expected a judged run's "
                                "results.json or a verdict file {dimension: {item id: {score, pred?}}}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "cache" in data and "judge" in data:  # a judged run's results.json
        caches = data["cache"] if isinstance(data["cache"], dict) else {data.get("dataset", "qa"): data["cache"]}
        return {task: {i: r.parsed for i, r in read_cache(cache).items() if r.ok} for task, cache in caches.items()}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected {{dimension: {{item id: {{score, pred?}}}}}} or a judged run's results.json")
    out = {}
    for task, items in data.items():
        verdicts = {str(i): _verdict(v) for i, v in items.items()}
        bad = [i for i, v in verdicts.items() if v is None]
        if bad:
            raise ValueError(f"{path}: {task} item(s) {bad[:3]} carry no verdict with a 'score'")
        out[task] = verdicts
    return out


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 2:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def agreement(judge: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Agreement of one dimension's verdicts (item id -> verdict) over the items both judged."""
    both = sorted(judge.keys() & reference.keys())
    a, b = [float(judge[i]["score"]) for i in both], [float(reference[i]["score"]) for i in both]
    n = len(both)
    out: dict[str, Any] = {
        "n": n, "only_judge": len(judge.keys() - reference.keys()), "only_reference": len(reference.keys() - judge.keys()),
        "mean_judge": sum(a) / n if n else None, "mean_reference": sum(b) / n if n else None,
        "mean_shift": (sum(a) - sum(b)) / n if n else None, "score_correlation": _pearson(a, b),
        "exact_score_agreement": sum(x == y for x, y in zip(a, b)) / n if n else None,
        "within_one_agreement": sum(abs(x - y) <= 1 for x, y in zip(a, b)) / n if n else None,
    }
    if n and all("pred" in judge[i] and "pred" in reference[i] for i in both):
        yes_a = [judge[i]["pred"] == "yes" for i in both]
        yes_b = [reference[i]["pred"] == "yes" for i in both]
        out.update(accuracy_agreement=sum(x == y for x, y in zip(yes_a, yes_b)) / n,
                   accuracy_judge=sum(yes_a) / n, accuracy_reference=sum(yes_b) / n,
                   accuracy_shift=(sum(yes_a) - sum(yes_b)) / n)
    return out


def calibrate(results: Mapping[str, Any], reference: str | Path) -> dict[str, Any]:
    """Agreement per dimension between the judge that produced ``results`` (a scoring's output) and ``reference``."""
    caches = results["cache"] if isinstance(results["cache"], dict) else {results["dataset"]: results["cache"]}
    ref = load_reference(reference)
    missing = sorted(caches.keys() - ref.keys())
    if missing:
        raise ValueError(f"benchmark.calibrate.reference={reference}: no verdicts for {missing}; it has {sorted(ref)}")
    dims = {}
    for task, cache in caches.items():
        verdicts = {i: r.parsed for i, r in read_cache(cache).items() if r.ok}
        dims[task] = agreement(verdicts, ref[task])
    return {"judge": results["judge"], "judge_provenance": results.get("judge_provenance"),
            "reference": str(reference), "dimensions": dims}


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: Mapping[str, Any]) -> str:
    """The agreement table: one row per dimension."""
    lines = ["| Dimension | n | mean judge | mean reference | shift | Pearson r | same score | within 1 | "
             "same yes/no |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, d in report["dimensions"].items():
        lines.append(f"| {task} | {d['n']} | {_f(d['mean_judge'])} | {_f(d['mean_reference'])} | "
                     f"{_f(d['mean_shift'])} | {_f(d['score_correlation'], 3)} | {_f(d['exact_score_agreement'])} | "
                     f"{_f(d['within_one_agreement'])} | {_f(d.get('accuracy_agreement'))} |")
    return (f"# Judge calibration\n\nJudge: {report['judge']['model']}; reference: {report['reference']}\n\n"
            + "\n".join(lines) + "\n")
