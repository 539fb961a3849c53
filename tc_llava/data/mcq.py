"""MVBench's multiple-choice text (REFERENCE.md section 3), written in one place.

The evaluator (:mod:`tc_llava.eval.mvbench`) asks every question with :func:`question_block`
and scores against :func:`ground_truth`; the synthetic data (:mod:`tc_llava.data.synthetic`)
trains its multiple-choice turns with the same functions, so a model is asked exactly what
it was trained on. The defaults are the official evaluation's strings;
``configs/benchmark/mvbench.yaml`` repeats them under ``prompt`` so an ablation can change
them without touching code.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail "
    "and movement of objects, and the action and pose of persons. Based on your observations, "
    "select the best option that accurately addresses the question."
)
QUESTION = "Question: {question}\nOptions:\n{options}"  # the whole block is then rstripped
OPTION = "({letter}) {candidate}"  # options joined by "\n"
INSTRUCTION = "\nOnly give the best option."  # appended to the rstripped block
ANSWER_LEAD = "Best option:"  # starts the answer; the evaluator primes the assistant turn with it and "("


def letter(index: int) -> str:
    """The option letter of the ``index``-th candidate: A, B, ..."""
    return chr(ord("A") + index)


def question_block(question: str, candidates: Sequence[str], question_format: str = QUESTION,
                   option_format: str = OPTION, instruction: str = INSTRUCTION) -> str:
    """``Question: ...\\nOptions:\\n(A) ...`` rstripped, then the instruction, as the original builds it."""
    options = "\n".join(option_format.format(letter=letter(k), candidate=c) for k, c in enumerate(candidates))
    return question_format.format(question=question, options=options).rstrip() + instruction


def ground_truth(answer: str, candidates: Sequence[str]) -> str:
    """The option MVBench scores against, ``(X) answer``, whatever the prompt's option format."""
    return OPTION.format(letter=letter(list(candidates).index(answer)), candidate=answer)
