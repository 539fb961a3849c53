"""``python -m tc_llava.eval.compare DIR_A DIR_B``: is B's difference from A on one benchmark significant?

Both directories are run directories of the same benchmark. Multiple-choice runs are paired by
question id from their ``predictions.jsonl`` (questions both answered; one that failed in either
run is left out and counted); per task and overall the report gives both accuracies with Wilson
95% intervals, B - A with a paired bootstrap 95% interval, the discordant counts and McNemar's
exact p (:mod:`tc_llava.eval.stats`). Judged runs (VideoChatGPT, zero-shot QA) are paired by item
from their judge caches: per dimension the mean score difference with its bootstrap interval,
and for zero-shot QA the yes-rate as an accuracy with McNemar's p. A row of both directories'
``provenance`` says whether they ran on the same annotation files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tc_llava.eval.judge import read_cache
from tc_llava.eval.stats import compare_correct, compare_scores


def _results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a benchmark's run directory (python -m tc_llava.eval ...)")
    return json.loads(path.read_text(encoding="utf-8"))


def _mcq_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / "predictions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a multiple-choice run writes it beside results.json")
    return {row["id"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def compare_mcq(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]], seed: int = 0
                ) -> dict[str, Any]:
    """Per task and ``Avg``: paired accuracies of the questions both runs answered."""
    for qid in a.keys() & b.keys():
        if a[qid]["gt"] != b[qid]["gt"] or a[qid]["task"] != b[qid]["task"]:
            raise ValueError(f"question {qid!r} differs between the runs ({a[qid]['gt']!r} vs {b[qid]['gt']!r}): "
                             "they did not run on the same questions")
    both = [q for q in a if q in b and a[q]["correct"] is not None and b[q]["correct"] is not None]
    tasks = list(dict.fromkeys(a[q]["task"] for q in a))
    out = {t: compare_correct([a[q]["correct"] for q in both if a[q]["task"] == t],
                              [b[q]["correct"] for q in both if a[q]["task"] == t], seed) for t in tasks}
    out["Avg"] = compare_correct([a[q]["correct"] for q in both], [b[q]["correct"] for q in both], seed)
    out["Avg"]["unpaired"] = len(a.keys() | b.keys()) - len(both)
    return out


def _verdicts(cache: str | Path) -> dict[str, dict[str, Any]]:
    return {i: r.parsed for i, r in read_cache(cache).items() if r.ok}


def compare_judged(a: Mapping[str, Any], b: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """Per dimension (VideoChatGPT) or dataset (zero-shot QA): paired judge scores, and yes-rates."""
    caches_a = a["cache"] if isinstance(a["cache"], dict) else {a.get("dataset", "qa"): a["cache"]}
    caches_b = b["cache"] if isinstance(b["cache"], dict) else {b.get("dataset", "qa"): b["cache"]}
    out = {}
    for task in caches_a.keys() & caches_b.keys():
        va, vb = _verdicts(caches_a[task]), _verdicts(caches_b[task])
        both = sorted(va.keys() & vb.keys())
        row = compare_scores([va[i]["score"] for i in both], [vb[i]["score"] for i in both], seed)
        if both and "pred" in va[both[0]]:
            row["yes"] = compare_correct([va[i]["pred"] == "yes" for i in both], [vb[i]["pred"] == "yes" for i in both],
                                         seed)
        out[task] = row
    return out


def compare(dir_a: str | Path, dir_b: str | Path, seed: int = 0) -> dict[str, Any]:
    """The paired comparison of two run directories of one benchmark (B - A)."""
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    res_a, res_b = _results(dir_a), _results(dir_b)
    if res_a.get("benchmark") != res_b.get("benchmark"):
        raise ValueError(f"{dir_a} is {res_a.get('benchmark')!r} and {dir_b} is {res_b.get('benchmark')!r}: "
                         "compare two runs of the same benchmark")
    fingerprint = [r.get("provenance", {}).get("data", {}).get("fingerprint") for r in (res_a, res_b)]
    report = {"benchmark": res_a["benchmark"], "a": str(dir_a), "b": str(dir_b), "seed": seed,
              "same_data": fingerprint[0] == fingerprint[1] if None not in fingerprint else None}
    if "judge" in res_a:
        report["kind"], report["tasks"] = "judged", compare_judged(res_a, res_b, seed)
    else:
        report["kind"], report["tasks"] = "mcq", compare_mcq(_mcq_rows(dir_a), _mcq_rows(dir_b), seed)
    return report


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: list[float] | None, digits: int) -> str:
    return "" if interval is None else f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def markdown(report: Mapping[str, Any]) -> str:
    """The report as tables: accuracy rows for multiple choice, score rows for judged benchmarks."""
    head = f"# {report['benchmark']}: B - A\n\nA: {report['a']}\nB: {report['b']}\n"
    if report["same_data"] is False:
        head += "\n**The runs' annotation fingerprints differ**: they did not run on the same data files.\n"
    if report["kind"] == "mcq":
        lines = ["| Task | n | A (%) [95% CI] | B (%) [95% CI] | B - A [95% CI] | only A | only B | McNemar p |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for task, r in report["tasks"].items():
            lines.append(f"| {task} | {r['n']} | {_num(r['accuracy_a'], 1)}{_ci(r['ci95_a'], 1)} | "
                         f"{_num(r['accuracy_b'], 1)}{_ci(r['ci95_b'], 1)} | "
                         f"{_num(r['difference'], 1)}{_ci(r['difference_ci95'], 1)} "
                         f"| {r['only_a']} | {r['only_b']} | {r['mcnemar_p']:.4g} |")
    else:
        lines = ["| Dimension | n | mean A | mean B | B - A [95% CI] | yes-rate McNemar p |", "|---|---:|---:|---:|---:|---:|"]
        for task, r in report["tasks"].items():
            p = f"{r['yes']['mcnemar_p']:.4g}" if "yes" in r else ""
            lines.append(f"| {task} | {r['n']} | {_num(r['mean_a'], 2)} | {_num(r['mean_b'], 2)} | "
                         f"{_num(r['difference'], 2)}{_ci(r['difference_ci95'], 2)} | {p} |")
    return head + "\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tc_llava.eval.compare", description=__doc__.splitlines()[0])
    parser.add_argument("dir_a", type=Path, help="run directory of the baseline (A)")
    parser.add_argument("dir_b", type=Path, help="run directory of the variant (B), same benchmark")
    parser.add_argument("--seed", type=int, default=0, help="seed of the paired bootstrap (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        report = compare(args.dir_a, args.dir_b, args.seed)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report), end="")


if __name__ == "__main__":
    main()
