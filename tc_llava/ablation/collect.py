"""``python -m tc_llava.ablation.collect <multirun dir>``: one table for a rope x mask x seed sweep.

Each job of ``experiment=ablation`` leaves an ``ablation.json`` (rope, mask, seed, timings,
and per task its family, accuracy and chance level). Its rope and mask name their parameters
that differ from the rule's defaults (``tad-gamma0.5``), and a projector other than the default
MLP is named too, so a variant is a rule with its parameters: a ``rope.gamma=0,0.5,1`` sweep gives
three rows. Per job, a family's score is the
mean accuracy of its tasks (every task has the same number of questions) and ``overall``
the mean over all tasks; the table gives, per variant, the mean and sample standard
deviation of these over seeds, plus every task's mean. Seed spread alone does not say whether
a difference between variants is real: every variant is also compared with a baseline (the first
variant, or ``--baseline rope/mask``) question by question, pooling the seeds both ran
(:func:`paired`: B - A with a paired bootstrap 95% interval and McNemar's exact p, per family
and overall, from each job's ``eval/predictions.jsonl``). Written beside the jobs:
``ablation.md``, ``ablation.csv``, ``ablation.png`` (family means with +-1 std bars, chance
dashed) and ``ablation_paired.json``.

An RL sweep (:mod:`tc_llava.ablation.rl`, whose jobs carry their start's scores) pairs each job with its own
SFT start instead (:func:`against_start`): ``rl_ablation.md`` and ``rl_ablation.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tc_llava.eval.stats import compare_correct

FAMILIES = ("temporal", "static")
SCORES = (*FAMILIES, "overall")
VARIANT = ("rope", "mask", "projector")  # what tells variants apart; jobs with the default MLP name no projector
DEFAULT_PROJECTOR = "mlp"


def variant_of(run: dict[str, Any]) -> tuple[str, str, str]:
    """A job's (rope, mask, projector) labels."""
    return run["rope"], run["mask"], run.get("projector", DEFAULT_PROJECTOR)


