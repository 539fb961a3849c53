"""Verifiable rewards: rule-based functions registered by name, weighted and summed from configuration.

A reward is ``fn(completion, solution) -> float | None``: a value in [0, 1], or ``None`` when
the completion's answer cannot be read (malformed), which scores 0 and is counted. A
function never raises on a completion; a solution it cannot read is a data error and raises
(:func:`check_solution`, meant to run when the prompt set loads). Each reward checks one
answer type (``mcq``, ``number``, ``span``) or every completion (``None``, e.g. format);
on a sample of another type it does not apply and gives nothing, as TRL's reward functions
return ``None`` there. Adding a reward is one function under ``@register`` here and one
line ``name: weight`` in ``configs/rewards/*.yaml``.

The answer is read from the first ``<answer>...</answer>`` of the completion, as Video-R1
does (``src/r1-v/src/open_r1/grpo.py``, tulerfeng/Video-R1 at 59d65c34), or is the whole
stripped completion when it has none, so models prompted without the tags score too
(``format`` is the reward that asks for the tags).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tc_llava.eval.mcq import check_answer

ANSWER_TYPES = ("mcq", "number", "span")
_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
# Video-R1's format reward: the whole completion is one think block then one answer block.
_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_OPTION = re.compile("[a-g]")  # the letter check_answer's guard asks of a first token
_SOLUTION_OPTION = re.compile(r"\(?[a-g]\)?[.:]?")  # a ground truth's first token: B, (B), B. or B:

# A time span in seconds, matched against the whole answer, case-insensitive:
#   "12.5 - 20.0 seconds", "12.5-20", "12.5s - 20s", "from 12.5 to 20 seconds",
#   "between 12.5 and 20.0 s", "[12.5, 20.0]", "(12.5, 20.0)"; an optional final ".".
_NUM = r"(\d+(?:\.\d+)?)"
_UNIT = r"(?:\s*(?:s|secs?|seconds?))?"
_SPAN = (
    re.compile(rf"(?:(?:from|between)\s+)?{_NUM}{_UNIT}\s*(?:-|–|to|and)\s*{_NUM}{_UNIT}\.?", re.IGNORECASE),
    re.compile(rf"[\[(]\s*{_NUM}{_UNIT}\s*,\s*{_NUM}{_UNIT}\s*[\])]\.?", re.IGNORECASE),
)
# VSI-Bench's MRA thresholds and comparison, as its lmms-eval task computes them
# (``mean_relative_accuracy(pred, target, .5, .95, .05)``: ``abs_dist_norm <= 1 - linspace(.5, .95, 10)``).
_MRA_TOLERANCES = tuple((1 - np.linspace(0.5, 0.95, 10)).tolist())

RewardFn = Callable[[str, str], "float | None"]


@dataclass(frozen=True)
class Reward:
    """A registered reward: its function and the answer type it checks (``None``: every completion)."""

    name: str
    fn: RewardFn
    answer_type: str | None


REWARDS: dict[str, Reward] = {}


def register(name: str, answer_type: str | None = None) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn(completion, solution) -> float | None`` as the reward ``name``."""
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        raise ValueError(f"reward {name!r}: answer type {answer_type!r} is not one of {ANSWER_TYPES}")

    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice "
                             f"({REWARDS[name].fn.__qualname__}, {fn.__qualname__})")
        REWARDS[name] = Reward(name, fn, answer_type)
        return fn

    return add


def answer_text(completion: str) -> str:
    """The inside of the first ``<answer>...</answer>``, stripped; the stripped completion if none."""
    match = _ANSWER.search(completion)
    return (match.group(1) if match else completion).strip()


