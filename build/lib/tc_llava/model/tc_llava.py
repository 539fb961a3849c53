"""TC-LLaVA: an HF LLaVA whose LLM attends with a rope rule (dual RoPE, ...) and a mask rule.

The HF model (``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration``)
is used as it is; this module only composes its parts for video:

1. frames ``[B, T, C, H, W]`` -> vision tower per frame -> the checkpoint's MLP projector
   -> optional PLLaVA pooling -> visual tokens scattered into the prompt's placeholder run;
2. the frame-id vector of that layout and each frame's (pooled) token grid -> rotary
   positions (rope rule) and what the LLM attends with (mask rule and backend, decided by
   :func:`tc_llava.model.attention.llm_attention`);
3. the LLM runs with those positions fed to its rotary module only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from tc_llava.model.attention import check_backend, llm_attention, resolve_attention
from tc_llava.model.generation import GenerationOutput, generate
from tc_llava.model.hf_compat import AutoImageProcessor, cache_kwargs, output_cache
from tc_llava.model.layout import check_visual_token_count, frame_ids_from_tokens
from tc_llava.model.masks import CausalMask, MaskRule
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import RopeRule, RotaryPositions, VanillaRoPE, real_token_index
from tc_llava.model.settings import check_adapter_config, read_settings, rule_settings

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llava", "llava_next")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class TCLlavaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    rope_positions: torch.Tensor | None = None
    frame_ids: torch.Tensor | None = None


class TCLlava(nn.Module):
    """A llava-hf model plus the rope rule, mask rule and pooling that make it TC-LLaVA."""

    def __init__(
        self,
        hf_model: nn.Module,
        rope: RopeRule | None = None,
        mask: MaskRule | None = None,
        pooling: VideoPooling | None = None,
        tokenizer: Any = None,
        image_processor: Any = None,
        template: str | None = None,
    ) -> None:
        super().__init__()
        if hf_model.config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {hf_model.config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        self.hf = hf_model
        self.rope = rope or VanillaRoPE()
        self.mask = mask or CausalMask()
        self.pooling = pooling or VideoPooling()
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.template = template  # the chat template's name (data.templates): how prompts are written for it
        lm = self.language_model
        check_backend(lm.config._attn_implementation, self.mask)
        if not self.mask.is_causal and "sliding_attention" in (getattr(lm.config, "layer_types", None) or []):
            raise ValueError(f"mask={self.mask.name} is not supported with sliding-window attention layers")
        if not isinstance(lm.rotary_emb, RotaryPositions):
            lm.rotary_emb = RotaryPositions(lm.rotary_emb)
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.keeps_cls = self.config.vision_feature_select_strategy == "full"
        if self.keeps_cls and self.pooling.pooling_shape is not None:
            raise ValueError("projector=pllava_pool needs vision_feature_select_strategy='default' (CLS dropped)")

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

    def token_grid(self, num_frames: int | None) -> tuple[int, int]:
        """(H, W) of each frame's visual tokens: the pooled grid with pooling, else the vision grid."""
        if num_frames is None:
            return self.grid
        _, h, w = self.pooling.output_grid(num_frames, self.grid)
        return h, w

    def tokens_per_frame(self, num_frames: int) -> int:
        _, h, w = self.pooling.output_grid(num_frames, self.grid)
        return h * w + int(self.keeps_cls)

    def tokens_per_video(self, num_frames: int) -> int:
        """Visual tokens one video of ``num_frames`` frames occupies in the prompt."""
        t, _, _ = self.pooling.output_grid(num_frames, self.grid)
        return t * self.tokens_per_frame(num_frames)

    # ----------------------------------------------------------------- video
    def encode_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, T, C, H, W]`` frames -> ``[B, tokens_per_video(T), D]`` visual tokens."""
        batch, frames = pixel_values.shape[:2]
        tower = self.hf.model.vision_tower
        size = self.config.vision_config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"pixel_values frames are {tuple(pixel_values.shape[-2:])}, the vision tower takes {size}x{size}")
        hidden = tower(pixel_values.flatten(0, 1).to(tower.dtype), output_hidden_states=True).hidden_states
        layer = self.config.vision_feature_layer
        feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], -1)
        if not self.keeps_cls:
            feats = feats[:, 1:]
        feats = self.hf.model.multi_modal_projector(feats).unflatten(0, (batch, frames))
        return self.pooling(feats, self.grid)

    def frame_ids(self, input_ids: torch.Tensor, num_frames: int | None) -> torch.Tensor:
        """Per-token frame ids (-1 text) of prompts holding one expanded video each."""
        if num_frames is None:
            if bool((input_ids == self.image_token_id).any()):
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            return torch.full_like(input_ids, -1)
        per_video = self.tokens_per_video(num_frames)
        check_visual_token_count(input_ids, self.image_token_id, per_video, num_frames)
        return frame_ids_from_tokens(input_ids, self.image_token_id, self.tokens_per_frame(num_frames), per_video)

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
    ) -> TCLlavaOutput:
        """Prefill/training forward, or (with a filled cache and ``rope_positions``) a decode step.

        With ``labels`` the loss is computed from the labelled positions only (their logits
        are never materialised for the whole sequence) and ``logits`` is None;
        ``num_items_in_batch`` normalises the summed loss across accumulated micro-batches.
        """
        lm = self.language_model
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = lm.get_input_embeddings()(input_ids)
        frame_ids = num_frames = None  # a decode step: its new tokens are text
        if cache is not None and cache.get_seq_length() > 0:
            if rope_positions is None:
                raise ValueError("a decode step (a filled cache) needs rope_positions")
        else:
            if pixel_values is not None and pixel_values.ndim != 5:
                raise ValueError(
                    f"pixel_values must be [B, T, C, H, W] (a batch of videos), got shape {tuple(pixel_values.shape)}"
                )
            num_frames = None if pixel_values is None else pixel_values.shape[1]
            frame_ids = self.frame_ids(input_ids, num_frames)
            rope_positions = self.rope.positions(frame_ids, attention_mask, self.token_grid(num_frames))
            position_ids = real_token_index(frame_ids, attention_mask)
        # Positions and mask before the vision tower: the layout's host sync then waits for
        # little, and the tower's kernels keep the GPU busy while the host goes on.
        attention = llm_attention(lm.config, self.mask, frame_ids, attention_mask, position_ids, embeds, cache)
        if num_frames is not None:
            visual = self.encode_video(pixel_values).to(embeds.dtype)
            embeds = embeds.masked_scatter((frame_ids >= 0)[..., None], visual)
        pair_axes = self.rope.pair_axes(lm.rotary_emb.num_pairs) if rope_positions.ndim == 3 else None
        with lm.rotary_emb.use(rope_positions, pair_axes):
            out = lm(inputs_embeds=embeds, use_cache=use_cache, **cache_kwargs(cache), **attention.kwargs())
        hidden = out.last_hidden_state
        loss = logits = None
        if labels is not None:
            loss = self._loss(hidden, labels, num_items_in_batch)
        else:
            logits = self.hf.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return TCLlavaOutput(
            loss=loss, logits=logits, cache=output_cache(out),
            rope_positions=rope_positions, frame_ids=frame_ids,
        )

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.hf.lm_head(hidden[:, :-1][keep]).float()
        total = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
        return total / torch.as_tensor(denom, device=total.device, dtype=total.dtype)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, **kwargs: Any) -> GenerationOutput:
        """KV-cache generation; see :func:`tc_llava.model.generation.generate` for the options."""
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
        """An ordinary llava-hf directory whose config also records the TC-LLaVA settings."""
        self.config.tc_llava = self.tc_settings()
        self.hf.save_pretrained(path, state_dict=state_dict, **kwargs)
        for extra in (self.tokenizer, self.image_processor):
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
        dtype: torch.dtype | str = torch.float32,
        template: str | None = None,
        **hf_kwargs: Any,
    ) -> "TCLlava":
        """Load a llava-hf checkpoint; rules and chat template not given come from the checkpoint, else
        vanilla/causal/mlp and no template.

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
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{config_file}: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        saved_rope, saved_mask, saved_pooling, saved_template = read_settings(config, config_file)
        if template and saved_template and template != saved_template:
            log.warning("%s records chat template %r; using the given %r", config_file, saved_template, template)
        adapter_file = path / "adapter_config.json"  # an export with the LoRA adapter kept apart
        has_adapter = adapter_file.is_file()
        if has_adapter:  # before transformers, which loads an adapter it finds by itself
            check_adapter_config(adapter_file)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        attn_implementation = resolve_attention(attn_implementation)
        hf = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation={"text_config": attn_implementation, "vision_config": "sdpa"},
            **hf_kwargs, trust_remote_code=False, weights_only=True,
        )
        if has_adapter:
            hf = PeftModel.from_pretrained(hf, path).merge_and_unload()
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        has_processor = (path / "preprocessor_config.json").is_file()
        return cls(
            hf, rope or saved_rope, mask or saved_mask, pooling or saved_pooling,
            tokenizer=AutoTokenizer.from_pretrained(path, trust_remote_code=False) if has_tokenizer else None,
            image_processor=(AutoImageProcessor.from_pretrained(path, trust_remote_code=False)
                             if has_processor else None),
            template=template or saved_template,
        )
