"""LLaVA-OneVision (``llava_onevision``; LLaVA-Video shares its architecture and class): ``<video>``
placeholder, a SigLIP tower read at its last layer, 2x2 bilinear pooling after the projector
(27x27 -> 14x14) and one ``image_newline`` embedding after the whole video, in the last
``<video>`` slot. Frames are resized to the tower's square with SigLIP's 0.5 mean/std."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import (
    LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, PreTrainedConfig, SiglipVisionConfig,
)

from tc_llava.model.families.base import Family
from tc_llava.model.processors import VideoPreprocessor, require_torchvision


class LlavaOnevision(Family):
    model_type = "llava_onevision"
    hf_class = LlavaOnevisionForConditionalGeneration
    config_class = LlavaOnevisionConfig
    placeholder = "video_token_id"
    video_processor_type = "LlavaOnevisionVideoProcessor"
    pools_patch_grid = True
    template = "chatml"
    tokens_after_video = 1

    def frame_grid(self, config: PreTrainedConfig) -> tuple[int, int]:
        h, w = super().frame_grid(config)  # apply_pooling: bilinear to ceil(side / 2)
        return math.ceil(h / 2), math.ceil(w / 2)

    def frame_features(self, hf_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return hf_model.model.apply_pooling(super().frame_features(hf_model, pixel_values))

    def after_video(self, hf_model: nn.Module) -> torch.Tensor:
        return hf_model.model.image_newline[None]

    def processors(self, config: PreTrainedConfig) -> tuple[Any, VideoPreprocessor | None]:
        require_torchvision("LlavaOnevisionImageProcessor")
        from transformers import LlavaOnevisionImageProcessor

        size = config.vision_config.image_size
        square, half = {"height": size, "width": size}, [0.5, 0.5, 0.5]
        image = LlavaOnevisionImageProcessor(size=square, image_mean=half, image_std=half,
                                             image_grid_pinpoints=getattr(config, "image_grid_pinpoints", None))
        return image, self.video_processor({"size": square, "image_mean": half, "image_std": half})

    def tiny_vision_config(self, vision: dict[str, Any], layers: int) -> PreTrainedConfig:
        return SiglipVisionConfig(**vision, num_hidden_layers=layers, vision_use_head=False)

    def tiny_config_kwargs(self, tokens: dict[str, int], grid_pinpoints: list[list[int]]) -> dict[str, Any]:
        return dict(image_token_index=tokens["image"], video_token_index=tokens["video"], vision_feature_layer=-1,
                    vision_feature_select_strategy="full", image_grid_pinpoints=grid_pinpoints,
                    pad_token_id=tokens["pad"])
