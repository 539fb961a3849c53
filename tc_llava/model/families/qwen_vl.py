"""What the Qwen-VL families share: HF's own vision path and M-RoPE positions, with frames as temporal patches.

Unlike the LLaVA families, a Qwen-VL model sees each image and video at its own resolution
(``[t, h, w]`` patch grids, ``image_grid_thw``/``video_grid_thw``), two frames per temporal
patch, and a 2x2 patch merger: one LLM token per merged patch. Its LLM rotates by three
position axes (t, h, w) that ``get_rope_index`` computes from the grids; those reach the
LLM as its own ``position_ids [3, B, L]`` (never through the 1D rotary side channel).

For TC-LLaVA's rules a *frame* is one temporal patch: its tokens are one block of the mask
and share one temporal index ``tau`` (:func:`qwen_frame_ids`). ``docs/families.md`` gives
the definitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedConfig

from tc_llava.model.families.base import Family
from tc_llava.model.families.qwen_vl_inputs import (
    FrameBudget, QwenTokens, QwenVLPreprocessing, select_frames, tiny_preprocessing, video_inputs, vision_kwargs,
)
from tc_llava.model.tiling import item_chunks


def _joined(features: Any) -> torch.Tensor:
    """One deepstack layer's features as one tensor (transformers >= 5.24 splits them per image or video)."""
    return torch.cat(list(features)) if isinstance(features, (list, tuple)) else features


IMAGE, VIDEO = 1, 2  # HF's mm_token_type_ids: 0 text, 1 image, 2 video
VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass(frozen=True)
class QwenVisual:
    """A batch's visual inputs as HF's Qwen-VL processors give them: images' and videos' flattened patches and
    their ``[t, h, w]`` grids, in order of appearance (row after row), and (Qwen2.5-VL) each video's seconds per
    temporal patch."""

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None

    @classmethod
    def of(cls, **inputs: Any) -> "QwenVisual":
        unknown = set(inputs) - set(VISUAL_KEYS)
        if unknown:
            raise ValueError(f"unexpected visual inputs {sorted(unknown)}; a Qwen-VL model takes {VISUAL_KEYS}")
        visual = cls(**inputs)
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if (getattr(visual, pixels) is None) != (getattr(visual, grid) is None):
                raise ValueError(f"{pixels} and {grid} come together (the grid says how the patches are laid out)")
        return visual

    @property
    def empty(self) -> bool:
        return self.pixel_values is None and self.pixel_values_videos is None


