"""``python -m tc_llava.ablation.collect <multirun dir>``: one table for a rope x mask x seed sweep.

Each job of ``experiment=ablation`` leaves an ``ablation.json`` (rope, mask, seed, timings,
and per task its family, accuracy and chance level). Per job, a family's score is the
mean accuracy of its tasks (every task has the same number of questions) and ``overall``
the mean over all tasks; the table gives, per (rope, mask), the mean and sample standard
deviation of these over seeds, plus every task's mean. Written beside the jobs:
``ablation.md``, ``ablation.csv`` and ``ablation.png`` (family means with +-1 std bars,
chance dashed).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FAMILIES = ("temporal", "static")
SCORES = (*FAMILIES, "overall")


def _job_order(path: Path) -> tuple[int, str]:
    """Hydra names job folders ``<num>_...``: sort by that number, then by path."""
    head = path.parent.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, str(path))


def load_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every job's ``ablation.json`` under ``root``, in job order (numeric directory names first)."""
    root = Path(root)
    files = sorted(root.rglob("ablation.json"), key=_job_order)
    if not files:
        raise FileNotFoundError(f"no ablation.json under {root}: expected the multirun directory of experiment=ablation")
    return [json.loads(f.read_text()) for f in files]


def job_scores(run: dict[str, Any]) -> dict[str, float]:
    """Family and overall means of one job's task accuracies (macro over tasks)."""
    tasks = run["tasks"]
    scores = {f: [t["accuracy"] for t in tasks.values() if t["family"] == f] for f in FAMILIES}
    out = {f: statistics.fmean(v) for f, v in scores.items() if v}
    out["overall"] = statistics.fmean(t["accuracy"] for t in tasks.values())
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (rope, mask) in first-seen order: seeds, mean/std of each score and task, timings."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["rope"], run["mask"]), []).append(run)
    rows = []
    for (rope, mask), jobs in groups.items():
        row: dict[str, Any] = {"rope": rope, "mask": mask, "seeds": len(jobs)}
        per_job = [job_scores(j) for j in jobs]
        for score in SCORES:
            values = [s[score] for s in per_job if score in s]
            if values:
                row[f"{score}_mean"], row[f"{score}_std"] = _mean_std(values)
        for task in jobs[0]["tasks"]:
            row[f"{task}_mean"], row[f"{task}_std"] = _mean_std([j["tasks"][task]["accuracy"] for j in jobs])
        for key in ("train_seconds", "eval_seconds"):
            row[key] = statistics.fmean(j[key] for j in jobs)
        rows.append(row)
    return rows


def chance(run: dict[str, Any]) -> dict[str, float]:
    """Expected accuracy of uniform guessing, per score, from the job's per-task chance levels."""
    return job_scores({"tasks": {t: {**v, "accuracy": v["chance"]} for t, v in run["tasks"].items()}})


def _cell(row: dict[str, Any], key: str) -> str:
    return f"{row[f'{key}_mean']:.1f} ± {row[f'{key}_std']:.1f}" if f"{key}_mean" in row else "n/a"


def markdown(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]) -> str:
    """Family table (mean ± std over seeds, %) with a chance row, then per-task means."""
    tasks = list(runs[0]["tasks"])
    family = {t: runs[0]["tasks"][t]["family"] for t in tasks}
    base = chance(runs[0])
    lines = ["| rope | mask | seeds | temporal | static | overall | train s | eval s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rope']} | {r['mask']} | {r['seeds']} | {_cell(r, 'temporal')} | {_cell(r, 'static')} | "
                     f"{_cell(r, 'overall')} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    lines.append("| chance | | | " + " | ".join(f"{base[s]:.1f}" if s in base else "n/a" for s in SCORES) + " | | |")
    lines += ["", "| rope | mask | " + " | ".join(f"{t} ({family[t]})" for t in tasks) + " |",
              "|---|---|" + "---:|" * len(tasks)]
    for r in rows:
        lines.append(f"| {r['rope']} | {r['mask']} | " + " | ".join(_cell(r, t) for t in tasks) + " |")
    chance_tasks = " | ".join(f"{runs[0]['tasks'][t]['chance']:.1f}" for t in tasks)
    lines.append(f"| chance | | {chance_tasks} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars per variant (temporal / static / overall, ±1 std over seeds), chance dashed."""
    from matplotlib.figure import Figure

    base = chance(runs[0])
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows) + 2), 3.6))
    ax = fig.subplots()
    width = 0.8 / len(SCORES)
    colors = {"temporal": "tab:blue", "static": "tab:green", "overall": "tab:gray"}
    for k, score in enumerate(SCORES):
        xs = [i + (k - (len(SCORES) - 1) / 2) * width for i in range(len(rows))]
        means = [r.get(f"{score}_mean", float("nan")) for r in rows]
        stds = [r.get(f"{score}_std", 0.0) for r in rows]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=score, color=colors[score])
        if score in base:
            ax.hlines(base[score], xs[0] - width / 2, xs[-1] + width / 2, colors=colors[score], linestyles="dashed",
                      linewidth=0.8)
    ax.set_xticks(range(len(rows)), [f"{r['rope']}\n{r['mask']}" for r in rows], fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("rope x mask ablation (mean ± std over seeds; dashed: chance)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """``ablation.md``, ``ablation.csv`` and ``ablation.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "ablation.md", "csv": out / "ablation.csv", "png": out / "ablation.png"}
    paths["md"].write_text(markdown(rows, runs))
    fields = ["rope", "mask", "seeds"] + [f"{s}_{k}" for s in SCORES for k in ("mean", "std")]
    fields += [f"{t}_{k}" for t in runs[0]["tasks"] for k in ("mean", "std")] + ["train_seconds", "eval_seconds"]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    plot(rows, runs, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tc_llava.ablation.collect", description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", type=Path, help="the sweep's directory (holds one folder per job)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: multirun_dir)")
    args = parser.parse_args(argv)
    runs = load_runs(args.multirun_dir)
    paths = write_report(summarize(runs), runs, args.out or args.multirun_dir)
    print(paths["md"].read_text(), flush=True)
    print("\n".join(f"wrote {p}" for p in paths.values()))


if __name__ == "__main__":
    main()
