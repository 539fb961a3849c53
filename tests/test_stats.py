"""Paired statistics against hand computation: McNemar's exact p, Wilson's interval, the compare
command on two run directories, and the ablation collector's paired section."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tc_llava.ablation.collect import load_runs, paired, summarize, write_report
from tc_llava.eval import compare as compare_app
from tc_llava.eval.judge import JudgeResult
from tc_llava.eval.stats import mcnemar_exact, paired_bootstrap, wilson_interval

from conftest import REPO


def test_mcnemar_exact_by_hand():
    # b=2, c=8: n=10, P[X <= 2] = (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 56/1024, two-sided 112/1024
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024) == mcnemar_exact(8, 2)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # all five discordant pairs one way
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_wilson_interval_by_hand():
    # 8/10, z=1.96: centre (0.8 + 0.1921)/1.3842 = 0.7167, half 1.96*sqrt(0.016 + 0.00096)/1.3842 = 0.1844
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 0) is None and wilson_interval(0, 5)[0] == 0.0


def test_paired_bootstrap_is_seeded_and_brackets_the_difference():
    a, b = [1.0] * 30 + [0.0] * 30, [1.0] * 40 + [0.0] * 20
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    lo, hi = paired_bootstrap(a, b)
    assert lo < 10 / 60 < hi and lo > 0  # every pair differs the same way: never below zero
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0], [1.0, 0.0])


def _run_dir(root: Path, name: str, correct: dict[str, bool | None], benchmark: str = "tvbench") -> Path:
    """A multiple-choice run directory as tc_llava.eval.mcq writes it (the fields compare reads)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"benchmark": benchmark,
                                                  "provenance": {"data": {"fingerprint": "f00d"}}}))
    rows = [{"id": qid, "task": qid.split("/")[0], "gt": f"(A) {qid}", "correct": ok} for qid, ok in correct.items()]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_compare_two_runs_by_hand(tmp_path, capsys):
    # Count: 10 paired questions, A right on 1-2 only... B right on 3-10 as well: b=2 (only A), c=8 (only B)
    a = {f"Count/{k}": k < 2 for k in range(10)} | {f"Order/{k}": True for k in range(4)}
    b = {f"Count/{k}": k >= 2 for k in range(10)} | {f"Order/{k}": k != 3 for k in range(4)}
    a["Order/9"], b["Order/9"] = None, True  # failed in A: left out, counted as unpaired
    dir_a, dir_b = _run_dir(tmp_path, "a", a), _run_dir(tmp_path, "b", b)
    report = compare_app.compare(dir_a, dir_b)
    count, order, avg = report["tasks"]["Count"], report["tasks"]["Order"], report["tasks"]["Avg"]
    assert (count["n"], count["only_a"], count["only_b"]) == (10, 2, 8)
    assert count["mcnemar_p"] == pytest.approx(112 / 1024)
    assert count["accuracy_a"] == 20.0 and count["accuracy_b"] == 80.0 and count["difference"] == 60.0
    assert (order["only_a"], order["only_b"], order["mcnemar_p"]) == (1, 0, 1.0)
    assert (avg["n"], avg["only_a"], avg["only_b"], avg["unpaired"]) == (14, 3, 8, 1)
    assert avg["mcnemar_p"] == pytest.approx(2 * sum(math.comb(11, k) for k in range(4)) / 2**11)
    assert report["same_data"] is True

    compare_app.main([str(dir_a), str(dir_b), "--out", str(tmp_path / "cmp.json")])
    printed = capsys.readouterr().out
    assert "| Count | 10 | 20.0 [" in printed and "| 2 | 8 | 0.1094 |" in printed
    assert json.loads((tmp_path / "cmp.json").read_text())["tasks"]["Count"]["only_b"] == 8