def _block_sizes(grid_thw: torch.Tensor | None, merge: int) -> list[int]:
    """LLM tokens of each temporal patch (a mask block) of every grid, in order."""
    if grid_thw is None:
        return []
    return [int(h * w) // merge**2 for t, h, w in grid_thw.tolist() for _ in range(int(t))]


def qwen_frame_ids(input_ids: torch.Tensor, config: PreTrainedConfig, visual: QwenVisual) -> torch.Tensor:
    """``[B, L]`` frame ids: ``f`` for the tokens of the ``f``-th temporal patch (image or video) of the row, -1 for
    text (timestamps, ``<|vision_start|>``/``<|vision_end|>`` included).

    Image placeholders take the image grids in order, video placeholders the video grids, as HF's
    ``get_rope_index`` consumes them; a placeholder count that differs from the grids is refused.
    """
    merge = config.vision_config.spatial_merge_size
    flat = input_ids.flatten().cpu()
    block = torch.full_like(flat, -1)
    offset = 0
    for token_id, grid, name in ((config.image_token_id, visual.image_grid_thw, "image"),
                                 (config.video_token_id, visual.video_grid_thw, "video")):
        sizes = _block_sizes(grid, merge)
        is_token = flat == token_id
        found = int(is_token.sum())
        if found != sum(sizes):
            raise ValueError(f"input_ids hold {found} {name} placeholder tokens (id {token_id}) but the "
                             f"{name}_grid_thw {[] if grid is None else grid.tolist()} gives {sum(sizes)}: expand each "
                             f"{name} placeholder to grid.prod() // {merge ** 2} tokens, as the family's processor does")
        if sizes:
            bounds = torch.tensor(sizes).cumsum(0)
            block[is_token] = offset + torch.searchsorted(bounds, torch.arange(found), right=True)
        offset += len(sizes)
    block = block.view(input_ids.shape)
    visual_tok = block >= 0
    prev = torch.nn.functional.pad(block[:, :-1], (1, 0), value=-1)
    starts = visual_tok & (block != prev)
    frames = starts.long().cumsum(-1) - 1
    return torch.where(visual_tok, frames, torch.full_like(frames, -1)).to(input_ids.device)


class QwenVL(Family):
    """The Qwen-VL path: HF's ``get_image_features``/``get_video_features`` and ``get_rope_index`` on the model's own
    modules; prompts are written as the checkpoint's own chat template writes them (``template``, checked against
    the tokenizer's ``chat_template`` on load)."""

    placeholder = "video_token_id"
    multimodal_rope: ClassVar[bool] = True
    tiny_tokens: ClassVar[dict[str, str]] = {"image": "<|image_pad|>", "video": "<|video_pad|>",
                                              "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}

    def frame_ids(self, config: PreTrainedConfig, input_ids: torch.Tensor, visual: QwenVisual) -> torch.Tensor:
        """Per-token frame ids: each temporal patch a frame (:func:`qwen_frame_ids`)."""
        return qwen_frame_ids(input_ids, config, visual)

    def token_types(self, config: PreTrainedConfig, input_ids: torch.Tensor) -> torch.Tensor:
        """HF's ``mm_token_type_ids``: 1 on image placeholders, 2 on video placeholders, 0 elsewhere."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == config.image_token_id] = IMAGE
        types[input_ids == config.video_token_id] = VIDEO
        return types

    def rope_index(self, hf_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   visual: QwenVisual) -> torch.Tensor:
        """The family's own ``[3, B, L]`` positions (0 on padding), from HF's ``get_rope_index``."""
        if visual.empty:  # HF's text-only positions: the running index of the real tokens on every axis
            index = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * attention_mask.long()
            return index[None].expand(3, -1, -1)
        positions, _ = hf_model.model.get_rope_index(
            input_ids, mm_token_type_ids=self.token_types(hf_model.config, input_ids),
            image_grid_thw=visual.image_grid_thw, video_grid_thw=visual.video_grid_thw,
            second_per_grid_ts=visual.second_per_grid_ts, attention_mask=attention_mask)
        return positions * attention_mask.bool()

    def features(self, hf_model: nn.Module, pixels: torch.Tensor, grid: torch.Tensor, video: bool,
                 chunk_frames: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """HF's vision output of images or videos: their LLM tokens (one tensor per image or video) and each deepstack
        layer's features of them all (Qwen3-VL; none otherwise). Whole images or videos go through the tower at
        once, up to ``chunk_frames`` temporal patches (an item larger than that alone; None: all)."""
        get = hf_model.model.get_video_features if video else hf_model.model.get_image_features
        counts = item_chunks(grid[:, 0].tolist(), chunk_frames)  # HF's own features code reads the grid on the host too
        rows = grid.prod(-1).tolist()  # patches of each item: its rows of ``pixels``
        pooled, deep, item, row = [], [], 0, 0
        for count in counts:
            size = sum(rows[item:item + count])
            out = get(pixels[row:row + size], grid[item:item + count], return_dict=True)
            pooled.extend(out.pooler_output)
            if getattr(out, "deepstack_features", None) is not None:
                deep.append([_joined(f) for f in out.deepstack_features])
            item, row = item + count, row + size
        return pooled, [torch.cat(layer) for layer in zip(*deep)]

    def embed_visual(self, hf_model: nn.Module, input_ids: torch.Tensor, embeds: torch.Tensor,
                     visual: QwenVisual, chunk_frames: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """``embeds`` with the visual tokens scattered into their placeholders, and what else the LLM call takes;
        the tower runs ``chunk_frames`` temporal patches at a time (:meth:`features`)."""
        config = hf_model.config
        for pixels, grid, token_id, video in ((visual.pixel_values, visual.image_grid_thw, config.image_token_id, False),
                                              (visual.pixel_values_videos, visual.video_grid_thw,
                                               config.video_token_id, True)):
            if pixels is None:
                continue
            tokens = torch.cat(self.features(hf_model, pixels, grid, video, chunk_frames)[0]).to(embeds.dtype)
            embeds = embeds.masked_scatter((input_ids == token_id)[..., None], tokens)
        return embeds, {}

    # ----------------------------------------------------------------- files
    def processors(self, config: PreTrainedConfig) -> tuple[Any, Any]:
        """HF's own image and video processors (torchvision) at the tower's patch sizes, with the tiny models' small
        pixel and frame budgets (:func:`~tc_llava.model.families.qwen_vl_inputs.tiny_preprocessing`)."""
        prep = tiny_preprocessing(self.model_type, config.vision_config)
        return prep.image_processor, prep.video_processor

    def tiny_config(self, vision: dict[str, Any], text: PreTrainedConfig, tokens: dict[str, int],
                    grid_pinpoints: list[list[int]]) -> PreTrainedConfig:
        """The tiny model: the tower projecting to the LLM's width, the family's own token ids."""
        return self.config_class(
            vision_config={**vision, "out_hidden_size": text.hidden_size},
            text_config=self.tiny_text_config(text), image_token_id=tokens["image"], video_token_id=tokens["video"],
            vision_start_token_id=tokens["vision_start"], vision_end_token_id=tokens["vision_end"],
            tie_word_embeddings=False)

    def tiny_text_config(self, text: PreTrainedConfig) -> dict[str, Any]:
        """The tiny LLM's fields in this family's text config: the Qwen2 LLM's sizes, M-RoPE over its head dims."""
        head_dim = text.hidden_size // text.num_attention_heads
        pairs = head_dim // 2
        section = [pairs // 4, (pairs - pairs // 4) // 2, pairs - pairs // 4 - (pairs - pairs // 4) // 2]
        return dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                    intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                    num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
                    max_position_embeddings=text.max_position_embeddings, pad_token_id=text.pad_token_id,
                    bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})


@dataclass(frozen=True)
class PlaceholderIds:
    """The ids that replace a prompt's ``<|video_pad|>``, and (``wrapper``) the ids of the ``<|vision_start|>``/
    ``<|vision_end|>`` around it that they replace too (Qwen3-VL from transformers 5.25 on)."""

    ids: list[int]
    wrapper: tuple[int, int] | None = None


class QwenFrames:
    """A Qwen-VL model's frame processor: which frames of a video to decode under the frame budget, and decoded
    frames -> the model's video inputs and the ids that replace the prompt's ``<|video_pad|>``, all by HF's own
    processors (:mod:`~tc_llava.model.families.qwen_vl_inputs`).

    A still image (or a video shorter than a temporal patch) is a video of its frames, padded to one temporal
    patch by repeating the last frame, as HF's video processor pads any video."""

    def __init__(self, preprocessing: QwenVLPreprocessing, tokenizer: Any) -> None:
        self.preprocessing, self.tokenizer = preprocessing, tokenizer
        self.tokens = QwenTokens.from_tokenizer(tokenizer)

    @property
    def budget(self) -> FrameBudget:
        return self.preprocessing.budget

    def frame_indices(self, total_frames: int, video_fps: float) -> list[int]:
        """Indices of the frames to decode (HF's ``sample_frames`` under the budget)."""
        if total_frames < self.preprocessing.video_processor.temporal_patch_size:
            return list(range(total_frames))
        return select_frames(self.preprocessing, total_frames, video_fps)

    def encode(self, frames: Any, frame_indices: Sequence[int], video_fps: float,
               total_frames: int) -> tuple[dict[str, torch.Tensor], PlaceholderIds]:
        """The video's model inputs (``pixel_values_videos``, ``video_grid_thw``, Qwen2.5-VL's
        ``second_per_grid_ts``) and the ids of what HF's processor writes in place of its ``<|video_pad|>``.

        The replacement (pads; Qwen3-VL's timestamps and vision spans) sits between special tokens in every
        prompt, so tokenized alone it gives the ids it gets in place."""
        video = video_inputs(self.preprocessing, frames, frame_indices, video_fps, total_frames)
        ids = self.tokenizer(video.placeholder(self.tokens), add_special_tokens=False)["input_ids"]
        wrapper = None
        if video.drops_wrapper:
            wrapper = tuple(self.tokenizer.convert_tokens_to_ids([self.tokens.vision_start, self.tokens.vision_end]))
        return vision_kwargs([video]), PlaceholderIds(list(ids), wrapper)
