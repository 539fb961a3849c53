"""The prompt set of an RL run: questions with verifiable answers, asked as the evaluator asks them.

A prompt set in the multiple-choice benchmarks' layout (MVBench's: a task table, ``json/<task>.json``
records ``{video, question, candidates, answer}``, media under ``video/<prefix>``; the synthetic
temporal set ships one) is read by the evaluator's own loader (:mod:`tc_llava.eval.mcq`), so a
policy is trained on exactly the prompt (system text, option block, ``Best option:(`` priming)
and the answer check it is scored with. Frames are the segment middles of ``num_frames`` segments, or
a Qwen-VL policy's frame budget's, as the evaluator takes them.

Which prompts a step takes is a function of the seed and the step alone (:func:`step_prompts`),
so a resumed run draws the same prompts without carrying a sampler's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tc_llava.data.collate import GRID_KEYS, SFTCollator
from tc_llava.data.inputs import Clip, ClipEncoder, budget_frames, model_inputs
from tc_llava.data.templates import image_token_of
from tc_llava.data.video import read_frames, sample_frames
from tc_llava.eval.mcq import check_layout, load_layout_questions, load_task_table
from tc_llava.rl.rewards import check_solution


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
    """The prompt set's files and settings, before the model loads (the evaluator's own layout check; a null
    ``num_frames``, the export's count, is checked once the policy has loaded)."""
    check_layout(OmegaConf.merge(cfg, {"num_frames": cfg.num_frames or 1}))


def load_prompts(cfg: DictConfig, tokenizer: Any) -> list[Prompt]:
    """Every (limited) question of the layout as a :class:`Prompt` whose solution is ``(X) answer`` (``mcq``)."""
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