def columns(runs: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The variant columns a table shows: rope and mask, and the projector where a job changed it."""
    return VARIANT if any("projector" in run for run in runs) else VARIANT[:2]


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
    """One row per variant in first-seen order: seeds, mean/std of each score and task, timings."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(variant_of(run), []).append(run)
    rows = []
    for key, jobs in groups.items():
        row: dict[str, Any] = {**dict(zip(VARIANT, key)), "seeds": len(jobs)}
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


def _correct_by_question(run: dict[str, Any]) -> dict[str, tuple[str, bool]] | None:
    """Question id -> (task, correct) from the job's ``predictions.jsonl``; None where it has none."""
    path = Path(run["results"]).parent / "predictions.jsonl" if run.get("results") else None
    if path is None or not path.is_file():
        return None
    rows = map(json.loads, path.read_text(encoding="utf-8").splitlines())
    return {r["id"]: (r["task"], r["correct"]) for r in rows if r["correct"] is not None}


def paired(runs: Sequence[dict[str, Any]], baseline: tuple[str, str, str] | None = None) -> list[dict[str, Any]]:
    """Each other variant against ``baseline`` (default: the first), per question, over the seeds both ran.

    Pairs are (seed, question id) answered in both jobs of a seed; the families follow each
    question's task. Variants without per-question predictions are left out.
    """
    groups: dict[tuple[str, str, str], dict[int, dict[str, tuple[str, bool]]]] = {}
    family: dict[str, str] = {}
    for run in runs:
        correct = _correct_by_question(run)
        if correct is not None:
            groups.setdefault(variant_of(run), {})[run["seed"]] = correct
            family.update({t: v["family"] for t, v in run["tasks"].items()})
    base = baseline or next(iter(groups), None)
    if base not in groups:
        return []
    out = []
    for variant, seeds in groups.items():
        if variant == base:
            continue
        pairs = [(family.get(seeds[s][q][0]), groups[base][s][q][1], seeds[s][q][1])
                 for s in sorted(seeds.keys() & groups[base].keys()) for q in sorted(seeds[s].keys() & groups[base][s].keys())]
        row: dict[str, Any] = {"baseline": list(base), "variant": list(variant),
                               "seeds": sorted(seeds.keys() & groups[base].keys())}
        for score in SCORES:
            chosen = [(a, b) for f, a, b in pairs if score == "overall" or f == score]
            if chosen:
                row[score] = compare_correct([a for a, _ in chosen], [b for _, b in chosen])
        out.append(row)
    return out


def _comparison_cell(c: dict[str, Any] | None) -> str:
    """One paired comparison as a table cell: B - A [95% CI], McNemar p (n)."""
    if c is None or c["difference"] is None:
        return "n/a"
    low, high = c["difference_ci95"]
    return f"{c['difference']:+.1f} [{low:+.1f}, {high:+.1f}], p={c['mcnemar_p']:.3g} (n={c['n']})"


def paired_markdown(rows: Sequence[dict[str, Any]], shown: Sequence[str] = VARIANT[:2]) -> str:
    """The paired comparisons as a table: B - A (points) [95% CI], McNemar p, per family and overall;
    variants by their ``shown`` columns."""
    if not rows:
        return ""
    width = len(shown)
    base = "/".join(rows[0]["baseline"][:width])
    lines = [f"Paired against {base} (same seeds, question by question): B - A in points [95% bootstrap CI], "
             "McNemar exact p.", "", "| " + " | ".join(shown) + " | seeds | " + " | ".join(SCORES) + " |",
             "|" + "---|" * width + "---:|" + "---:|" * len(SCORES)]
    for r in rows:
        cells = [_comparison_cell(r.get(score)) for score in SCORES]
        lines.append("| " + " | ".join(r["variant"][:width]) + f" | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def against_start(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """An RL sweep (:mod:`tc_llava.ablation.rl`): each job against its own SFT start, question by question
    (B - A with a paired bootstrap 95% interval and McNemar's exact p, per family and overall), with both
    jobs' scores. Jobs without per-question predictions (theirs or their start's) are left out."""
    rows = []
    for run in runs:
        mine, base = _correct_by_question(run), _correct_by_question(run["start"])
        if mine is None or base is None:
            continue
        family = {task: v["family"] for task, v in run["tasks"].items()}
        common = sorted(mine.keys() & base.keys())
        row: dict[str, Any] = {key: run[key] for key in ("algorithm", "rope", "mask", "seed")}
        row.update(rl=job_scores(run), start=job_scores(run["start"]))
        for score in SCORES:
            chosen = [q for q in common if score == "overall" or family[mine[q][0]] == score]
            if chosen:
                row[score] = compare_correct([base[q][1] for q in chosen], [mine[q][1] for q in chosen])
        rows.append(row)
    return rows


def against_start_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Per RL job: its overall score and its start's (%), then RL - start in points [95% CI], McNemar p, per
    family and overall."""
    lines = ["Each RL job against its SFT start (the same rules, question by question): RL - start in points "
             "[95% bootstrap CI], McNemar exact p.", "",
             "| algorithm | rope | mask | seed | RL overall | start overall | " + " | ".join(SCORES) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(SCORES)]
    for r in rows:
        cells = [_comparison_cell(r.get(score)) for score in SCORES]
        lines.append(f"| {r['algorithm']} | {r['rope']} | {r['mask']} | {r['seed']} | {r['rl']['overall']:.1f} | "
                     f"{r['start']['overall']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    shown = columns(runs)
    head, rule, blank = " | ".join(shown), "---|" * len(shown), " |" * (len(shown) - 1)
    lines = [f"| {head} | seeds | temporal | static | overall | train s | eval s |",
             f"|{rule}---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append("| " + " | ".join(r[k] for k in shown) + f" | {r['seeds']} | {_cell(r, 'temporal')} | "
                     f"{_cell(r, 'static')} | {_cell(r, 'overall')} | {r['train_seconds']:.0f} | "
                     f"{r['eval_seconds']:.0f} |")
    lines.append(f"| chance{blank} | | " + " | ".join(f"{base[s]:.1f}" if s in base else "n/a" for s in SCORES)
                 + " | | |")
    lines += ["", f"| {head} | " + " | ".join(f"{t} ({family[t]})" for t in tasks) + " |",
              f"|{rule}" + "---:|" * len(tasks)]
    for r in rows:
        lines.append("| " + " | ".join(r[k] for k in shown) + " | " + " | ".join(_cell(r, t) for t in tasks) + " |")
    chance_tasks = " | ".join(f"{runs[0]['tasks'][t]['chance']:.1f}" for t in tasks)
    lines.append(f"| chance{blank} | {chance_tasks} |")
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
    ax.set_xticks(range(len(rows)), ["\n".join(r[k] for k in columns(runs)) for r in rows], fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("rope x mask ablation (mean ± std over seeds; dashed: chance)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], out_dir: str | Path,
                 baseline: tuple[str, str, str] | None = None) -> dict[str, Path]:
    """``ablation.md``, ``ablation.csv``, ``ablation.png`` and ``ablation_paired.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "ablation.md", "csv": out / "ablation.csv", "png": out / "ablation.png",
             "paired": out / "ablation_paired.json"}
    comparisons = paired(runs, baseline)
    shown = columns(runs)
    paths["md"].write_text(markdown(rows, runs) + ("\n" + paired_markdown(comparisons, shown) if comparisons else ""))
    paths["paired"].write_text(json.dumps(comparisons, indent=1) + "\n")
    fields = [*shown, "seeds"] + [f"{s}_{k}" for s in SCORES for k in ("mean", "std")]
    fields += [f"{t}_{k}" for t in runs[0]["tasks"] for k in ("mean", "std")] + ["train_seconds", "eval_seconds"]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    plot(rows, runs, paths["png"])
    return paths


def write_rl_report(runs: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """An RL sweep's ``rl_ablation.md`` (:func:`against_start_markdown`) and ``rl_ablation.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = against_start(runs)
    paths = {"md": out / "rl_ablation.md", "json": out / "rl_ablation.json"}
    paths["md"].write_text(against_start_markdown(rows))
    paths["json"].write_text(json.dumps(rows, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tc_llava.ablation.collect", description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", type=Path, help="the sweep's directory (holds one folder per job)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: multirun_dir)")
    parser.add_argument("--baseline", default=None, metavar="ROPE/MASK[/PROJECTOR]",
                        help="the variant the others are paired against, as its table row names it, e.g. "
                             "tad-gamma0.5/causal (default: the first)")
    args = parser.parse_args(argv)
    runs = load_runs(args.multirun_dir)
    baseline = None
    if args.baseline:
        parts = args.baseline.split("/")
        if len(parts) not in (2, 3):
            parser.exit(2, f"error: --baseline {args.baseline!r}: expected ROPE/MASK[/PROJECTOR], "
                           "e.g. vanilla/causal\n")
        baseline = (*parts, DEFAULT_PROJECTOR) if len(parts) == 2 else tuple(parts)
    if all("start" in run for run in runs):  # an RL sweep: every job against its own start
        paths = write_rl_report(runs, args.out or args.multirun_dir)
    else:
        paths = write_report(summarize(runs), runs, args.out or args.multirun_dir, baseline)
    print(paths["md"].read_text(), flush=True)
    print("\n".join(f"wrote {p}" for p in paths.values()))


if __name__ == "__main__":
    main()
