"""Verifiable rewards on hand-made answers, malformed ones included (scored 0, counted, no crash).

The multiple-choice reward is the benchmarks' own check (the function the MVBench scorer
calls), MRA is compared with VSI-Bench's own formula written as its lmms-eval task does, and
the shipped reward presets compose through Hydra into registered names.
"""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tc_llava.configs import CONFIG_DIR
from tc_llava.eval import mcq as eval_mcq
from tc_llava.rl import rewards
from tc_llava.rl.rewards import (
    REWARDS, check_solution, check_weights, mean_relative_accuracy, parse_span, register, score,
)


def _vsibench_mra(pred, target):
    """VSI-Bench's ``mean_relative_accuracy(pred, target, .5, .95, .05)`` (its lmms-eval task)."""
    conf_intervs = np.linspace(0.5, 0.95, int((0.95 - 0.5) / 0.05 + 2))
    return (abs(pred - target) / target <= 1 - conf_intervs).mean()


def test_mcq_letter_is_the_benchmark_check():
    gt = "(B) the man opens the door"
    cases = {
        "<think>he walks in</think><answer>B</answer>": 1.0,
        "<answer> (B) the man opens the door </answer>": 1.0,
        "B. the man opens the door": 1.0,  # no tags: the whole completion is the answer
        "<answer>C</answer>": 0.0,
        "<answer>(A)</answer>": 0.0,
    }
    for completion, expected in cases.items():
        assert REWARDS["mcq_letter"].fn(completion, gt) == expected, completion
        assert eval_mcq.check_answer(rewards.answer_text(completion), gt) == bool(expected)
    for malformed in ["", "<answer></answer>", "<answer>   </answer>", "<answer>42</answer>", "<answer>(</answer>"]:
        assert REWARDS["mcq_letter"].fn(malformed, gt) is None, malformed


def test_mean_relative_accuracy_is_vsibench():
    gen = np.random.default_rng(0)
    for gt in [0.7, 3.0, 10.0, 250.0]:
        for pred in [gt, *(gt * gen.uniform(0, 2.2, 40)), 1.5 * gt, 0.5 * gt, 1.05 * gt, 0.95 * gt]:
            assert mean_relative_accuracy(pred, gt) == pytest.approx(_vsibench_mra(pred, gt), abs=1e-12)
    assert type(mean_relative_accuracy(15.0, 10.0)) is float
    assert mean_relative_accuracy(15.0, 10.0) == pytest.approx(0.1)  # error 0.5 counts at theta = 0.5 (<=)
    assert mean_relative_accuracy(10.6, 10.0) == pytest.approx(0.9)  # error 0.06 misses only theta = 0.95
    assert mean_relative_accuracy(-3.0, -3.0) == 1.0 and mean_relative_accuracy(3.0, -3.0) == 0.0
    assert mean_relative_accuracy(0.0, 0.0) == 1.0 and mean_relative_accuracy(0.1, 0.0) == 0.0


def test_numeric_reward_reads_numbers_and_counts_the_rest():
    fn = REWARDS["numeric_mra"].fn
    assert fn("<think>x</think><answer>4</answer>", "4") == 1.0
    assert fn("<answer>4.0 meters</answer>", "4") == 1.0
    assert fn("<answer>1,000.</answer>", "1000") == 1.0
    assert fn("<answer>6</answer>", "4") == pytest.approx(_vsibench_mra(6.0, 4.0))
    for malformed in ["", "<answer>four</answer>", "<answer>nan</answer>", "<answer>inf</answer>",
                      "<answer>3.5m</answer>", "<answer>about 4</answer>"]:
        assert fn(malformed, "4") is None, malformed


def test_temporal_iou_accepts_the_documented_spans():
    fn = REWARDS["temporal_iou"].fn
    gt = "10 - 20 seconds"
    for same in ["10 - 20 seconds", "10-20", "10.0s - 20.0s", "from 10 to 20 seconds", "between 10 and 20 s",
                 "[10, 20]", "(10.0, 20.0).", "<answer>10 to 20 secs</answer>", "FROM 10 TO 20 SECONDS"]:
        assert fn(same, gt) == 1.0, same
    assert fn("<answer>15 - 25</answer>", gt) == pytest.approx(5 / 15)
    assert fn("<answer>12.5 - 20.0 seconds</answer>", gt) == pytest.approx(0.75)
    assert fn("<answer>21 - 30</answer>", gt) == 0.0  # disjoint: a readable answer, simply wrong
    assert fn("<answer>4 - 4</answer>", "4 - 4") == 1.0 and fn("<answer>4 - 4</answer>", "3 - 5") == 0.0
    for malformed in ["", "<answer>20 - 10</answer>", "<answer>10</answer>", "<answer>-5 - 3</answer>",
                      "<answer>10 - 20 and 30 - 40</answer>", "<answer>10 - 20 minutes</answer>",
                      "<answer>ten to twenty</answer>"]:
        assert fn(malformed, gt) is None, malformed
    assert parse_span("12.5 - 20.0 seconds") == (12.5, 20.0)


