"""Paired statistics for two systems scored on the same questions.

Two evaluations of one benchmark answer the same questions, so their difference is tested per
question rather than from their two accuracies: the exact McNemar test counts the discordant
pairs (``b``: only A right, ``c``: only B right) and asks how likely a split at least that
uneven is under a fair coin, ``p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])``. Intervals:
Wilson's score interval for one accuracy, a paired bootstrap (questions resampled with a fixed
seed, so the interval is reproducible) for the difference of accuracies or mean scores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c`` (1.0 when both are 0)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of ``correct / total`` (fractions); None for no trials."""
    if total == 0:
        return None
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``mean(b) - mean(a)`` over question resamples (same indices for both)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists; got {len(a)} and {len(b)}")
    rng = random.Random(seed)
    n = len(a)
    diffs = [x - y for x, y in zip(b, a)]
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int(math.floor((1 - level) / 2 * (resamples - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (resamples - 1)))]
    return lo, hi


def compare_correct(a: Sequence[bool], b: Sequence[bool], seed: int = 0) -> dict[str, Any]:
    """Accuracies (%) with Wilson intervals, their difference B - A with a paired bootstrap interval,
    the discordant counts and McNemar's exact p, for questions answered by both."""
    n = len(a)
    if len(b) != n:
        raise ValueError(f"compare_correct needs paired lists; got {n} and {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    out: dict[str, Any] = {"n": n, "accuracy_a": None, "accuracy_b": None, "difference": None,
                           "difference_ci95": None, "ci95_a": None, "ci95_b": None,
                           "only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}
    if n:
        ka, kb = sum(a), sum(b)
        lo, hi = paired_bootstrap([float(x) for x in a], [float(y) for y in b], seed=seed)
        out.update(accuracy_a=100 * ka / n, accuracy_b=100 * kb / n, difference=100 * (kb - ka) / n,
                   difference_ci95=[100 * lo, 100 * hi],
                   ci95_a=[100 * x for x in wilson_interval(ka, n)], ci95_b=[100 * x for x in wilson_interval(kb, n)])
    return out


def compare_scores(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Mean scores, their difference B - A and its paired bootstrap interval (a judge's 0-5 scores)."""
    if len(a) != len(b):
        raise ValueError(f"compare_scores needs paired lists; got {len(a)} and {len(b)}")
    if not a:
        return {"n": 0, "mean_a": None, "mean_b": None, "difference": None, "difference_ci95": None}
    lo, hi = paired_bootstrap(a, b, seed=seed)
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    return {"n": len(a), "mean_a": mean_a, "mean_b": mean_b, "difference": mean_b - mean_a,
            "difference_ci95": [lo, hi]}
