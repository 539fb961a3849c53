"""LLM-as-judge for the VideoChatGPT benchmark and zero-shot video QA.

The upstream Video-ChatGPT scripts call gpt-3.5-turbo, ``ast.literal_eval`` the reply and
loop forever until every item parses. Here every item gets a bounded number of attempts;
what still fails is recorded as failed (with its last raw reply or error) and counted by
the scoring, never silently dropped and never retried forever within a run.

Two judges share one interface, :meth:`Judge.score_items`:

- :class:`OpenAIJudge` speaks the OpenAI chat-completions protocol over the standard
  library (any compatible server: OpenAI, vLLM, llama.cpp, ...), with a thread pool,
  per-request timeout and exponential backoff with jitter that honours ``Retry-After``.
- :class:`LocalJudge` runs any Hugging Face causal LM from a local path, greedily.

Every judged item is appended to a JSONL cache (:mod:`tc_llava.eval.jsonl`) as soon as it
is done, so an interrupted or repeated run only asks for what is missing, and a run whose
verdicts are all cached never contacts the judge. A dead or broken endpoint (no connection,
5xx, empty or garbled bodies, replies without a verdict) stops the run early
(:class:`CircuitBreaker`) instead of costing every remaining item its full retry budget, and
:meth:`Judge.preflight` lets the eval app find a missing key, an unreachable server or a model
the server lacks before it generates anything. The cache
file name carries the judge model and the prompt hash (:meth:`Judge.cache_path`): another
judge or another prompt never reuses these judgements.

One concern per module: :mod:`.parsing` (verdicts out of replies), :mod:`.prompts` (pinned prompt
files), :mod:`.breaker` (failure kinds and the circuit breaker), :mod:`.base` (the :class:`Judge`
interface, its retry loop and verdict cache), :mod:`.openai_compatible` and :mod:`.local` (the two
judges). Everything public is importable from here, as configs name it
(``_target_: tc_llava.eval.judge.OpenAIJudge``).
"""

from tc_llava.eval.judge.base import Judge, JudgeResult, read_cache
from tc_llava.eval.judge.breaker import (
    UNPARSEABLE, CircuitBreaker, FailedReply, ItemJudgeError, JudgeError, TransientJudgeError, UnreachableError,
)
from tc_llava.eval.judge.local import LocalJudge
from tc_llava.eval.judge.openai_compatible import TOKEN_LIMIT_FIELDS, OpenAIJudge
from tc_llava.eval.judge.parsing import MAX_SCORE, QA_SCHEMA, VCG_SCHEMA, parse_judge_reply
from tc_llava.eval.judge.prompts import PromptTemplate, load_prompts

__all__ = [
    "MAX_SCORE", "QA_SCHEMA", "TOKEN_LIMIT_FIELDS", "UNPARSEABLE", "VCG_SCHEMA", "CircuitBreaker", "FailedReply",
    "ItemJudgeError", "Judge", "JudgeError", "JudgeResult", "LocalJudge", "OpenAIJudge", "PromptTemplate",
    "TransientJudgeError", "UnreachableError", "load_prompts", "parse_judge_reply", "read_cache",
]
