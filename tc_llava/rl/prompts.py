"""The prompt set of an RL run: questions with verifiable answers, asked as the evaluator asks them.

A prompt set in the multiple-choice benchmarks' layout (MVBench's: a task table, ``json/<task>.json``
records ``{video, question, candidates, answer}``, media under ``video/<prefix>``; the synthetic
temporal set ships one) is read by the evaluator's own loader (:mod:`tc_llava.eval.mcq`), so a
policy is trained on exactly the prompt (system text, option block, ``Best option:(`` priming)
and the answer check it is scored with. Frames are the segment middles of ``num_frames`` segments, or
a Qwen-VL policy's frame budget's, as the evaluator takes them.

A prompt set of records (``source: records``, ``configs/prompts/records.yaml``) is a VideoChat2-IT
(``{video, QA: [{i, q, a}], start?, end?}``) or LLaVA (``{id, video, conversations}``) JSON, read by the SFT
loader's own record parser (:func:`tc_llava.data.datasets.parse_record`): the last turn of each record is the
question (earlier turns are its history, rendered as training renders them) and its answer the solution, of the
record's ``answer_type`` (mcq, number, span) or the set's. The answer type's instruction (``prompt.instructions``,
Video-R1's wording) follows the question. Every record is checked before the model loads: a malformed record, an
unreadable solution or a missing media file names the file, the record and the field, or with
``on_error: skip`` is left out and counted.

Which prompts a step takes is a function of the seed and the step alone (:func:`step_prompts`),
so a resumed run draws the same prompts without carrying a sampler's state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tc_llava.data.collate import GRID_KEYS, SFTCollator
from tc_llava.data.datasets import (CORPUS_TYPES, MALFORMED, MISSING, ON_ERROR, Record, RecordError, parse_record,
                                   read_records, system_prompt)
from tc_llava.data.inputs import Clip, ClipEncoder, budget_frames, model_inputs
from tc_llava.data.templates import build_chat_prompt, get_template, image_token_of
from tc_llava.data.video import read_frames, sample_frames
from tc_llava.eval.mcq import check_layout, load_layout_questions, load_task_table
from tc_llava.rl.rewards import ANSWER_TYPES, answer_text, check_solution

logger = logging.getLogger(__name__)

SOURCES = ("layout", "records")


@dataclass(frozen=True)
class Prompt:
    """One question: the rendered generation prompt, its media, and the answer the rewards check."""

    id: str
    media: str
    prompt: str
    bound: tuple[float, float] | None
    solution: str
    answer_type: str
    data_type: str = "video"  # video | gif | frame (a folder of 00001.jpg, ... at decode.frame_fps)


def check_prompts(cfg: DictConfig) -> None:
    """The prompt set's files and settings, before the model loads: a layout by the evaluator's own check (a null
    ``num_frames``, the export's count, is checked once the policy has loaded), records by reading every one."""
    source = cfg.get("source", "layout")
    if source not in SOURCES:
        raise ValueError(f"prompts.source={source!r}: expected one of {SOURCES}")
    if source == "records":
        _read_records(cfg)
    else:
        check_layout(OmegaConf.merge(cfg, {"num_frames": cfg.num_frames or 1}))


@dataclass(frozen=True)
class _Question:
    """A record's question, before it is rendered with the policy's image token."""

    id: str
    record: Record
    answer_type: str
    solution: str


def _read_records(cfg: DictConfig) -> tuple[list[_Question], dict[str, int], int]:
    """The records file's (limited) first ``limit`` usable questions, the skips by reason and the record count."""
    if cfg.type not in CORPUS_TYPES:
        raise ValueError(f"prompts.type={cfg.type!r}: expected one of {CORPUS_TYPES}")
    if cfg.answer_type is not None and cfg.answer_type not in ANSWER_TYPES:
        raise ValueError(f"prompts.answer_type={cfg.answer_type!r}: expected one of {ANSWER_TYPES} or null (each "
                         "record's own answer_type)")
    if cfg.on_error not in ON_ERROR:
        raise ValueError(f"prompts.on_error={cfg.on_error!r}: expected one of {ON_ERROR}")
    if not os.path.isdir(cfg.media_root):
        raise FileNotFoundError(f"prompts.media_root={cfg.media_root} is not a directory")
    raw = read_records(cfg.json, "prompts.json")
    questions, skipped = [], {MALFORMED: 0, MISSING: 0}
    for index, item in enumerate(raw):
        try:
            questions.append(_question(cfg, index, item))
        except (RecordError, FileNotFoundError) as e:
            if cfg.on_error == "raise":
                raise type(e)(f"prompts.json={cfg.json} record {index}: {e}") from None
            skipped[MISSING if isinstance(e, FileNotFoundError) else MALFORMED] += 1
        if cfg.limit is not None and len(questions) == cfg.limit:
            break
    if not questions:
        raise ValueError(f"prompts.json={cfg.json}: no usable record (limit={cfg.limit})")
    return questions, {k: v for k, v in skipped.items() if v}, len(raw)


def _question(cfg: DictConfig, index: int, item: Any) -> _Question:
    """Record ``index`` of the file checked: its media, answer type and a solution its reward can read."""
    record = parse_record(item, cfg.type, cfg.media_root)
    answer_type = item.get("answer_type", cfg.answer_type)
    if answer_type not in ANSWER_TYPES:
        raise RecordError(f"'answer_type' must be one of {ANSWER_TYPES}, got {answer_type!r} (or set "
                          "prompts.answer_type for every record)")
    if not os.path.exists(record.media):
        raise FileNotFoundError(f"media {record.media} not found (prompts.media_root={cfg.media_root})")
    solution = answer_text(record.turns[-1][1])  # Video-R1 writes its solutions as <answer>...</answer>
    try:
        check_solution(solution, answer_type)
    except ValueError as e:
        raise RecordError(f"the last answer: {e}") from None
    return _Question(str(item.get("id", index)), record, answer_type, solution)


def load_records(cfg: DictConfig, image_token: str) -> list[Prompt]:
    """The prompts of a records file (module comment): each question after its history, as SFT renders turns;
    skipped records are reported in one line."""
    questions, skipped, total = _read_records(cfg)
    if skipped:
        logger.warning("prompts.json=%s: skipped %s of %d records (prompts.on_error=skip)", cfg.json, skipped, total)
    template = get_template(cfg.template)
    prompts = []
    for q in questions:
        *history, (question, _, _) = q.record.turns
        system = system_prompt(template, cfg.prompt.system, q.record.turns[0][2])
        user = cfg.prompt.question.format(question=question) + cfg.prompt.instructions[q.answer_type]
        text = build_chat_prompt(template, system, [(h[0], h[1]) for h in history], user, cfg.prompt.answer_prefix,
                                 image_token)
        data_type = "frame" if os.path.isdir(q.record.media) else "video"
        prompts.append(Prompt(q.id, q.record.media, text, q.record.bound, q.solution, q.answer_type, data_type))
    return prompts


def load_prompts(cfg: DictConfig, tokenizer: Any) -> list[Prompt]:
    """Every (limited) question of the set as a :class:`Prompt`: a layout's with ``(X) answer`` solutions
    (``mcq``), a records file's with its answers."""
    if cfg.get("source", "layout") == "records":
        return load_records(cfg, image_token_of(tokenizer))
    questions = load_layout_questions(cfg, load_task_table(cfg), image_token_of(tokenizer))
    prompts = [Prompt(q.item.id, q.item.media, q.item.prompt, q.item.bound, q.gt, "mcq", q.item.data_type)
               for q in questions]
    for p in prompts:
        check_solution(p.solution, p.answer_type)
    if not prompts:
        raise ValueError(f"prompts.root={cfg.root}: no question found (prompts.tasks={cfg.tasks}, limit={cfg.limit})")
    return prompts


def step_prompts(step: int, per_step: int, total: int, seed: int) -> list[int]:
    """Indices of the ``per_step`` prompts of ``step`` (0-based): epoch after epoch through a permutation of the
    ``total`` prompts drawn from ``(seed, epoch)``."""
    picked = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, at = divmod(k, total)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        picked.append(int(order[at]))
    return picked


class PromptInputs:
    """Prompts -> a left-padded batch of model inputs (``input_ids``, ``attention_mask``, ``num_frames`` and
    ``pixel_values``, or a Qwen-VL family's :data:`~tc_llava.data.collate.GRID_KEYS`), the frames decoded as the
    evaluator decodes them: ``num_frames`` segment middles, or a Qwen-VL policy's frame budget within the item's
    bound. Decoding (:meth:`decode`) and encoding (:meth:`encode`) are apart so that T-GRPO's shuffled group
    re-encodes the same frames in another order."""

    def __init__(self, cfg: DictConfig, model: Any, num_frames: int):
        self.cfg, self.model, self.num_frames = cfg, model, num_frames
        self.collator = SFTCollator(model.tokenizer.pad_token_id, padding_side="left")

    def decode(self, prompts: Sequence[Prompt]) -> list[tuple[Any, Clip | None]]:
        """Each prompt's frames ``uint8 [T, H, W, 3]`` and, for a Qwen-VL policy, their :class:`Clip`."""
        cfg, encoder = self.cfg, self.model.frame_processor
        decoded = []
        for p in prompts:
            read = dict(backend=cfg.decode.backend, fps=cfg.decode.frame_fps if p.data_type == "frame" else None,
                        num_threads=cfg.decode.threads, timeout=cfg.decode.timeout)
            if isinstance(encoder, ClipEncoder):
                frames, indices, rate, total = read_frames(p.media, budget_frames(encoder, p.bound), **read)
                decoded.append((frames, Clip(indices, rate, total)))
            else:
                decoded.append((sample_frames(p.media, self.num_frames, "middle", p.bound, **read)[0], None))
        return decoded

    def encode(self, prompts: Sequence[Prompt], decoded: Sequence[tuple[Any, Clip | None]],
               orders: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        """The batch of ``prompts`` on their ``decoded`` frames, each prompt's frames taken in ``orders[i]`` when
        given (T-GRPO). A Qwen-VL clip keeps its indices, so the shuffled frames sit at the ordered frames'
        times and the prompt's ids do not change."""
        model, samples = self.model, []
        for i, (p, (frames, clip)) in enumerate(zip(prompts, decoded)):
            if orders is not None:
                frames = frames[list(orders[i])]
            samples.append(model_inputs(model.tokenizer, model.frame_processor, model.tokens_per_video,
                                        self.cfg.template, frames, p.prompt, clip=clip))
        batch = self.collator(samples)
        return {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "num_frames", *GRID_KEYS)
                if key in batch}

    def __call__(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        return self.encode(prompts, self.decode(prompts))