def parse_number(text: str) -> float | None:
    """VSI-Bench's reading: the first word, trailing '.' dropped (and ',' separators, as Video-R1
    drops them), as a finite float; None if that is not a number."""
    words = text.split()
    if not words:
        return None
    try:
        value = float(words[0].rstrip(".").replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_span(text: str) -> tuple[float, float] | None:
    """``(start, end)`` seconds from one of the accepted span formats (module comment), or None
    when the text is not exactly one span or ends before it starts."""
    for pattern in _SPAN:
        match = pattern.fullmatch(text.strip())
        if match:
            start, end = float(match.group(1)), float(match.group(2))
            return (start, end) if start <= end else None
    return None


def mean_relative_accuracy(pred: float, gt: float) -> float:
    """MRA (VSI-Bench): the share of ``theta`` in 0.50, 0.55, ..., 0.95 with ``|pred - gt| / |gt| <= 1 - theta``.

    ``<=`` as VSI-Bench's code compares (its paper writes ``<``). A ground truth of 0 counts
    only an exact 0 (relative error 0, else infinite).
    """
    error = abs(pred - gt) / abs(gt) if gt else (0.0 if pred == gt else math.inf)
    return sum(error <= tol for tol in _MRA_TOLERANCES) / len(_MRA_TOLERANCES)


def temporal_iou(pred: tuple[float, float], gt: tuple[float, float]) -> float:
    """Intersection over union of two time spans; two identical points score 1."""
    inter = max(0.0, min(pred[1], gt[1]) - max(pred[0], gt[0]))
    union = max(pred[1], gt[1]) - min(pred[0], gt[0])
    return inter / union if union > 0 else float(pred == gt)


@register("mcq_letter", "mcq")
def mcq_letter(completion: str, solution: str) -> float | None:
    """1 if the answer names the solution's option by the benchmarks' own check
    (:func:`tc_llava.eval.mcq.check_answer`, MVBench's first-token match); malformed when the
    answer's first token holds no option letter A-G."""
    answer = answer_text(completion)
    words = answer.lower().split()
    if not words or not _OPTION.search(words[0].replace(".", "")):
        return None
    return float(check_answer(answer, solution))


@register("numeric_mra", "number")
def numeric_mra(completion: str, solution: str) -> float | None:
    """Mean relative accuracy of the answer's number (:func:`mean_relative_accuracy`)."""
    pred = parse_number(answer_text(completion))
    return None if pred is None else mean_relative_accuracy(pred, _solution_number(solution))


@register("temporal_iou", "span")
def temporal_iou_reward(completion: str, solution: str) -> float | None:
    """Temporal IoU of the answer's span with the solution's (:func:`parse_span` formats)."""
    pred = parse_span(answer_text(completion))
    return None if pred is None else temporal_iou(pred, _solution_span(solution))


@register("format")
def format_reward(completion: str, solution: str) -> float | None:
    """1 if the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>`` (Video-R1)."""
    return float(_FORMAT.fullmatch(completion) is not None)


def _solution_number(solution: str) -> float:
    value = parse_number(solution)
    if value is None:
        raise ValueError(f"numeric solution {solution!r:.60}: expected a number such as 3.5")
    return value


def _solution_span(solution: str) -> tuple[float, float]:
    span = parse_span(solution)
    if span is None:
        raise ValueError(f"span solution {solution!r:.60}: expected a time span such as '12.5 - 20.0 seconds'")
    return span


def check_solution(solution: str, answer_type: str) -> None:
    """Refuse a ground truth the rewards of ``answer_type`` could not read (a data error, raised at load)."""
    if answer_type == "number":
        _solution_number(solution)
    elif answer_type == "span":
        _solution_span(solution)
    elif answer_type == "mcq":
        words = solution.lower().split()
        if not words or not _SOLUTION_OPTION.fullmatch(words[0]):
            raise ValueError(f"mcq solution {solution!r:.60}: expected the option letter A-G first, as in '(B) a cat'")
    else:
        raise ValueError(f"answer type {answer_type!r}: expected one of {ANSWER_TYPES}")


def check_weights(weights: Mapping[str, object], where: str = "rewards") -> dict[str, float]:
    """The configured ``{name: weight}`` as floats, every name registered and every weight finite."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"{where}: unknown reward(s) {unknown}; registered: {sorted(REWARDS)}")
    checked = {}
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{where}.{name}: weight {weight!r} is not a finite number")
        checked[name] = float(weight)
    if not checked:
        raise ValueError(f"{where}: no reward configured; registered: {sorted(REWARDS)}")
    return checked


@dataclass(frozen=True)
class RewardBatch:
    """Scores of a batch: ``total`` (the weighted sum per completion, what advantages are made
    of), ``per_function`` (each reward's value per completion, None where it does not apply)
    and ``malformed`` (per reward, how many completions it could not read)."""

    total: list[float]
    per_function: dict[str, list[float | None]]
    malformed: dict[str, int]


def score(completions: Sequence[str], solutions: Sequence[str], answer_types: Sequence[str],
          weights: Mapping[str, object]) -> RewardBatch:
    """Each configured reward on each completion it applies to, weighted and summed."""
    if not len(completions) == len(solutions) == len(answer_types):
        raise ValueError(f"score: {len(completions)} completions, {len(solutions)} solutions and "
                         f"{len(answer_types)} answer types must be as many")
    bad = [(i, t) for i, t in enumerate(answer_types) if t not in ANSWER_TYPES]
    if bad:
        raise ValueError(f"score: answer type {bad[0][1]!r} of sample {bad[0][0]} is not one of {ANSWER_TYPES}")
    weights = check_weights(weights)
    total = [0.0] * len(completions)
    per_function: dict[str, list[float | None]] = {}
    malformed = dict.fromkeys(weights, 0)
    for name, weight in weights.items():
        reward, values = REWARDS[name], []
        for i, (completion, solution, answer_type) in enumerate(zip(completions, solutions, answer_types)):
            if reward.answer_type not in (None, answer_type):
                values.append(None)
                continue
            value = reward.fn(completion, solution)
            if value is None:
                malformed[name] += 1
                value = 0.0
            values.append(value)
            total[i] += weight * value
        per_function[name] = values
    return RewardBatch(total, per_function, malformed)