def test_compare_refuses_other_benchmarks_and_other_questions(tmp_path):
    dir_a = _run_dir(tmp_path, "a", {"Count/0": True})
    other = _run_dir(tmp_path, "b", {"Count/0": True}, benchmark="mvbench")
    proc = subprocess.run([sys.executable, "-m", "tc_llava.eval.compare", str(dir_a), str(other)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "compare two runs of the same benchmark" in proc.stderr
    changed = _run_dir(tmp_path, "c", {"Count/0": True})
    (changed / "predictions.jsonl").write_text(json.dumps({"id": "Count/0", "task": "Count", "gt": "(B) x",
                                                           "correct": True}) + "\n")
    with pytest.raises(ValueError, match="'Count/0' differs between the runs"):
        compare_app.compare(dir_a, changed)


def _judged_run(root: Path, name: str, verdicts: dict[str, dict]) -> Path:
    """A zero-shot QA run directory: results.json naming its judge cache, the cache holding the verdicts."""
    run = root / name
    (run / "judge").mkdir(parents=True)
    cache = run / "judge" / "zeroshot_msvd.judge.abc.jsonl"
    cache.write_text("".join(json.dumps(JudgeResult(i, "ok", v, "raw", None, 1, "x").to_record()) + "\n"
                             for i, v in verdicts.items()))
    (run / "results.json").write_text(json.dumps({"benchmark": "zeroshot_qa", "dataset": "msvd",
                                                  "judge": {"model": "judge"}, "cache": str(cache)}))
    return run


def test_compare_judged_runs_by_hand(tmp_path):
    a = {f"v{k}_0": {"pred": "yes" if k < 3 else "no", "score": 3} for k in range(6)}
    b = {f"v{k}_0": {"pred": "yes", "score": 3 + (k % 2)} for k in range(6)}  # scores +0/+1 alternately
    report = compare_app.compare(_judged_run(tmp_path, "a", a), _judged_run(tmp_path, "b", b))
    msvd = report["tasks"]["msvd"]
    assert report["kind"] == "judged" and msvd["n"] == 6
    assert (msvd["mean_a"], msvd["mean_b"], msvd["difference"]) == (3.0, 3.5, 0.5)
    assert 0.0 <= msvd["difference_ci95"][0] <= 0.5 <= msvd["difference_ci95"][1] <= 1.0
    assert (msvd["yes"]["only_a"], msvd["yes"]["only_b"], msvd["yes"]["mcnemar_p"]) == (0, 3, pytest.approx(0.25))


def _job(root: Path, num: int, rope: str, seed: int, correct: dict[str, bool]) -> None:
    """An ablation job directory with per-question predictions, as tc_llava.ablation.job leaves it."""
    job = root / f"{num}_job"
    (job / "eval").mkdir(parents=True)
    tasks = {"Order": {"family": "temporal", "accuracy": 0.0, "chance": 25.0, "total": 5},
             "Color": {"family": "static", "accuracy": 0.0, "chance": 25.0, "total": 5}}
    rows = [{"id": q, "task": q.split("/")[0], "correct": ok} for q, ok in correct.items()]
    (job / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (job / "ablation.json").write_text(json.dumps({
        "rope": rope, "mask": "causal", "seed": seed, "train_seconds": 1.0, "eval_seconds": 1.0, "tasks": tasks,
        "results": str(job / "eval" / "results.json")}))


def test_collector_pairs_variants_question_by_question(tmp_path):
    root = tmp_path / "multirun"
    # seed 0: vanilla right on Order/0-1, tad on Order/0-4; seed 1: vanilla Order/0, tad Order/0-3
    _job(root, 0, "vanilla", 0, {f"Order/{k}": k < 2 for k in range(5)} | {"Color/0": True})
    _job(root, 1, "tad", 0, {f"Order/{k}": True for k in range(5)} | {"Color/0": True})
    _job(root, 2, "vanilla", 1, {f"Order/{k}": k < 1 for k in range(5)} | {"Color/0": True})
    _job(root, 3, "tad", 1, {f"Order/{k}": k < 4 for k in range(5)} | {"Color/0": False})
    runs = load_runs(root)
    (row,) = paired(runs)
    assert row["baseline"] == ["vanilla", "causal", "mlp"] and row["variant"] == ["tad", "causal", "mlp"]
    assert row["seeds"] == [0, 1]
    # temporal: 10 pairs, only tad right on 3 (seed 0) + 3 (seed 1) = 6, only vanilla 0: p = 2/64
    assert (row["temporal"]["n"], row["temporal"]["only_a"], row["temporal"]["only_b"]) == (10, 0, 6)
    assert row["temporal"]["mcnemar_p"] == pytest.approx(2 / 64)
    assert (row["static"]["only_a"], row["static"]["only_b"]) == (1, 0)
    assert row["overall"]["n"] == 12 and row["overall"]["mcnemar_p"] == pytest.approx(mcnemar_exact(1, 6))
    paths = write_report(summarize(runs), runs, root)
    md = paths["md"].read_text()
    assert "Paired against vanilla/causal" in md and "| tad | causal | 2 | +60.0 [" in md
    assert json.loads(paths["paired"].read_text())[0]["temporal"]["only_b"] == 6
    assert paired(runs, baseline=("tad", "causal", "mlp"))[0]["temporal"]["only_a"] == 6
