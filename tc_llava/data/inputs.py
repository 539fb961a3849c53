"""Frames and a prompt -> model inputs: the one step training, evaluation, chat and the lmms-eval plugin share.

What the model provides (its tokenizer, its frame processor, its ``tokens_per_video``) comes in as
arguments, so this room stays a leaf the model does not import. The prompt is either a rendered
generation prompt (:func:`~tc_llava.data.templates.build_prompt` /
:func:`~tc_llava.data.templates.build_chat_prompt` text, never truncated) or a training conversation
of (user, answer) turns that the template renders with ``system`` and labels. Either way it holds
one video placeholder, expanded to the model's ``tokens_per_video(T)`` placeholder ids.

Callers that must know a prompt's length before its frames are decoded (the runner refuses a
too-long prompt without decoding its video) use the two halves, :func:`encode_prompt` and
:func:`preprocess_frames`, which :func:`model_inputs` is made of.

A Qwen-VL model's frame processor is a :class:`ClipEncoder`: its own frame budget chooses which
frames to decode (:meth:`ClipEncoder.frame_indices`), and the frames' times shape its inputs and
the placeholder's replacement (Qwen3-VL writes timestamps), so it takes the :class:`Clip`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from tc_llava.data.templates import (IGNORE_INDEX, Encoded, Expansion, Template, get_template,
                                     tokenize_conversation, tokenize_prompt)

# A rendered generation prompt, or a training conversation's (user, answer) turns.
Prompt = Union[str, Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class Clip:
    """Where decoded frames came from: their indices in a video of ``total_frames`` at ``fps``."""

    indices: Sequence[int]
    fps: float
    total_frames: int


@runtime_checkable
class ClipEncoder(Protocol):
    """A frame processor that chooses its frames and encodes them with their times (Qwen-VL's ``QwenFrames``)."""

    def frame_indices(self, total_frames: int, video_fps: float) -> list[int]: ...

    def encode(self, frames: Any, frame_indices: Sequence[int], video_fps: float,
               total_frames: int) -> tuple[dict[str, torch.Tensor], Expansion]: ...


def budget_frames(encoder: ClipEncoder, bound: tuple[float, float] | None) -> Callable[[int, float], list[int]]:
    """``choose`` for :func:`~tc_llava.data.video.read_frames`: the frames ``encoder``'s budget takes within ``bound``
    (seconds; None: the whole video), as the evaluator asks a Qwen-VL model about a benchmark item."""

    def choose(total: int, rate: float) -> list[int]:
        first, last = 0, total - 1
        if bound is not None:
            first = min(max(0, round(bound[0] * rate)), last)
            last = max(first, min(last, round(bound[1] * rate)))
        return [first + i for i in encoder.frame_indices(last - first + 1, rate)]

    return choose


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    template: str | Template,
    prompt: Prompt,
    num_visual_tokens: int | Sequence[int] | Expansion,
    system: str | None = None,
    max_txt_len: int | None = None,
) -> Encoded:
    """``input_ids``/``labels`` [L] of ``prompt``, its placeholder expanded to ``num_visual_tokens`` ids (or to
    the given ids).

    A conversation is rendered with ``system`` (None: the template's) and capped at ``max_txt_len`` text
    tokens; a rendered prompt already holds its system text and is never truncated, so those must be None.
    """
    if isinstance(prompt, str):
        if system is not None or max_txt_len is not None:
            raise ValueError("a rendered prompt holds its system text and is never truncated: pass system and "
                             "max_txt_len only with a conversation of (user, answer) turns")
        ids = tokenize_prompt(tokenizer, template, prompt, num_visual_tokens)
        return Encoded(ids, torch.full_like(ids, IGNORE_INDEX), False)
    return tokenize_conversation(tokenizer, template, prompt, num_visual_tokens, system, max_txt_len)


def preprocess_frames(frame_processor: Any, frames: Sequence[Any]) -> torch.Tensor:
    """``pixel_values`` [T, C, H, W] of decoded frames, by the model's frame processor (its ``frame_processor``)."""
    return frame_processor(images=list(frames), return_tensors="pt")["pixel_values"]


def model_inputs(
    tokenizer: PreTrainedTokenizerBase,
    frame_processor: Any,
    tokens_per_video: int | Callable[[int], int],
    template: str | Template,
    frames: Sequence[Any],
    prompt: Prompt,
    system: str | None = None,
    max_txt_len: int | None = None,
    clip: Clip | None = None,
) -> dict[str, Any]:
    """One sample's inputs: ``input_ids``, ``attention_mask`` and ``labels`` [L], ``pixel_values`` [T, C, H, W],
    ``num_frames`` T, ``num_visual_tokens`` and ``truncated`` (text tokens dropped to fit ``max_txt_len``).

    ``tokens_per_video`` is the model's (a frame count -> its placeholder tokens), or the one count of a
    caller whose videos all have the same frame count. A :class:`ClipEncoder` frame processor (Qwen-VL) needs
    the frames' ``clip`` and gives its own inputs (``pixel_values_videos``, ``video_grid_thw``, ...) and
    placeholder ids instead; ``tokens_per_video`` is then unused. Collators batch these samples.
    """
    count = len(frames)
    if isinstance(frame_processor, ClipEncoder):
        if clip is None:
            raise ValueError("a Qwen-VL frame processor needs the frames' clip (indices, fps, total frames)")
        pixels, visual = frame_processor.encode(frames, clip.indices, clip.fps, clip.total_frames)
    else:
        visual = tokens_per_video(count) if callable(tokens_per_video) else tokens_per_video
        pixels = {"pixel_values": preprocess_frames(frame_processor, frames)}
    encoded = encode_prompt(tokenizer, get_template(template), prompt, visual, system, max_txt_len)
    return {
        "input_ids": encoded.input_ids,
        "attention_mask": torch.ones_like(encoded.input_ids),
        "labels": encoded.labels,
        **pixels,
        "num_frames": count,
        "num_visual_tokens": visual if isinstance(visual, int) else len(visual.ids),
        "truncated": encoded.truncated,
    }