def test_format_is_video_r1s_pattern():
    fn = REWARDS["format"].fn
    assert fn("<think>a\nb</think>\n<answer>B</answer>", "") == 1.0
    for wrong in ["<answer>B</answer>", "<think>a</think>", "x<think>a</think><answer>B</answer>",
                  "<think>a</think><answer>B</answer> trailing", "<think>a<answer>B</answer>", ""]:
        assert fn(wrong, "") == 0.0, wrong


def test_score_weights_applies_by_type_and_counts_malformed():
    completions = ["<think>t</think><answer>B</answer>", "<answer>no idea</answer>",
                   "<think>t</think><answer>4</answer>", "<answer>4 apples</answer>",
                   "<think>t</think><answer>10 - 20</answer>", "<answer>later</answer>"]
    solutions = ["(B) yes", "(B) yes", "4", "9", "10 - 20 s", "10 - 20 s"]
    types = ["mcq", "mcq", "number", "number", "span", "span"]
    batch = score(completions, solutions, types, {"mcq_letter": 1.0, "numeric_mra": 1.0, "temporal_iou": 1.0,
                                                 "format": 0.5})
    assert batch.per_function["mcq_letter"] == [1.0, 0.0, None, None, None, None]
    assert batch.per_function["numeric_mra"] == [None, None, 1.0, 0.0, None, None]
    assert batch.per_function["temporal_iou"] == [None] * 4 + [1.0, 0.0]
    assert batch.per_function["format"] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert batch.total == [1.5, 0.0, 1.5, 0.0, 1.5, 0.0]
    assert batch.malformed == {"mcq_letter": 1, "numeric_mra": 0, "temporal_iou": 1, "format": 0}


def test_adding_a_reward_is_one_function_and_one_weight():
    @register("answer_length", "number")
    def answer_length(completion: str, solution: str) -> float | None:
        return min(1.0, len(completion) / 10)

    try:
        batch = score(["<answer>4</answer>", "(B)"], ["4", "(B) x"], ["number", "mcq"],
                      {"answer_length": 2.0, "mcq_letter": 1.0})
        assert batch.total == [2.0, 1.0] and batch.per_function["answer_length"] == [1.0, None]
        with pytest.raises(ValueError, match="registered twice"):
            register("answer_length")(answer_length)
    finally:
        del REWARDS["answer_length"]


def test_bad_configuration_and_ground_truth_fail_early():
    with pytest.raises(ValueError, match=r"rewards: unknown reward\(s\) \['acuracy'\]"):
        check_weights({"acuracy": 1.0})
    with pytest.raises(ValueError, match="rewards.format: weight 'high'"):
        check_weights({"format": "high"})
    with pytest.raises(ValueError, match="answer type 'free' of sample 1"):
        score(["a", "b"], ["(A) x", "y"], ["mcq", "free"], {"format": 1.0})
    for solution, answer_type in [("about ten", "number"), ("10 to 5", "span"), ("yes", "mcq"), ("x", "ocr")]:
        with pytest.raises(ValueError, match="expected"):
            check_solution(solution, answer_type)
    for solution, answer_type in [("(C) a dog", "mcq"), ("3.5", "number"), ("1 - 2 s", "span")]:
        check_solution(solution, answer_type)


@pytest.mark.parametrize("preset", ["accuracy", "video_r1"])
def test_shipped_presets_name_registered_rewards(preset):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose(overrides=[f"+rewards={preset}"])
    weights = check_weights(cfg.rewards)
    expected = {"mcq_letter": 1.0, "numeric_mra": 1.0, "temporal_iou": 1.0}
    assert weights == (expected if preset == "accuracy" else {**expected, "format": 1.0})
