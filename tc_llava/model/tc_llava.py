"""TC-LLaVA: an HF LLaVA whose LLM attends with a rope rule (dual RoPE, ...) and a mask rule.

The HF model (a family of :mod:`tc_llava.model.families`: LLaVA, LLaVA-NeXT, LLaVA-NeXT-Video,
LLaVA-OneVision) is used as it is; this module only composes its parts for video:

1. frames -> the family's own video path, frame by frame (vision tower, its pooling, the
   MLP projector) -> optional PLLaVA pooling per sample -> (OneVision) the newline ->
   visual tokens scattered into the prompt's placeholder run;
2. the frame-id vector of that layout and each frame's token grid -> rotary positions
   (rope rule) and what the LLM attends with (mask rule and backend, decided by
   :func:`tc_llava.model.attention.llm_attention`);
3. the LLM runs with those positions fed to its rotary module only.

Samples may hold different frame counts (an image is one frame): ``pixel_values`` is then
every sample's frames in one ``[N, C, H, W]`` tensor with ``num_frames`` per sample; equal
counts may come as ``[B, T, C, H, W]`` as well. Positions, mask and pooling follow each
sample's own count.

Training may pack several samples into one row (``sample_ids``, see
:class:`tc_llava.model.layout.PackedSamples`): every sample gets the positions and mask it
would get alone, and no token attends across samples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from torch.autograd.graph import save_on_cpu
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from tc_llava.model.attention import check_backend, check_sequence_parallel, llm_attention, resolve_attention
from tc_llava.model.families import family_of
from tc_llava.model.families.qwen_vl import QwenFrames, QwenVisual
from tc_llava.model.families.qwen_vl_inputs import (
    FrameBudget, QwenVLPreprocessing, load_preprocessing, save_preprocessing,
)
from tc_llava.model.generation import GenerationOutput, generate
from tc_llava.model.hf_compat import AutoImageProcessor, cache_kwargs, declare_special_token, output_cache
from tc_llava.model.layout import (
    BatchLayout, PackedSamples, check_visual_token_count, frame_ids_from_tokens, to_host,
)
from tc_llava.model.masks import CausalMask, MaskRule
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.processors import VIDEO_PREPROCESSOR_FILE, VideoPreprocessor
from tc_llava.model.rope import RopeRule, RotaryPositions, VanillaRoPE, real_token_index, temporal_index
from tc_llava.model.sequence_parallel import SequenceParallel, reduced_loss
from tc_llava.model.settings import (
    BUDGET_KEY, FRAMES_KEY, check_adapter_config, checkpoint_dtype, read_frame_sampling, read_settings, rule_settings,
)
from tc_llava.model.tiling import Tiling, tile_mlps, tiled_loss

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DEFAULT_PLACEHOLDER = "<image>"
LOADING_KEYS = ("missing_keys", "unexpected_keys", "mismatched_keys")  # transformers' loading info


class WeightsError(ValueError):
    """A checkpoint whose weights do not fit the model it describes."""


def check_loaded_weights(info: dict[str, Any], path: Path, allow: bool) -> dict[str, list[str]]:
    """transformers' loading info as ``{missing_keys: [...], ...}``; refused unless ``allow`` when any is non-empty.

    transformers has already left out what it expects to be absent (tied weights such as a tied
    ``lm_head``, a class's ``_keys_to_ignore_on_load_*``), so every name here is a weight that
    would be randomly initialised, ignored, or (mismatched) loaded at another shape.
    """
    found = {key: sorted(str(k) for k in info.get(key) or ()) for key in LOADING_KEYS}
    if any(found.values()) and not allow:
        parts = [f"{len(names)} {key.removesuffix('_keys')} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                 for key, names in found.items() if names]
        raise WeightsError(f"{path}: weights do not match the model: {'; '.join(parts)}; a missing weight would be "
                              "randomly initialised. Load it anyway with model.allow_missing_weights=true")
    if any(found.values()):
        log.warning("%s: loaded with allow_missing_weights: %s", path, {k: v for k, v in found.items() if v})
    return found


@dataclass
class TCLlavaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    rope_positions: torch.Tensor | None = None
    frame_ids: torch.Tensor | None = None
    next_rope_positions: torch.Tensor | None = None  # [..., B, 1]: where the next (generated) token sits


def frames_per_sample(pixel_values: torch.Tensor, num_frames: torch.Tensor | Sequence[int] | None,
                      batch: int) -> list[int]:
    """Each sample's frame count of ``pixel_values`` (``num_frames`` on the host)."""
    if isinstance(num_frames, torch.Tensor):
        num_frames = num_frames.tolist()
    if pixel_values.ndim == 5:
        counts = [pixel_values.shape[1]] * pixel_values.shape[0]
        given = None if num_frames is None else [int(n) for n in num_frames]
        if given is not None and given != counts:
            raise ValueError(f"num_frames {given} disagrees with pixel_values {tuple(pixel_values.shape)}: "
                             f"[B, T, C, H, W] gives every sample T={pixel_values.shape[1]} frames")
    elif pixel_values.ndim == 4 and num_frames is not None:
        counts = [int(n) for n in num_frames]
        if sum(counts) != pixel_values.shape[0] or min(counts, default=0) < 1:
            raise ValueError(f"num_frames {counts} must be positive counts summing to the {pixel_values.shape[0]} frames "
                             f"of pixel_values {tuple(pixel_values.shape)}")
    else:
        raise ValueError(
            "pixel_values must be [B, T, C, H, W] (a batch of videos), or every sample's frames [N, C, H, W] with "
            f"num_frames (frames per sample), got shape {tuple(pixel_values.shape)}"
            + ("" if num_frames is None else f" and num_frames {list(map(int, num_frames))}")
        )
    if len(counts) != batch:
        raise ValueError(f"pixel_values hold {len(counts)} samples' frames (num_frames {counts}); input_ids has {batch}")
    return counts


class TCLlava(nn.Module):
    """A llava-hf model plus the rope rule, mask rule and pooling that make it TC-LLaVA.

    ``tokenizer``, ``image_processor`` and ``video_preprocessor`` (the video families'
    preprocessing, :mod:`tc_llava.model.processors`) travel with the model and are saved
    with it; :attr:`frame_processor` is what turns a sample's frames into ``pixel_values``.
    ``frame_sampling`` records how the model was trained to see videos (an export's
    ``tc_llava_frames``: ``num_frames``, ``image_frames``, ``sampling``). A Qwen-VL family's
    ``preprocessing`` holds HF's processors under its frame budget instead (``tc_llava_frame_budget``).
    ``tiling`` (:mod:`tc_llava.model.tiling`) runs the loss, the vision tower and the MLPs in tiles at long lengths.
    """

    def __init__(
        self,
        hf_model: nn.Module,
        rope: RopeRule | None = None,
        mask: MaskRule | None = None,
        pooling: VideoPooling | None = None,
        tokenizer: Any = None,
        image_processor: Any = None,
        template: str | None = None,
        video_preprocessor: VideoPreprocessor | None = None,
        frame_sampling: dict[str, Any] | None = None,
        preprocessing: QwenVLPreprocessing | None = None,
        tiling: Tiling | None = None,
    ) -> None:
        super().__init__()
        self.family = family_of(hf_model.config.model_type)
        self.hf = hf_model
        self.rope = rope or VanillaRoPE()
        self.mask = mask or CausalMask()
        self.pooling = pooling or VideoPooling()
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.video_preprocessor = video_preprocessor
        self.template = template  # the chat template's name (data.templates): how prompts are written for it
        self.frame_sampling = frame_sampling
        self.preprocessing = preprocessing  # a Qwen-VL family's processors under its frame budget
        self.tiling = tiling or Tiling()  # long sequences: loss, vision tower and MLPs in tiles (model.tiling)
        # trainer.offload_checkpoints: what the LLM saves for the backward (with activation checkpointing: each
        # layer's input hidden states) waits in host memory
        self.offload_checkpoints = False
        # trainer.sp_size: the sequence-parallel group this process holds a share of the sequence in (None: all of it)
        self.sequence_parallel: SequenceParallel | None = None
        if self.tiling.mlp_tokens is not None:
            tile_mlps(self.language_model.layers, self.tiling.mlp_tokens)
        # How from_pretrained loaded the weights: allow_missing_weights and what was missing or unexpected
        self.weights_report: dict[str, Any] = {"allow_missing_weights": False}
        lm = self.language_model
        check_backend(lm.config._attn_implementation, self.mask)
        if not self.mask.is_causal and "sliding_attention" in (getattr(lm.config, "layer_types", None) or []):
            raise ValueError(f"mask={self.mask.name} is not supported with sliding-window attention layers")
        self.grid, self.keeps_cls = None, False
        if self.family.multimodal_rope:
            self._check_model_positions()
            return
        if not isinstance(lm.rotary_emb, RotaryPositions):
            lm.rotary_emb = RotaryPositions(lm.rotary_emb)
        self.grid = self.family.frame_grid(self.config)
        self.keeps_cls = self.family.keeps_cls(self.hf)
        if self.keeps_cls and self.pooling.pooling_shape is not None:
            raise ValueError("projector=pllava_pool needs vision_feature_select_strategy='default' (CLS dropped)")
        self._check_processors()

    def _check_model_positions(self) -> None:
        """A family with its own multi-axis positions (Qwen-VL) takes the rules defined on them, and no PLLaVA pooling
        (its frames are grids of their own size)."""
        if not hasattr(self.rope, "on_model_positions"):
            raise ValueError(f"rope={self.rope.name} is not defined on {self.family.model_type}, whose positions are "
                             "its own M-RoPE: use rope=vanilla (the family's own positions) or rope=tad "
                             "(docs/families.md)")
        if self.pooling.pooling_shape is not None:
            raise ValueError(f"projector=pllava_pool needs a fixed frame grid; {self.family.model_type} sees each "
                             "video at its own resolution: use projector=mlp")

    def _check_processors(self) -> None:
        """Refuse a tokenizer or video processor that does not belong to this family (they would train garbage)."""
        kind, token_id = self.family.placeholder_kind, self.placeholder_token_id
        tok = self.tokenizer
        if tok is not None:
            if kind == "video" and getattr(tok, "video_token", None) is None:
                added = tok.added_tokens_decoder.get(token_id)  # the checkpoint's own <video>, undeclared:
                if added is not None and added.special:  # declared, the data pipeline finds it on the tokenizer
                    declare_special_token(tok, "video_token", added.content)
            declared = getattr(tok, "video_token", None) or getattr(tok, "image_token", None) or DEFAULT_PLACEHOLDER
            if tok.convert_tokens_to_ids(declared) != token_id:
                raise ValueError(
                    f"family/processor mismatch: the tokenizer's video placeholder is {declared!r} (id "
                    f"{tok.convert_tokens_to_ids(declared)}), but {self.family.model_type} prompts hold its "
                    f"{self.family.placeholder} {token_id} ({tok.convert_ids_to_tokens(token_id)!r}); load the "
                    "checkpoint's own tokenizer")
        video = self.video_preprocessor
        if video is not None:
            expected = self.family.video_processor_type
            if expected is None or video.processor_type not in (None, expected):
                raise ValueError(f"family/processor mismatch: video_processor_type {video.processor_type!r} does not "
                                 f"preprocess {self.family.model_type} frames (expected {expected})")
            size = self.config.vision_config.image_size
            if video.output_size() != (size, size):
                raise ValueError(f"family/processor mismatch: the video processor gives {video.output_size()} frames, "
                                 f"the {self.family.model_type} vision tower takes {(size, size)}")

    def shard_sequence(self, sp: SequenceParallel | None) -> None:
        """Train with each process of ``sp``'s group holding a share of every sequence
        (:mod:`tc_llava.model.sequence_parallel`); None: the whole sequence. Refused here, before any batch, for a
        degree that does not divide the heads or a backend that would not keep the mask exact."""
        lm = self.language_model
        if sp is not None:
            check_sequence_parallel(lm.config._attn_implementation, lm.config.num_attention_heads, sp.size)
        self.sequence_parallel = sp

    # ----------------------------------------------------------------- structure
    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def language_model(self) -> nn.Module:
        return self.hf.model.language_model

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def placeholder_token_id(self) -> int:
        """The token a prompt's one video placeholder is expanded to: ``<image>``, or the video families' ``<video>``."""
        return getattr(self.config, self.family.placeholder)

    @property
    def frame_processor(self) -> Any:
        """What turns frames into ``pixel_values``: the video processor's steps (video families), else the image processor;
        a Qwen-VL family's :class:`~tc_llava.model.families.qwen_vl.QwenFrames` (frames chosen by its budget)."""
        if self.family.multimodal_rope:
            if self.preprocessing is None:
                raise ValueError(f"{self.family.model_type} preprocesses frames with its image and video processors "
                                 f"({VIDEO_PREPROCESSOR_FILE}); this model was built without them")
            return QwenFrames(self.preprocessing, self.tokenizer)
        if self.family.video_processor_type is None:
            return self.image_processor
        if self.video_preprocessor is None:
            raise ValueError(f"{self.family.model_type} preprocesses frames with its video processor "
                             f"({VIDEO_PREPROCESSOR_FILE}); this model was built without one")
        return self.video_preprocessor

    def token_grid(self, num_frames: int | None) -> tuple[int, int]:
        """(H, W) of each frame's visual tokens: the pooled grid with pooling, else the family's own grid."""
        if num_frames is None:
            return self.grid
        _, h, w = self.pooling.output_grid(num_frames, self.grid)
        return h, w

    def tokens_per_frame(self, num_frames: int) -> int:
        self._fixed_grid()
        _, h, w = self.pooling.output_grid(num_frames, self.grid)
        return h * w + int(self.keeps_cls)

    def tokens_per_video(self, num_frames: int) -> int:
        """Placeholder tokens one video of ``num_frames`` frames occupies in the prompt (OneVision: + its newline)."""
        self._fixed_grid()
        t, h, w = self.pooling.output_grid(num_frames, self.grid)
        return self.family.tokens_per_video(t, (h, w), self.keeps_cls)

    def _fixed_grid(self) -> None:
        if self.grid is None:
            raise ValueError(f"{self.family.model_type} sees every image and video at its own resolution: its "
                             "placeholder count follows the grid its processor gives, not a frame count")

    # ----------------------------------------------------------------- video
    def visual_tokens(self, frames: torch.Tensor, num_frames: Sequence[int]) -> torch.Tensor:
        """Every sample's frames ``[N, C, H, W]`` -> their visual tokens, sample after sample, ``[sum of
        tokens_per_video(T_b), D]``: what fills the placeholder runs of the batch in order."""
        size = self.config.vision_config.image_size
        if frames.shape[-2:] != (size, size):
            raise ValueError(f"pixel_values frames are {tuple(frames.shape[-2:])}, the vision tower takes {size}x{size}")
        chunks = frames.split(self.tiling.vision_frames or len(frames))  # frames are independent in the tower
        features = torch.cat([self.family.frame_features(self.hf, chunk) for chunk in chunks])
        tokens = [self.pooling.pool(sample, self.grid) for sample in features.split(list(num_frames))]
        after = self.family.after_video(self.hf)
        if after is not None:
            tokens = [torch.cat([t, after.to(features.dtype)]) for t in tokens]
        return torch.cat(tokens)

    def encode_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, T, C, H, W]`` frames -> ``[B, tokens_per_video(T), D]`` visual tokens."""
        batch, frames = pixel_values.shape[:2]
        return self.visual_tokens(pixel_values.flatten(0, 1), [frames] * batch).unflatten(0, (batch, -1))

    def frame_ids(self, input_ids: torch.Tensor, num_frames: int | Sequence[int] | None) -> torch.Tensor:
        """Per-token frame ids (-1 text) of prompts holding one expanded video each, of ``num_frames`` frames
        (one count for all, or one per sample). OneVision's newline, the run's last token, is text."""
        token_id, kind = self.placeholder_token_id, self.family.placeholder_kind
        if num_frames is None:
            if bool((input_ids == token_id).any()):
                raise ValueError(f"input_ids hold {kind} tokens but no pixel_values were given")
            return torch.full_like(input_ids, -1)
        counts = [num_frames] * input_ids.shape[0] if isinstance(num_frames, int) else list(num_frames)
        per_video = [self.tokens_per_video(n) for n in counts]
        check_visual_token_count(input_ids, token_id, per_video, counts, kind)
        in_frames = torch.tensor([n - self.family.tokens_after_video for n in per_video], device=input_ids.device)
        return frame_ids_from_tokens(input_ids, token_id, self.tokens_per_frame(counts[0]), in_frames)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        rope_positions: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        num_frames: torch.Tensor | Sequence[int] | None = None,
        sample_ids: torch.Tensor | None = None,
        **visual: torch.Tensor,
    ) -> TCLlavaOutput:
        """Prefill/training forward, or (with a filled cache and ``rope_positions``) a decode step.

        ``pixel_values`` is ``[B, T, C, H, W]``, or ``[N, C, H, W]`` with ``num_frames`` per
        sample (see the module docstring). With ``labels`` the loss is computed from the
        labelled positions only (their logits are never materialised for the whole sequence)
        and ``logits`` is None; ``num_items_in_batch`` normalises the summed loss across
        accumulated micro-batches. ``sample_ids [B, L]`` packs several samples per row (-1
        padding, ``k`` the row's k-th sample; frames and ``num_frames`` sample after sample,
        row after row); ``attention_mask`` is then ``sample_ids >= 0``.

        A Qwen-VL family takes HF's own visual inputs instead: ``pixel_values`` and ``image_grid_thw`` for
        images, ``pixel_values_videos``, ``video_grid_thw`` and (Qwen2.5-VL) ``second_per_grid_ts`` for
        videos, as its processor gives them (:class:`~tc_llava.model.families.qwen_vl.QwenVisual`).
        """
        lm = self.language_model
        if sample_ids is not None and (use_cache or cache is not None):
            raise ValueError("packed rows (sample_ids) are for training forwards; generate from left-padded "
                             "batches instead")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids) if sample_ids is None else (sample_ids >= 0).long()
        embeds = lm.get_input_embeddings()(input_ids)
        multimodal_rope = self.family.multimodal_rope
        if visual and not multimodal_rope:
            raise ValueError(f"{self.family.model_type} takes pixel_values and num_frames; got {sorted(visual)}")
        qwen_visual = QwenVisual.of(pixel_values=pixel_values, **visual) if multimodal_rope else None
        counts = None
        if cache is not None and cache.get_seq_length() > 0:  # a decode step: its new tokens are text
            if rope_positions is None:
                raise ValueError("a decode step (a filled cache) needs rope_positions")
            layout = BatchLayout.build(self.mask, attention_mask, None, rope_positions, position_ids)
        else:
            # Positions and mask before the vision tower: the layout's host sync then waits for
            # little, and the tower's kernels keep the GPU busy while the host goes on.
            layout, counts = self.batch_layout(input_ids, attention_mask, sample_ids, labels, pixel_values,
                                               num_frames, qwen_visual)
        sp = self.sequence_parallel
        if sp is not None and labels is None:
            raise ValueError("sequence parallelism (trainer.sp_size > 1) runs training forwards, with labels; "
                             "evaluate and generate with the model alone")
        attention = llm_attention(lm.config, layout, embeds, cache, sp)
        offload = save_on_cpu(pin_memory=embeds.is_cuda) if self.offload_checkpoints and torch.is_grad_enabled() \
            else nullcontext()
        extra = {}
        if multimodal_rope:
            if not qwen_visual.empty and layout.frame_ids is not None:
                embeds, extra = self.family.embed_visual(self.hf, input_ids, embeds, qwen_visual,
                                                         self.tiling.vision_frames)
        elif counts is not None:
            frames = pixel_values.flatten(0, 1) if pixel_values.ndim == 5 else pixel_values
            visual_tokens = self.visual_tokens(frames, counts).to(embeds.dtype)
            embeds = embeds.masked_scatter((input_ids == self.placeholder_token_id)[..., None], visual_tokens)
        share = layout
        if sp is not None:  # the whole rows' embeddings and layout, cut to this rank's share of the sequence
            if extra:
                raise ValueError(f"sequence parallelism does not shard {self.family.model_type}'s "
                                 f"{sorted(extra)} yet; train it with trainer.sp_size=1")
            share = layout.shard(sp.rank, sp.size)
            embeds = embeds[:, share.start:share.start + share.length]
        lm_kwargs = {"inputs_embeds": embeds, "use_cache": use_cache, **cache_kwargs(cache), **attention.kwargs(),
                     **extra}
        if multimodal_rope:  # the family's own rotary module takes the [3, B, L] positions as position_ids
            with offload:
                out = lm(**{**lm_kwargs, "position_ids": share.rope_positions})
        else:
            positions = share.rope_positions
            pair_axes = self.rope.pair_axes(lm.rotary_emb.num_pairs) if positions.ndim == 3 else None
            with lm.rotary_emb.use(positions, pair_axes), offload:
                out = lm(**lm_kwargs)
        hidden = out.last_hidden_state
        loss = logits = None
        if labels is not None:
            loss = self._loss(hidden, share, num_items_in_batch)
        else:
            logits = self.hf.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return TCLlavaOutput(
            loss=loss, logits=logits, cache=output_cache(out), rope_positions=layout.rope_positions,
            frame_ids=layout.frame_ids, next_rope_positions=layout.next_positions,
        )

    def batch_layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sample_ids: torch.Tensor | None,
                     labels: torch.Tensor | None, pixel_values: torch.Tensor | None,
                     num_frames: torch.Tensor | Sequence[int] | None, visual: QwenVisual | None = None
                     ) -> tuple[BatchLayout, list[int] | None]:
        """A prefill's :class:`~tc_llava.model.layout.BatchLayout` on the inputs' device, and each sample's frame count
        (LLaVA families with frames; None otherwise). Built on the host after one synchronisation; packed rows get
        each sample's own positions, computed on the samples unpacked and packed back."""
        device = input_ids.device
        grids = () if visual is None else (visual.image_grid_thw, visual.video_grid_thw, visual.second_per_grid_ts)
        given = num_frames if isinstance(num_frames, torch.Tensor) else None
        input_ids, attention_mask, sample_ids, labels, given, *grids = to_host(
            input_ids, attention_mask, sample_ids, labels, given, *grids)
        if given is not None:
            num_frames = given
        if sample_ids is not None and not torch.equal(attention_mask.bool(), sample_ids >= 0):
            raise ValueError("attention_mask must be sample_ids >= 0 for packed rows (padding is sample id -1)")
        packed = None if sample_ids is None else PackedSamples(sample_ids)
        rows, real = (input_ids, attention_mask.bool()) if packed is None else (
            packed.unpack(input_ids, fill=-1), packed.valid)
        counts = None
        if visual is not None:
            visual = dataclasses.replace(visual, image_grid_thw=grids[0], video_grid_thw=grids[1],
                                         second_per_grid_ts=grids[2])
            frame_ids, positions, nxt = self._model_positions(rows, real, visual)
        else:
            if pixel_values is not None:
                counts = frames_per_sample(pixel_values, num_frames, rows.shape[0])
            frame_ids = self.frame_ids(rows, counts)
            positions = self.rope.positions(frame_ids, real, self.token_grid(None if counts is None else counts[0]))
            nxt = self.rope.next_positions(positions[..., -1:])
        index = real_token_index(frame_ids, real)
        if packed is not None:
            frame_ids, positions, index, nxt = packed.pack(frame_ids, fill=-1), packed.pack(positions), \
                packed.pack(index), None
        layout = BatchLayout.build(self.mask, attention_mask, frame_ids, positions, index, nxt, sample_ids, labels)
        return layout.to(device), counts

    def _model_positions(self, rows: torch.Tensor, real: torch.Tensor, visual: QwenVisual
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frame ids, rotary positions and the next token's of a family with its own positions: frames are its
        temporal patches, the positions its own (``get_rope_index``) under the rope rule, the next token's one past
        the largest (as HF decodes)."""
        frame_ids = self.family.frame_ids(self.config, rows, visual)
        native = self.family.rope_index(self.hf, rows, real.long(), visual)
        tau = temporal_index(frame_ids, real)
        positions = self.rope.on_model_positions(native, tau) * real
        following = native.amax(dim=(0, 2))[None, :, None] + 1
        nxt = self.rope.on_model_positions(following.expand(3, -1, 1), tau.amax(-1, keepdim=True) + 1)
        return frame_ids, positions, nxt

    def _loss(self, hidden: torch.Tensor, layout: BatchLayout, num_items_in_batch) -> torch.Tensor:
        """Mean cross-entropy of the layout's loss positions (``num_items_in_batch``: over that many), the LM head
        run a tile of them at a time (``tiling.loss_tokens``)."""
        index = layout.loss_index
        total = tiled_loss(self.hf.lm_head, hidden.flatten(0, 1)[index], layout.targets.flatten()[index],
                           self.tiling.loss_tokens)
        if self.sequence_parallel is not None:  # this rank's share of the tokens: sums and counts reduced
            return reduced_loss(total, index.numel(), self.sequence_parallel, num_items_in_batch)
        denom = num_items_in_batch if num_items_in_batch is not None else max(index.numel(), 1)
        return total / torch.as_tensor(denom, device=total.device, dtype=total.dtype)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, **kwargs: Any) -> GenerationOutput:
        """KV-cache generation (``num_frames=`` for per-sample frame counts); see
        :func:`tc_llava.model.generation.generate` for the options."""
        if self.tokenizer is not None:
            kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return generate(self, input_ids, attention_mask, pixel_values, **kwargs)

    # ----------------------------------------------------------------- save / load
    def tc_settings(self) -> dict[str, Any]:
        """What ``config.json`` records as ``tc_llava``: the rules by name, plain JSON values only."""
        pooling = list(self.pooling.pooling_shape) if self.pooling.pooling_shape else None
        settings = {"rope": rule_settings(self.rope), "mask": rule_settings(self.mask), "pooling_shape": pooling}
        return settings if self.template is None else {**settings, "template": self.template}

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """An ordinary llava-hf directory whose config also records the TC-LLaVA settings (and the frame sampling
        the model was trained with), with its tokenizer, image processor and video processor config."""
        self.config.tc_llava = self.tc_settings()
        if self.frame_sampling is not None:
            setattr(self.config, FRAMES_KEY, dict(self.frame_sampling))
        if self.preprocessing is not None:
            setattr(self.config, BUDGET_KEY, self.preprocessing.budget.to_json())
        self.hf.save_pretrained(path, state_dict=state_dict, **kwargs)
        extras = (self.tokenizer, self.image_processor, self.video_preprocessor)
        if self.preprocessing is not None:  # the image and video processors, with the budget applied
            save_preprocessing(self.preprocessing, path)
            extras = (self.tokenizer,)
        for extra in extras:
            if extra is not None:
                extra.save_pretrained(path)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        rope: RopeRule | None = None,
        mask: MaskRule | None = None,
        pooling: VideoPooling | None = None,
        attn_implementation: str = "auto",
        dtype: torch.dtype | str | None = torch.float32,
        template: str | None = None,
        allow_missing_weights: bool = False,
        frame_budget: dict[str, Any] | None = None,
        tiling: Tiling | None = None,
        **hf_kwargs: Any,
    ) -> "TCLlava":
        """Load a llava-hf checkpoint; rules and chat template not given come from the checkpoint, else
        vanilla/causal/mlp and no template. The video families need their ``video_preprocessor_config.json``.

        A Qwen-VL family loads its image and video processors under ``frame_budget`` (the fields of
        :class:`~tc_llava.model.families.qwen_vl_inputs.FrameBudget`; None: the export's recorded budget, else the
        checkpoint processors' own), refused here where the processor would override it. ``tiling`` (None: the
        defaults of :class:`~tc_llava.model.tiling.Tiling`) is how long sequences run, never saved.

        ``dtype`` None is the checkpoint's (:func:`~tc_llava.model.settings.checkpoint_dtype`). Weights the
        checkpoint lacks, or holds beyond the model's, are a :class:`WeightsError` naming them unless
        ``allow_missing_weights``; :attr:`weights_report` says how it went.

        A directory holding a peft adapter beside the base weights loads with the adapter merged.
        Nothing in the directory runs: the rules are read by name (:mod:`tc_llava.model.settings`),
        ``auto_map`` entries are never trusted and ``.bin`` pickles load weights only; both are
        fixed here, so ``hf_kwargs`` cannot turn them on (a second value is a TypeError).
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: expected a llava-hf checkpoint directory")
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            raise FileNotFoundError(f"{path} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
        config = json.loads(config_file.read_text())
        family = family_of(config.get("model_type"), f"{config_file}: model_type")
        saved_rope, saved_mask, saved_pooling, saved_template = read_settings(config, config_file)
        frame_sampling = read_frame_sampling(config, config_file)
        preprocessing = None
        if frame_budget is not None and not family.multimodal_rope:
            raise ValueError(f"model.frame_budget is a Qwen-VL family's; {family.model_type} samples frames by "
                             "data.num_frames and the benchmark's frame count")
        if family.multimodal_rope and (path / VIDEO_PREPROCESSOR_FILE).is_file():
            budget = frame_budget if frame_budget is not None else config.get(BUDGET_KEY)
            try:
                preprocessing = load_preprocessing(path, family.model_type, FrameBudget.from_json(budget))
            except ValueError as e:
                raise ValueError(f"{path}: frame budget: {e}") from None
        video_file = path / VIDEO_PREPROCESSOR_FILE
        wants_video = family.video_processor_type is not None
        if wants_video and not video_file.is_file():
            raise FileNotFoundError(f"{video_file} not found: {family.model_type} preprocesses frames with its video "
                                    "processor, whose config the llava-hf checkpoint ships beside the weights")
        if template and saved_template and template != saved_template:
            log.warning("%s records chat template %r; using the given %r", config_file, saved_template, template)
        if family.multimodal_rope:  # its prompts are its checkpoints' own chat template's
            template = template or saved_template or family.template
            if template != family.template:
                raise ValueError(f"model.template={template!r} does not write {family.model_type} prompts: its "
                                 f"checkpoints' chat template is {family.template!r} (set model.template="
                                 f"{family.template})")
        adapter_file = path / "adapter_config.json"  # an export with the LoRA adapter kept apart
        has_adapter = adapter_file.is_file()
        if has_adapter:  # before transformers, which loads an adapter it finds by itself
            check_adapter_config(adapter_file)
        if dtype is None:
            dtype, _ = checkpoint_dtype(config)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        attn_implementation = resolve_attention(attn_implementation)
        hf, info = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation={"text_config": attn_implementation, "vision_config": "sdpa"},
            **hf_kwargs, trust_remote_code=False, weights_only=True, output_loading_info=True,
        )
        found = check_loaded_weights(info, path, allow_missing_weights)
        if has_adapter:
            hf = PeftModel.from_pretrained(hf, path).merge_and_unload()
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        has_processor = (path / "preprocessor_config.json").is_file() and preprocessing is None
        model = cls(
            hf, rope or saved_rope, mask or saved_mask, pooling or saved_pooling,
            tokenizer=AutoTokenizer.from_pretrained(path, trust_remote_code=False) if has_tokenizer else None,
            image_processor=(AutoImageProcessor.from_pretrained(path, trust_remote_code=False) if has_processor
                             else preprocessing and preprocessing.image_processor),
            template=template or saved_template,
            video_preprocessor=VideoPreprocessor.from_pretrained(path) if wants_video else None,
            frame_sampling=frame_sampling,
            preprocessing=preprocessing,
            tiling=tiling,
        )
        model.weights_report = {"allow_missing_weights": allow_missing_weights,
                                **{key: names for key, names in found.items() if names}}
        return model
