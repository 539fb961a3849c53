"""Summarise scripts/bench/multi_gpu.sh: parity, resume, scaling, memory, sharded eval."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows[2:] or rows)


def predictions(run: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    return {r["id"]: r["pred"] for r in rows}


def main(work: Path, out: Path) -> None:
    runs = {p.name: metrics(p / "metrics.jsonl") for p in sorted((work / "runs").iterdir())}
    one, two = runs["z2_lora_1proc"], metrics(work / "runs/z2_lora_2proc/metrics_uninterrupted.jsonl")
    resumed = runs["z2_lora_2proc"]
    steps = len(two)
    loss1, loss2 = torch.tensor([r["loss"] for r in one]), torch.tensor([r["loss"] for r in two])
    half = steps // 2
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "loss_parity_1_vs_2": {"steps": steps, "max_rel_diff": ((loss1 - loss2).abs() / loss1.abs()).max().item(),
                               "loss_first_last_1": [loss1[0].item(), loss1[-1].item()],
                               "loss_first_last_2": [loss2[0].item(), loss2[-1].item()]},
        "resume_2proc": {"from_step": half, "max_abs_diff_after": max(
            abs(a["loss"] - b["loss"]) for a, b in zip(two[half:], resumed[-(steps - half):]))},
        "scaling_same_per_gpu_batch": {
            "samples_per_s_1": steady(runs["z2_lora_1proc_b4"], "samples_per_s"),
            "samples_per_s_2": steady(two, "samples_per_s")},
        "peak_mem_gb_per_gpu": {name: max(r["peak_mem_gb"] for r in rows) for name, rows in runs.items()},
        "tokens_per_s": {name: steady(rows, "tokens_per_s") for name, rows in runs.items()},
    }
    s = result["scaling_same_per_gpu_batch"]
    s["ratio"] = s["samples_per_s_2"] / s["samples_per_s_1"]
    p1, p2 = predictions(work / "eval/z3_1proc"), predictions(work / "eval/z3_2proc")
    result["sharded_eval"] = {"items": len(p1), "identical": p1 == p2,
                              "accuracy": json.loads((work / "eval/z3_2proc/results.json").read_text())["Avg"]}
    print(json.dumps(result, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
